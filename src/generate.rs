//! `audiences generate`: seeded, deterministic, streaming synthetic Segment events shaped as
//! ../shared/BENCH.md describes (profiles with anonymous-then-known histories, accounts with Zipf
//! sizes, Zipf event popularity, correlated funnels, late arrivals).
//!
//! Determinism: every profile draws from its own ChaCha8 stream seeded from (seed, profile
//! index), and output is written in profile order, so the same arguments give byte-identical
//! output. Memory holds one profile at a time.

use std::io::Write;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal, Zipf};

use crate::error::{Error, Result};

const DAY: i64 = 86_400_000_000;
const HOUR: i64 = 3_600_000_000;

/// Generator settings.
#[derive(Debug, Clone)]
pub struct GenConfig {
    /// Approximate number of events of the base dataset.
    pub events: u64,
    /// Seed.
    pub seed: u64,
    /// End of the 180-day range (UTC microseconds).
    pub end: i64,
    /// When set, write only a further batch of `delta × events` events after `end`.
    pub delta: Option<f64>,
    /// Which delta batch: round `r` falls in day `r + 1` after `end`, with its own message ids
    /// (successive micro-batches of a refresh benchmark).
    pub delta_round: u64,
}

/// Counts of what was generated.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GenStats {
    /// Events written.
    pub events: u64,
    /// Profiles that emitted at least one event.
    pub profiles: u64,
}

/// Well-known track events, most popular first; the rest of the ~200 names are synthetic.
pub const FUNNEL_EVENTS: [&str; 6] = [
    "Product Viewed",
    "Logged In",
    "Product Added",
    "Checkout Started",
    "Signed Up",
    "Order Completed",
];
const NOUNS: [&str; 20] = [
    "Video",
    "Button",
    "Article",
    "Coupon",
    "Cart",
    "Wishlist",
    "Review",
    "Search",
    "Banner",
    "Email",
    "Promotion",
    "Filter",
    "Menu",
    "Form",
    "Notification",
    "Invite",
    "Report",
    "Widget",
    "Playlist",
    "Survey",
];
const VERBS: [&str; 10] = [
    "Clicked",
    "Opened",
    "Shared",
    "Played",
    "Closed",
    "Saved",
    "Applied",
    "Submitted",
    "Dismissed",
    "Updated",
];
const CATEGORIES: [&str; 12] = [
    "books",
    "electronics",
    "garden",
    "toys",
    "fashion",
    "sports",
    "beauty",
    "grocery",
    "music",
    "office",
    "pets",
    "tools",
];
const PAGES: [(&str, &str); 6] = [
    ("Home", "/"),
    ("Pricing", "/pricing"),
    ("Docs", "/docs/getting-started"),
    ("Blog", "/blog/audiences-at-scale"),
    ("Signup", "/signup"),
    ("Product", "/product/overview"),
];
const SCREENS: [&str; 5] = ["Home", "Search", "Cart", "Settings", "Product Detail"];
const OSES: [&str; 5] = ["iOS", "Android", "Mac OS", "Windows", "Linux"];
const COUNTRIES: [&str; 8] = ["US", "DE", "FR", "GB", "BR", "IN", "JP", "CA"];
const PLANS: [&str; 4] = ["free", "pro", "business", "enterprise"];

/// The name of track event number `k` (0-based popularity rank).
pub fn track_name(k: usize) -> String {
    if k < FUNNEL_EVENTS.len() {
        FUNNEL_EVENTS[k].to_string()
    } else {
        let j = k - FUNNEL_EVENTS.len();
        format!(
            "{} {}",
            NOUNS[j % NOUNS.len()],
            VERBS[(j / NOUNS.len()) % VERBS.len()]
        )
    }
}

/// Number of track event names.
pub const TRACK_NAMES: usize = 200;

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Format UTC microseconds as `YYYY-MM-DDTHH:MM:SS.ffffffZ` without allocation.
pub fn write_ts(out: &mut Vec<u8>, micros: i64) {
    let days = micros.div_euclid(DAY);
    let rem = micros.rem_euclid(DAY);
    // Civil-from-days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    let secs = rem / 1_000_000;
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        rem % 1_000_000
    );
}

struct Dists {
    price: LogNormal<f64>,
    checkout_delay: LogNormal<f64>,
    view_delay: LogNormal<f64>,
    names: Zipf<f64>,
    products: Zipf<f64>,
    accounts: Zipf<f64>,
}

