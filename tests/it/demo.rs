//! The README's run command: `audiences demo` works end to end on generated data (the real
//! binary, a fresh local store), and what it prints about the sample audiences is consistent
//! with the committed memberships.

use std::process::Command;

#[test]
fn the_demo_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_audiences"))
            .arg("--store")
            .arg(&store)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "audiences {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = run(&["demo", "--events", "60000"]);
    for key in [
        "cart_abandoners",
        "checkout_funnel",
        "bought_viewed_product",
        "business_logged_in_all",
        "business_logged_in_none",
        "high_value",
    ] {
        // each sample definition is reported with its size, and that size is the committed one
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{key} ")))
            .unwrap_or_else(|| panic!("{key} missing from the demo output:\n{out}"));
        let size: u64 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
        let members = run(&[
            "--space",
            "demo",
            "--json",
            "sql",
            &format!("SELECT count(*) AS n FROM memberships WHERE audience_key = '{key}'"),
        ]);
        let n: serde_json::Value = serde_json::from_str(&members).unwrap();
        assert_eq!(n[0]["n"].as_u64(), Some(size), "{key}");
        assert!(size > 0, "{key} is empty in the demo");
    }
}
