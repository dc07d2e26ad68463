//! Delivery of requests to one webhook: a token bucket per destination that backs off on 429
//! (no request before `Retry-After`), retries of 5xx, 408, timeouts and connection errors with
//! jittered exponential backoff until the retry period ends, and a verdict per request: acked or
//! dead (with the reason).
//!
//! Waiting goes through a [`Clock`], so tests run hours of retries in seconds; request timeouts
//! are wall-clock (they bound a real socket).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use rand::Rng;

/// Time for scheduling: retries, backoff, `Retry-After` and the rate limit.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Seconds on this clock (any fixed origin).
    fn now(&self) -> f64;
    /// Wait `secs` of this clock.
    fn sleep(&self, secs: f64) -> BoxFuture<'static, ()>;
}

/// The real clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> f64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    }
    fn sleep(&self, secs: f64) -> BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep(Duration::from_secs_f64(secs.max(0.0))))
    }
}

/// A clock that runs `scale` times faster than real time (tests: 3600 turns an hour into a
/// second).
#[derive(Debug)]
pub struct ScaledClock {
    origin: std::time::Instant,
    scale: f64,
}

impl ScaledClock {
    /// A clock starting at 0 and running `scale` times faster than real time.
    pub fn new(scale: f64) -> Self {
        ScaledClock {
            origin: std::time::Instant::now(),
            scale,
        }
    }
}

impl Clock for ScaledClock {
    fn now(&self) -> f64 {
        self.origin.elapsed().as_secs_f64() * self.scale
    }
    fn sleep(&self, secs: f64) -> BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep(Duration::from_secs_f64(
            (secs / self.scale).max(0.0),
        )))
    }
}

/// First retry delay, seconds; doubles per attempt up to [`BACKOFF_CAP`].
pub const BACKOFF_BASE: f64 = 1.0;
/// Largest retry delay, seconds.
pub const BACKOFF_CAP: f64 = 300.0;

/// Token bucket with adaptive rate: a 429 halves the rate (down to 1/16 of the configured one)
/// and pauses every request until its `Retry-After`; each success wins back 1/20.
#[derive(Debug)]
pub struct Limiter {
    state: Mutex<LimiterState>,
    clock: Arc<dyn Clock>,
}

#[derive(Debug)]
struct LimiterState {
    tokens: f64,
    last: f64,
    rate: f64,
    max_rate: f64,
    burst: f64,
    paused_until: f64,
}

impl Limiter {
    /// `per_second` sustained, `burst` at once.
    pub fn new(per_second: f64, burst: u32, clock: Arc<dyn Clock>) -> Self {
        let now = clock.now();
        Limiter {
            state: Mutex::new(LimiterState {
                tokens: burst as f64,
                last: now,
                rate: per_second,
                max_rate: per_second,
                burst: burst as f64,
                paused_until: f64::MIN,
            }),
            clock,
        }
    }

    /// Wait for a token (and for any `Retry-After` pause to end).
    pub async fn acquire(&self) {
        loop {
            let wait = {
                let now = self.clock.now();
                let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                // no tokens accrue while a Retry-After pause lasts
                let elapsed = (now - s.last.max(s.paused_until)).max(0.0);
                s.tokens = (s.tokens + elapsed * s.rate).min(s.burst);
                s.last = now;
                if now < s.paused_until {
                    s.paused_until - now
                } else if s.tokens >= 1.0 - 1e-9 {
                    // (the tolerance: a refill that lands a rounding error short of a whole
                    // token must not wait for a sleep too short to move the clock)
                    s.tokens = (s.tokens - 1.0).max(0.0);
                    return;
                } else {
                    (1.0 - s.tokens) / s.rate
                }
            };
            self.clock.sleep(wait).await;
        }
    }

    /// The destination said 429: pause until `retry_after` seconds from now (when given) and
    /// slow down.
    pub fn throttled(&self, retry_after: Option<f64>) {
        let now = self.clock.now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ra) = retry_after {
            s.paused_until = s.paused_until.max(now + ra);
        }
        s.rate = (s.rate / 2.0).max(s.max_rate / 16.0);
        s.tokens = 0.0;
        s.last = now;
    }

    /// A request succeeded: speed back up towards the configured rate.
    pub fn succeeded(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.rate = (s.rate + s.max_rate / 20.0).min(s.max_rate);
    }
}

/// What became of one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Acknowledged (2xx) after this many attempts.
    Acked {
        /// Attempts made (1 = first try).
        attempts: u32,
    },
    /// Given up: a permanent error, or retries exhausted.
    Dead {
        /// Why, for the dead-letter table.
        reason: String,
        /// Attempts made.
        attempts: u32,
    },
}

/// One webhook endpoint with its limiter.
#[derive(Debug)]
pub struct Webhook {
    /// HTTP client (shared connection pool).
    pub client: reqwest::Client,
    /// Target URL.
    pub url: String,
    /// Extra headers (secrets).
    pub headers: reqwest::header::HeaderMap,
    /// Rate limiter.
    pub limiter: Limiter,
    /// Scheduling clock.
    pub clock: Arc<dyn Clock>,
    /// How long a request is retried, seconds of `clock`.
    pub retry_period: f64,
    /// Wall-clock timeout of one attempt.
    pub timeout: Duration,
}

/// Parse `Retry-After`: delta seconds or an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<f64> {
    let v = v.trim();
    if let Ok(s) = v.parse::<f64>() {
        return (s.is_finite() && s >= 0.0).then_some(s);
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let delta = at.timestamp_millis() - chrono::Utc::now().timestamp_millis();
    Some((delta as f64 / 1000.0).max(0.0))
}

