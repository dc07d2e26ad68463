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
        // each sample definition is reported with its size after the compute and again after
        // the refresh; the last size is the committed one
        let lines: Vec<&str> = out
            .lines()
            .filter(|l| l.trim_start().starts_with(&format!("{key} ")))
            .collect();
        assert_eq!(
            lines.len(),
            2,
            "{key}: computed and refreshed lines:\n{out}"
        );
        let computed: u64 = lines[0].split_whitespace().nth(2).unwrap().parse().unwrap();
        let words: Vec<&str> = lines[1].split_whitespace().collect();
        let at = words.iter().position(|w| *w == "size").unwrap();
        let size: u64 = words[at + 1].trim_end_matches(',').parse().unwrap();
        let entered: i64 = words
            .iter()
            .find_map(|w| w.strip_prefix('+'))
            .unwrap()
            .parse()
            .unwrap();
        let exited: i64 = words
            .iter()
            .find_map(|w| w.strip_prefix('-'))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            computed as i64 + entered - exited,
            size as i64,
            "{key}: {}",
            lines[1]
        );
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
