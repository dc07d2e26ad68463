//! Fault injection for crash tests: `AUDIENCES_FAULT=<point>` aborts the process (like kill -9)
//! when execution reaches that point. Points: `after_data_files`, `before_commit`,
//! `after_commit`; `lose_put_reply` makes a successful commit put report an error instead.

/// True when the named fault point is armed.
pub fn active(point: &str) -> bool {
    std::env::var("AUDIENCES_FAULT").is_ok_and(|v| v.split(',').any(|p| p == point))
}

/// Abort the process at once (no destructors, no flushing) when `point` is armed.
pub fn hit(point: &str) {
    if active(point) {
        eprintln!("audiences: fault point '{point}' reached, aborting");
        std::process::abort();
    }
}