fn snippet(body: &str) -> String {
    let one_line: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &one_line[..i]),
        None => one_line,
    }
}

fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        format!("timed out after {timeout:?}")
    } else if e.is_connect() {
        "connection failed".into()
    } else {
        // never the URL (it may carry a token)
        let mut msg = format!(
            "connection error: {}",
            e.to_string()
                .replace(e.url().map_or("", |u| u.as_str()), "URL")
        );
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            msg = format!("{msg}: {s}");
            src = s.source();
        }
        msg
    }
}

impl Webhook {
    /// Jittered exponential backoff before attempt `attempt + 1`.
    fn backoff(attempt: u32) -> f64 {
        let exp = BACKOFF_BASE * 2f64.powi(attempt.saturating_sub(1).min(30) as i32);
        exp.min(BACKOFF_CAP) * rand::rng().random_range(0.5..=1.0)
    }

    /// POST `body` until it is acknowledged or given up; `on_retry` is called before each retry.
    pub async fn deliver(
        &self,
        body: &bytes::Bytes,
        idempotency_key: &str,
        mut on_retry: impl FnMut(&str),
    ) -> Verdict {
        let start = self.clock.now();
        let mut attempts = 0u32;
        loop {
            self.limiter.acquire().await;
            attempts += 1;
            let sent = self
                .client
                .post(&self.url)
                .headers(self.headers.clone())
                .header("Idempotency-Key", idempotency_key)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .timeout(self.timeout)
                .body(body.clone())
                .send()
                .await;
            let (error, wait) = match sent {
                Ok(r) if r.status().is_success() => {
                    self.limiter.succeeded();
                    // drain the body so the connection is reused
                    let _ = r.bytes().await;
                    return Verdict::Acked { attempts };
                }
                Ok(r) => {
                    let status = r.status();
                    let retry_after = r
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_retry_after);
                    let text = snippet(&r.text().await.unwrap_or_default());
                    let error = format!("HTTP {}: {text}", status.as_u16());
                    if status.as_u16() == 429 {
                        self.limiter.throttled(retry_after);
                        (
                            error,
                            retry_after.unwrap_or_else(|| Self::backoff(attempts)),
                        )
                    } else if status.is_server_error() || status.as_u16() == 408 {
                        (error, Self::backoff(attempts))
                    } else {
                        return Verdict::Dead {
                            reason: format!("{error} (permanent: not retried)"),
                            attempts,
                        };
                    }
                }
                Err(e) => (describe(&e, self.timeout), Self::backoff(attempts)),
            };
            let elapsed = self.clock.now() - start;
            if elapsed + wait > self.retry_period {
                return Verdict::Dead {
                    reason: format!(
                        "retries exhausted: {attempts} attempts over {:.0} s (retry period {:.0} s); last error: {error}",
                        elapsed, self.retry_period
                    ),
                    attempts,
                };
            }
            on_retry(&error);
            self.clock.sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_http_dates() {
        assert_eq!(parse_retry_after("120"), Some(120.0));
        assert_eq!(parse_retry_after(" 0 "), Some(0.0));
        assert_eq!(parse_retry_after("-3"), None);
        assert_eq!(parse_retry_after("soon"), None);
        let later = (chrono::Utc::now() + chrono::Duration::seconds(60)).to_rfc2822();
        let s = parse_retry_after(&later).unwrap();
        assert!((55.0..=61.0).contains(&s), "{s}");
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(0.0)
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        for attempt in 1..40u32 {
            let b = Webhook::backoff(attempt);
            let full = (BACKOFF_BASE * 2f64.powi((attempt - 1).min(30) as i32)).min(BACKOFF_CAP);
            assert!(b >= full * 0.5 && b <= full, "{attempt}: {b}");
        }
    }

    /// A clock whose sleeps return at once, moving its time forward (one task at a time).
    #[derive(Debug, Default)]
    struct JumpClock(std::sync::Mutex<f64>);

    impl Clock for JumpClock {
        fn now(&self) -> f64 {
            *self.0.lock().unwrap()
        }
        fn sleep(&self, secs: f64) -> BoxFuture<'static, ()> {
            *self.0.lock().unwrap() += secs.max(0.0);
            Box::pin(async {})
        }
    }

    #[tokio::test]
    async fn the_bucket_allows_burst_then_rate_and_pauses_on_throttle() {
        let clock: Arc<dyn Clock> = Arc::new(JumpClock::default());
        let l = Limiter::new(50.0, 5, Arc::clone(&clock));
        for _ in 0..5 {
            l.acquire().await;
        }
        assert_eq!(clock.now(), 0.0, "the burst is free");
        for _ in 0..100 {
            l.acquire().await;
        }
        // then 100 at 50/s
        assert!((clock.now() - 2.0).abs() < 1e-6, "{}", clock.now());
        l.throttled(Some(3.0));
        let t1 = clock.now();
        l.acquire().await;
        assert!(
            (clock.now() - t1 - 3.0 - 1.0 / 25.0).abs() < 1e-6,
            "Retry-After honoured, nothing saved up meanwhile: {}",
            clock.now() - t1
        );
        // halved rate after the pause: the next token takes 1/25 s
        let t2 = clock.now();
        l.acquire().await;
        assert!(
            (clock.now() - t2 - 1.0 / 25.0).abs() < 1e-6,
            "{}",
            clock.now() - t2
        );
    }
}
