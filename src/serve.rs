//! The refresh loop of `audiences serve` (the servers are in `crate::server`). Realtime definitions are refreshed every `--refresh-interval`; batch definitions
//! (`schedule: "every 8h"`) when their last basis is that old.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::compute::refresh::{RefreshOptions, RefreshReport, refresh};
use crate::error::{Error, Result};
use crate::identity::IdentityRules;
use crate::lang::definition::schedule_secs;
use crate::store::{CommitLog, Space, Store};

/// Parse a duration such as `5s`, `500ms`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| Error::Usage(format!("'{s}': expected a duration like 5s, 500ms, 2m, 1h")))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(Error::Usage(format!(
                "'{s}': unknown unit '{unit}' (ms, s, m, h)"
            )));
        }
    };
    if !(secs.is_finite() && secs > 0.0) {
        return Err(Error::Usage(format!(
            "'{s}': the interval must be positive"
        )));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parse a byte size such as `512MB`, `2GiB`, `1048576`.
pub fn parse_bytes(s: &str) -> Result<usize> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| Error::Usage(format!("'{s}': expected a size like 512MB or 2GiB")))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "kib" => 1024.0,
        "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        u => return Err(Error::Usage(format!("'{s}': unknown unit '{u}'"))),
    };
    if !(n.is_finite() && n > 0.0) {
        return Err(Error::Usage(format!("'{s}': the size must be positive")));
    }
    Ok((n * mult) as usize)
}

/// The keys due at `now`: realtime ones, and batch ones whose basis is a schedule period old.
pub async fn due_keys(store: &Store, space: &Space, now: i64) -> Result<BTreeSet<String>> {
    let defs = crate::definitions::live(store, space).await?;
    let snap = CommitLog::new(store, space, crate::compute::MEMBERSHIPS)
        .snapshot()
        .await?;
    let bases = crate::compute::bases(&snap);
    let mut due = BTreeSet::new();
    for (k, s) in &defs {
        let period = schedule_secs(&s.file.schedule).map_err(Error::Usage)?;
        let is_due = match (period, bases.get(k)) {
            (None, _) | (_, None) => true,
            (Some(p), Some(b)) => b.as_of + (p as i64) * 1_000_000 <= now,
        };
        if is_due {
            due.insert(k.clone());
        }
    }
    Ok(due)
}

/// How a refresh loop runs.
pub struct Loop {
    /// Time between refreshes.
    pub interval: Duration,
    /// Stop after this many refreshes (None: until stopped).
    pub passes: Option<u64>,
    /// The identity graph kept between refreshes (shared with the server's Flight actions).
    pub cache: crate::identity::persist::GraphCache,
}

/// Run refreshes every `interval` until `stop` turns true (or `passes` refreshes, when given);
/// `on_report` sees each one.
pub async fn run(
    store: &Store,
    space: &Space,
    rules: &IdentityRules,
    Loop {
        interval,
        passes,
        cache,
    }: Loop,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut on_report: impl FnMut(&Result<RefreshReport>),
) -> Result<()> {
    let mut done = 0u64;
    // The identity graph stays in `cache` between refreshes (no reload of the committed state).
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|s| *s) => {
                tracing::info!(space = %space, "refresh loop stops");
                return Ok(());
            }
        }
        let now = chrono::Utc::now().timestamp_micros();
        let result = async {
            let keys = due_keys(store, space, now).await?;
            let opts = RefreshOptions {
                as_of: now,
                keys: Some(keys),
                identity_cache: Some(cache.clone()),
                ..Default::default()
            };
            refresh(store, space, rules, &opts).await
        }
        .await;
        if let Err(e) = &result {
            // A refresh that lost a race or failed leaves the committed state as it was; the
            // next tick tries again.
            tracing::warn!(error = %e, "refresh failed");
        }
        on_report(&result);
        done += 1;
        if passes.is_some_and(|p| done >= p) {
            return Ok(());
        }
    }
}