/// One generated message, ready to be written.
struct Msg {
    ts: i64,
    body: Vec<u8>,
}

/// Write the dataset as NDJSON to `out`.
pub fn generate(cfg: &GenConfig, out: &mut dyn Write) -> Result<GenStats> {
    let n_profiles = cfg.events.div_ceil(20).max(1);
    let n_accounts = (n_profiles / 25).max(1);
    let d = Dists {
        // P(price > 100) ≈ 15%: median 40, sigma = ln(2.5) / 1.036.
        price: LogNormal::new(40f64.ln(), 0.884).map_err(|e| Error::Usage(e.to_string()))?,
        checkout_delay: LogNormal::new((HOUR as f64).ln(), 2.0)
            .map_err(|e| Error::Usage(e.to_string()))?,
        view_delay: LogNormal::new((DAY as f64).ln(), 1.5)
            .map_err(|e| Error::Usage(e.to_string()))?,
        names: Zipf::new(TRACK_NAMES as f64, 1.1).map_err(|e| Error::Usage(e.to_string()))?,
        products: Zipf::new(10_000.0, 1.05).map_err(|e| Error::Usage(e.to_string()))?,
        accounts: Zipf::new(n_accounts as f64, 1.1).map_err(|e| Error::Usage(e.to_string()))?,
    };
    let mut stats = GenStats::default();
    let mut w = std::io::BufWriter::with_capacity(1 << 20, out);
    let io = |e| Error::io("generate output", e);
    match cfg.delta {
        None => {
            let mut remaining = cfg.events;
            let mut i = 0u64;
            while remaining > 0 {
                let msgs = profile_events(cfg, &d, i, remaining, None);
                if !msgs.is_empty() {
                    stats.profiles += 1;
                }
                for m in &msgs {
                    w.write_all(&m.body).map_err(io)?;
                    w.write_all(b"\n").map_err(io)?;
                }
                stats.events += msgs.len() as u64;
                remaining -= msgs.len() as u64;
                i += 1;
                if i > cfg.events.saturating_mul(4) + 16 {
                    break;
                }
            }
        }
        Some(frac) => {
            let target = ((cfg.events as f64) * frac).round() as u64;
            let mut rng = ChaCha8Rng::seed_from_u64(
                splitmix(cfg.seed ^ 0xDE17A)
                    ^ match cfg.delta_round {
                        0 => 0,
                        r => splitmix(r),
                    },
            );
            let mut remaining = target;
            let mut k = 0u64;
            while remaining > 0 {
                // Mostly existing profiles, some new ones (index past the base range).
                let i = if rng.random_bool(0.9) {
                    rng.random_range(0..n_profiles)
                } else {
                    n_profiles + k
                };
                let budget = remaining.min(rng.random_range(1..=5));
                let msgs = profile_events(cfg, &d, i, budget, Some((cfg.delta_round << 32) | k));
                for m in &msgs {
                    w.write_all(&m.body).map_err(io)?;
                    w.write_all(b"\n").map_err(io)?;
                }
                stats.events += msgs.len() as u64;
                stats.profiles += u64::from(!msgs.is_empty());
                remaining = remaining.saturating_sub(msgs.len() as u64);
                k += 1;
            }
        }
    }
    w.flush().map_err(io)?;
    Ok(stats)
}

/// Generate the events of profile `i` (at most `budget`). In delta mode (`delta = Some(k)`),
/// the events fall in the day after `end` and carry message ids unique to delta round `k`.
fn profile_events(cfg: &GenConfig, d: &Dists, i: u64, budget: u64, delta: Option<u64>) -> Vec<Msg> {
    let mut rng = ChaCha8Rng::seed_from_u64(splitmix(cfg.seed ^ splitmix(i)));
    // Identity of the profile (drawn first, so the delta sees the same ids).
    let known = rng.random_bool(0.7);
    let n_anon = rng.random_range(1..=3u32);
    let anon: Vec<String> = (0..n_anon)
        .map(|_| format!("{:016x}", rng.random::<u64>()))
        .collect();
    let user_id = format!("user-{i}");
    let n_emails = if rng.random_bool(0.85) {
        1
    } else {
        rng.random_range(2..=3)
    };
    let emails: Vec<String> = (0..n_emails)
        .map(|k| {
            if k == 0 {
                format!("user{i}@example.com")
            } else {
                format!("User{i}.{k}@Mail{k}.example.org ")
            }
        })
        .collect();
    let account = (known && rng.random_bool(0.6)).then(|| d.accounts.sample(&mut rng) as u64);
    let os = OSES[rng.random_range(0..OSES.len())];
    let country = COUNTRIES[rng.random_range(0..COUNTRIES.len())];
    // Heavy-tailed event count with mean ≈ 20 (Pareto, alpha 1.5), capped.
    let u: f64 = rng.random_range(f64::EPSILON..1.0);
    let n = ((20.0 / 3.0) / u.powf(1.0 / 1.5)).clamp(1.0, 5000.0) as u64;
    let n = n.min(budget);
    let (start, span) = match delta {
        None => {
            let start = cfg.end - 180 * DAY + rng.random_range(0..(179 * DAY));
            (start, cfg.end - start)
        }
        Some(k) => {
            let mut r2 = ChaCha8Rng::seed_from_u64(splitmix(cfg.seed ^ splitmix(!k)));
            rng = ChaCha8Rng::seed_from_u64(r2.random());
            (cfg.end + 1 + (k >> 32) as i64 * DAY, DAY)
        }
    };
    let mut times: Vec<i64> = (0..n)
        .map(|_| start + rng.random_range(0..span.max(1)))
        .collect();
    times.sort_unstable();
    // Known profiles browse anonymously for the first ~20% of their events.
    let identified_at = if known && delta.is_none() {
        (n as f64 * 0.2) as u64
    } else {
        0
    };
    let id_prefix = match delta {
        None => format!("{:x}-{i:x}", cfg.seed),
        Some(k) => format!("{:x}-d{k:x}-{i:x}", cfg.seed),
    };
    let mut out: Vec<Msg> = Vec::with_capacity(n as usize + 4);
    let mut seq = 0u64;
    let mut j = 0u64;
    while (out.len() as u64) < n {
        let ts = times[(j as usize).min(times.len() - 1)];
        j += 1;
        let is_known_now = known && j > identified_at;
        let uid = is_known_now.then_some(user_id.as_str());
        let aid = anon[if is_known_now {
            rng.random_range(0..anon.len())
        } else {
            0
        }]
        .as_str();
        let first_known = known && j == identified_at + 1 && delta.is_none();
        let r: f64 = rng.random();
        // Mix: track ~70%, page 20%, screen 5%, identify ~4% (one on identification plus a
        // few trait updates), group ~1% (only profiles in an account, once identified).
        let kind = if first_known || (0.95..0.955).contains(&r) {
            "identify"
        } else if r >= 0.955 && account.is_some() && uid.is_some() && r < 0.985 {
            "group"
        } else if !(0.70..0.95).contains(&r) {
            "track"
        } else if r < 0.90 {
            "page"
        } else {
            "screen"
        };
        let mut m = MsgWriter::new(&id_prefix, &mut seq, kind, uid, aid);
        match kind {
            "identify" => {
                m.raw(",\"traits\":{");
                let mut first = true;
                if uid.is_some() {
                    let e = &emails[rng.random_range(0..emails.len())];
                    m.kv_str(&mut first, "email", e);
                    m.kv_str(&mut first, "name", &format!("User {i}"));
                }
                m.kv_str(&mut first, "plan", PLANS[rng.random_range(0..PLANS.len())]);
                m.kv_num(&mut first, "logins", rng.random_range(0..500) as f64);
                m.raw("}");
            }
            "group" => {
                let a = account.unwrap_or(0);
                m.raw(",\"groupId\":");
                m.string(&format!("acct-{a}"));
                m.raw(",\"traits\":{");
                let mut first = true;
                m.kv_str(&mut first, "name", &format!("Account {a}"));
                m.kv_str(
                    &mut first,
                    "plan",
                    PLANS[(splitmix(a ^ cfg.seed) % 4) as usize],
                );
                m.kv_num(&mut first, "employees", (splitmix(a) % 5000) as f64);
                m.raw("}");
            }
            "page" => {
                let (name, path) = PAGES[rng.random_range(0..PAGES.len())];
                m.raw(",\"name\":");
                m.string(name);
                m.raw(",\"properties\":{");
                let mut first = true;
                m.kv_str(&mut first, "path", path);
                m.kv_str(&mut first, "url", &format!("https://example.com{path}"));
                m.kv_str(&mut first, "title", &format!("{name} | Example"));
                m.kv_str(
                    &mut first,
                    "referrer",
                    ["https://google.com/", "https://news.ycombinator.com/", ""]
                        [rng.random_range(0..3)],
                );
                m.raw("}");
            }
            "screen" => {
                m.raw(",\"name\":");
                m.string(SCREENS[rng.random_range(0..SCREENS.len())]);
                m.raw(",\"properties\":{\"build\":");
                m.number(rng.random_range(100..120) as f64);
                m.raw("}");
            }
            _ => {
                let k = (d.names.sample(&mut rng) as usize).saturating_sub(1);
                let name = track_name(k);
                m.raw(",\"event\":");
                m.string(&name);
                let product = d.products.sample(&mut rng) as u64;
                let price = (d.price.sample(&mut rng) * 100.0).round() / 100.0;
                write_track_properties(&mut m, &name, product, price, &mut rng);
                // Correlated follow-ups.
                if name == "Checkout Started" && rng.random_bool(0.35) {
                    let t2 = ts + 1 + d.checkout_delay.sample(&mut rng) as i64;
                    follow_up(
                        &mut out, cfg, &id_prefix, &mut seq, uid, aid, t2, product, price,
                        &mut rng, os, country, delta,
                    );
                } else if name == "Product Viewed" && rng.random_bool(0.1) {
                    let t2 = ts + 1 + d.view_delay.sample(&mut rng) as i64;
                    follow_up(
                        &mut out, cfg, &id_prefix, &mut seq, uid, aid, t2, product, price,
                        &mut rng, os, country, delta,
                    );
                }
            }
        }
        m.finish(ts, &mut rng, os, country);
        out.push(Msg { ts, body: m.buf });
    }
    out.truncate(n as usize);
    let _ = out.iter().map(|m| m.ts).max();
    out
}

fn write_track_properties(
    m: &mut MsgWriter,
    name: &str,
    product: u64,
    price: f64,
    rng: &mut ChaCha8Rng,
) {
    m.raw(",\"properties\":{");
    let mut first = true;
    match name {
        "Product Viewed" | "Product Added" | "Checkout Started" | "Order Completed" => {
            m.kv_str(&mut first, "product_id", &format!("prod-{product}"));
            m.kv_num(&mut first, "price", price);
            m.kv_str(
                &mut first,
                "category",
                CATEGORIES[(splitmix(product) % 12) as usize],
            );
            let currency = match rng.random_range(0..10) {
                0..=6 => "USD",
                7 | 8 => "EUR",
                _ => "GBP",
            };
            m.kv_str(&mut first, "currency", currency);
            if name != "Product Viewed" {
                let q = rng.random_range(1..=5);
                m.kv_num(&mut first, "quantity", q as f64);
                if name == "Order Completed" {
                    m.kv_num(
                        &mut first,
                        "revenue",
                        (price * q as f64 * 100.0).round() / 100.0,
                    );
                }
            }
        }
        "Signed Up" | "Logged In" => {
            m.kv_str(
                &mut first,
                "method",
                ["email", "google", "github"][rng.random_range(0..3)],
            );
        }
        _ => {
            m.kv_num(&mut first, "value", rng.random_range(0..1000) as f64);
        }
    }
    m.raw("}");
}

#[allow(clippy::too_many_arguments)]
fn follow_up(
    out: &mut Vec<Msg>,
    cfg: &GenConfig,
    prefix: &str,
    seq: &mut u64,
    uid: Option<&str>,
    aid: &str,
    ts: i64,
    product: u64,
    price: f64,
    rng: &mut ChaCha8Rng,
    os: &str,
    country: &str,
    delta: Option<u64>,
) {
    let limit = if delta.is_some() {
        cfg.end + DAY
    } else {
        cfg.end
    };
    if ts > limit {
        return;
    }
    let mut m = MsgWriter::new(prefix, seq, "track", uid, aid);
    m.raw(",\"event\":\"Order Completed\"");
    write_track_properties(&mut m, "Order Completed", product, price, rng);
    m.finish(ts, rng, os, country);
    out.push(Msg { ts, body: m.buf });
}

/// Writes one message's JSON by hand (no intermediate values; fast and byte-stable).
struct MsgWriter {
    buf: Vec<u8>,
}

impl MsgWriter {
    fn new(prefix: &str, seq: &mut u64, kind: &str, uid: Option<&str>, aid: &str) -> Self {
        let mut buf = Vec::with_capacity(512);
        let _ = write!(
            buf,
            "{{\"type\":\"{kind}\",\"messageId\":\"{prefix}-{:x}\"",
            *seq
        );
        *seq += 1;
        let mut m = MsgWriter { buf };
        if let Some(u) = uid {
            m.raw(",\"userId\":");
            m.string(u);
        }
        m.raw(",\"anonymousId\":");
        m.string(aid);
        m
    }
    fn raw(&mut self, s: &str) {
        self.buf.extend_from_slice(s.as_bytes());
    }
    fn string(&mut self, s: &str) {
        self.buf.push(b'"');
        for c in s.chars() {
            match c {
                '"' => self.raw("\\\""),
                '\\' => self.raw("\\\\"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(self.buf, "\\u{:04x}", c as u32);
                }
                c => {
                    let mut b = [0u8; 4];
                    self.buf.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
                }
            }
        }
        self.buf.push(b'"');
    }
    fn number(&mut self, x: f64) {
        if x.fract() == 0.0 && x.abs() < 1e15 {
            let _ = write!(self.buf, "{}", x as i64);
        } else {
            let _ = write!(self.buf, "{x}");
        }
    }
    fn key(&mut self, first: &mut bool, k: &str) {
        if !*first {
            self.buf.push(b',');
        }
        *first = false;
        self.string(k);
        self.buf.push(b':');
    }
    fn kv_str(&mut self, first: &mut bool, k: &str, v: &str) {
        self.key(first, k);
        self.string(v);
    }
    fn kv_num(&mut self, first: &mut bool, k: &str, v: f64) {
        self.key(first, k);
        self.number(v);
    }
    fn finish(&mut self, ts: i64, rng: &mut ChaCha8Rng, os: &str, country: &str) {
        self.raw(",\"timestamp\":\"");
        write_ts(&mut self.buf, ts);
        // 2% arrive late (up to 3 days after their timestamp); the rest within seconds.
        let received = if rng.random_bool(0.02) {
            ts + rng.random_range(60_000_000..3 * DAY)
        } else {
            ts + rng.random_range(5_000..2_000_000)
        };
        self.raw("\",\"receivedAt\":\"");
        write_ts(&mut self.buf, received);
        self.raw("\",\"context\":{\"os\":{\"name\":");
        self.string(os);
        self.raw("},\"location\":{\"country\":");
        self.string(country);
        self.raw("},\"library\":{\"name\":\"audiences-generate\",\"version\":\"1\"}}}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_format_like_chrono() {
        for t in [
            0i64,
            1_767_225_600_123_456,
            951_782_400_000_000,
            -1,
            4_102_444_799_999_999,
        ] {
            let mut b = Vec::new();
            write_ts(&mut b, t);
            let ours = String::from_utf8(b).unwrap();
            let theirs = chrono::DateTime::from_timestamp_micros(t)
                .unwrap()
                .format("%Y-%m-%dT%H:%M:%S%.6fZ")
                .to_string();
            assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn same_seed_same_bytes_and_valid_messages() {
        let cfg = GenConfig {
            events: 3000,
            seed: 7,
            end: 1_767_225_600_000_000,
            delta: None,
            delta_round: 0,
        };
        let mut a = Vec::new();
        let mut b = Vec::new();
        let sa = generate(&cfg, &mut a).unwrap();
        generate(&cfg, &mut b).unwrap();
        assert_eq!(a, b);
        assert_eq!(sa.events, 3000);
        let mut other = Vec::new();
        generate(
            &GenConfig {
                seed: 8,
                ..cfg.clone()
            },
            &mut other,
        )
        .unwrap();
        assert_ne!(a, other);
        for line in a.split(|c| *c == b'\n').filter(|l| !l.is_empty()) {
            let e = crate::events::message::parse_message(line, 0).unwrap();
            assert!(e.timestamp <= cfg.end);
            assert!(e.timestamp >= cfg.end - 180 * DAY);
        }
    }

    #[test]
    fn delta_is_after_the_end() {
        let cfg = GenConfig {
            events: 5000,
            seed: 1,
            end: 1_767_225_600_000_000,
            delta: Some(0.01),
            delta_round: 0,
        };
        let mut a = Vec::new();
        let s = generate(&cfg, &mut a).unwrap();
        assert_eq!(s.events, 50);
        for line in a.split(|c| *c == b'\n').filter(|l| !l.is_empty()) {
            let e = crate::events::message::parse_message(line, 0).unwrap();
            assert!(e.timestamp > cfg.end && e.timestamp <= cfg.end + DAY);
        }
    }
}
