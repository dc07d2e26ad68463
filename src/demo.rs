//! `audiences demo`: the product end to end on generated data in the embedded store.

use crate::cli::{DemoArgs, Global};
use crate::error::{Error, Result};
use crate::events::{IngestOptions, Input};
use crate::generate::GenConfig;

/// The sample definitions the demo creates.
const SAMPLE_DEFINITIONS: [(&str, &str); 12] = [
    (
        "revenue_180d.json",
        include_str!("../data/definitions/revenue_180d.json"),
    ),
    (
        "favorite_category.json",
        include_str!("../data/definitions/favorite_category.json"),
    ),
    (
        "repeat_buyers.json",
        include_str!("../data/definitions/repeat_buyers.json"),
    ),
    (
        "q2_big_repeat_buyers.json",
        include_str!("../data/definitions/q2_big_repeat_buyers.json"),
    ),
    (
        "q3_viewed_not_bought.json",
        include_str!("../data/definitions/q3_viewed_not_bought.json"),
    ),
    (
        "q4_lapsed.json",
        include_str!("../data/definitions/q4_lapsed.json"),
    ),
    (
        "q7_high_value.json",
        include_str!("../data/definitions/q7_high_value.json"),
    ),
    (
        "funnels/cart_abandoners.json",
        include_str!("../data/definitions/funnels/cart_abandoners.json"),
    ),
    (
        "q5_checkout_funnel.json",
        include_str!("../data/definitions/q5_checkout_funnel.json"),
    ),
    (
        "q6_bought_viewed_product.json",
        include_str!("../data/definitions/q6_bought_viewed_product.json"),
    ),
    (
        "q8_business_all.json",
        include_str!("../data/definitions/q8_business_all.json"),
    ),
    (
        "q8_business_none.json",
        include_str!("../data/definitions/q8_business_none.json"),
    ),
];

/// Run the demo: generate, ingest, and summarize what landed.
pub async fn run(g: &Global, a: &DemoArgs) -> Result<()> {
    let store = g.open_store()?;
    let space = if g.space == "default" && !a.keep {
        crate::store::Space::new("demo")?
    } else {
        g.space()?
    };
    if !a.keep {
        clear_space(&store, &space).await?;
    }
    println!("audiences demo: store {} / space {}", store.url(), space);
    let end = crate::cli::parse_time_arg("2026-01-01T00:00:00Z", "end")?;
    let dir =
        std::env::temp_dir().join(format!("audiences-demo-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let path = dir.join("events.ndjson");
    let t = std::time::Instant::now();
    let stats = crate::cli::write_generated(
        &GenConfig {
            events: a.events,
            seed: 42,
            end,
            delta: None,
            delta_round: 0,
        },
        Some(&path),
    )?;
    println!(
        "1. generated {} events for {} profiles in {:.2?}",
        stats.events,
        stats.profiles,
        t.elapsed()
    );
    // A few malformed messages, to show that rejections are kept with their reasons.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let bad = b"{\"type\":\"track\",\"userId\":\"u1\"}\n{not json\n{\"type\":\"page\",\"timestamp\":\"yesterday\",\"userId\":\"u2\"}\n";
        f.write_all(bad).map_err(|e| Error::io(&path, e))?;
    }
    let t = std::time::Instant::now();
    let report = crate::events::ingest(
        &store,
        &space,
        vec![Input::File(path.clone()), Input::File(path.clone())],
        IngestOptions {
            progress: true,
            dead_letter: Some(dir.join("rejected.ndjson")),
            ..Default::default()
        },
    )
    .await?;
    println!(
        "2. ingested the file twice in {:.2?}: submitted {}, accepted {}, rejected {}, duplicates {} (the second copy is deduplicated by messageId)",
        t.elapsed(),
        report.submitted,
        report.accepted,
        report.rejected,
        report.duplicates
    );
    if let Some(p) = &report.dead_letter {
        let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
        for line in text.lines().take(3) {
            let v: serde_json::Value = serde_json::from_str(line)?;
            println!(
                "   rejected line {}: {} ({})",
                v["line"],
                v["reason"].as_str().unwrap_or(""),
                v["message"].as_str().unwrap_or("")
            );
        }
    }
    let q = |sql: &'static str| crate::tables::query(&store, &space, sql);
    println!("3. events per type and day range (SQL over the committed Parquet):");
    let batches = q("SELECT type, count(*) AS events, min(date) AS first_day, max(date) AS last_day FROM events GROUP BY type ORDER BY events DESC").await?;
    crate::cli::print_batches(g.json, &batches)?;
    println!(
        "4. top track events, and orders over 100 in the last 30 days (shredded property columns):"
    );
    let batches = q("SELECT event, count(*) AS n FROM events WHERE type = 'track' GROUP BY event ORDER BY n DESC LIMIT 6").await?;
    crate::cli::print_batches(g.json, &batches)?;
    let batches = q("SELECT count(*) AS orders_over_100, count(DISTINCT identity_key) AS users FROM events WHERE event = 'Order Completed' AND \"properties.price:num\" > 100 AND timestamp >= TIMESTAMP '2025-12-02T00:00:00Z'").await?;
    crate::cli::print_batches(g.json, &batches)?;
    let t = std::time::Instant::now();
    let r = crate::identity::resolve(&store, &space, &g.identity_rules()?, false).await?;
    println!(
        "5. resolved identities in {:.2?}: {} profiles ({} known, {} anonymous), {} linked ids, {} merges, {} accounts",
        t.elapsed(),
        r.profiles,
        r.known,
        r.profiles - r.known,
        r.ids,
        r.merges,
        r.accounts
    );
    let batches = q("SELECT p.profile_id, count(*) AS ids FROM identities i JOIN profiles p ON i.profile_id = p.profile_id WHERE p.known GROUP BY p.profile_id ORDER BY ids DESC, p.profile_id LIMIT 1").await?;
    let example = batches.first().filter(|b| b.num_rows() > 0).map(|b| {
        use arrow::array::AsArray;
        b.column(0).as_string::<i32>().value(0).to_string()
    });
    if let Some(pid) = example
        && let Some(p) =
            crate::identity::lookup::profile(&store, &space, "profile_id", &pid).await?
    {
        println!("   an example profile, merged from several devices and emails:");
        println!("{}", serde_json::to_string_pretty(&p)?);
    }
    let batches = q("SELECT count(*) AS events, count(DISTINCT profile_id) AS profiles FROM events WHERE event = 'Order Completed'").await?;
    println!(
        "6. events attributed to their current profile (SQL over the events table with profile_id):"
    );
    crate::cli::print_batches(g.json, &batches)?;
    // Audiences and computed traits from data/definitions (embedded at build time).
    let mut created = Vec::new();
    for (name, text) in SAMPLE_DEFINITIONS {
        let (def, _) = crate::lang::definition::DefinitionFile::parse(text)
            .map_err(|e| Error::Usage(format!("data/definitions/{name}: {e}")))?;
        created.push(def);
    }
    // Traits first, so audiences can refer to them.
    created.sort_by_key(|d| d.kind != crate::lang::definition::Kind::ComputedTrait);
    for d in &created {
        crate::definitions::create(&store, &space, d).await?;
    }
    let t = std::time::Instant::now();
    let reports = crate::compute::compute(&store, &space, &g.identity_rules()?, end, &[]).await?;
    println!(
        "7. computed {} definitions from data/definitions at as-of 2026-01-01 in {:.2?}:",
        reports.len(),
        t.elapsed()
    );
    for r in &reports {
        let d = created
            .iter()
            .find(|d| d.key == r.key)
            .map(|d| d.definition.as_str())
            .unwrap_or("");
        println!("   {:<24} {:<15} {:>7} {}", r.key, r.kind, r.size, d);
    }
    let batches = q("SELECT m.profile_id, round(t.value_num, 2) AS revenue_180d FROM memberships m JOIN computed_traits t ON t.profile_id = m.profile_id AND t.key = 'revenue_180d' WHERE m.audience_key = 'high_value' ORDER BY t.value_num DESC LIMIT 3").await?;
    println!("   top members of high_value with their computed revenue:");
    crate::cli::print_batches(g.json, &batches)?;
    let batches = q("SELECT m.profile_id, count(*) AS checkouts_30d FROM memberships m JOIN events e ON e.profile_id = m.profile_id AND e.event = 'Checkout Started' AND e.timestamp >= TIMESTAMP '2025-12-02T00:00:00Z' WHERE m.audience_key = 'cart_abandoners' GROUP BY m.profile_id ORDER BY checkouts_30d DESC, m.profile_id LIMIT 3").await?;
    println!(
        "   cart abandoners (a checkout with no order within 7 days after it), with their recent checkouts:"
    );
    crate::cli::print_batches(g.json, &batches)?;
    let batches = q("SELECT m.audience_key, m.account_id, t.value_str AS plan, count(l.profile_id) AS linked_profiles FROM memberships m JOIN traits t ON t.account_id = m.account_id AND t.entity = 'account' AND t.key = 'plan' LEFT JOIN account_links l ON l.account_id = m.account_id WHERE m.account_id IS NOT NULL GROUP BY m.audience_key, m.account_id, t.value_str ORDER BY m.audience_key, linked_profiles DESC, m.account_id LIMIT 6").await?;
    println!(
        "   account audiences (business accounts where all / none of the users logged in within 30 days):"
    );
    crate::cli::print_batches(g.json, &batches)?;
    // A local webhook receiver connected to an audience: the first sync is a backfill.
    let receiver =
        crate::destinations::receiver::Receiver::start(([127, 0, 0, 1], 0).into(), true, false)
            .await?;
    let synced = connect_webhook(&store, &space, DEMO_SYNCED, &receiver.url()).await?;
    let reports = crate::destinations::sync(&store, &space, &Default::default()).await?;
    println!(
        "   connected a webhook receiver at {} to '{DEMO_SYNCED}' (track calls by email, batches of 100; definition version stays {synced}, nothing recomputed):",
        receiver.url()
    );
    for r in &reports {
        println!("   {}", crate::cli::sync_line(r));
    }
    let backfill = receiver.calls().len();
    if let Some(c) = receiver.calls().first()
        && let Some(m) = c.body["batch"].get(0)
    {
        println!(
            "   first backfill call (Idempotency-Key {}), first of its {} messages:",
            c.idempotency_key.as_deref().unwrap_or("-"),
            c.body["batch"].as_array().map_or(0, |b| b.len())
        );
        println!("{}", serde_json::to_string_pretty(m)?);
    }
    // A delta batch (1% more events, the day after), then one refresh.
    let delta_path = dir.join("delta.ndjson");
    crate::cli::write_generated(
        &GenConfig {
            events: a.events,
            seed: 42,
            end,
            delta: Some(0.01),
            delta_round: 0,
        },
        Some(&delta_path),
    )?;
    let report = crate::events::ingest(
        &store,
        &space,
        vec![Input::File(delta_path)],
        IngestOptions {
            dead_letter: Some(dir.join("rejected-delta.ndjson")),
            ..Default::default()
        },
    )
    .await?;
    let refresh_at = end + 86_400_000_000;
    let r = crate::compute::refresh::refresh(
        &store,
        &space,
        &g.identity_rules()?,
        &crate::compute::refresh::RefreshOptions::at(refresh_at),
    )
    .await?;
    let incremental = r.keys.iter().filter(|k| k.mode == "incremental").count();
    println!(
        "8. ingested a delta of {} events for the next day and refreshed at as-of 2026-01-02 in {} ms \
         ({incremental} of {} definitions continued incrementally; account-level ones recompute):",
        report.accepted,
        r.millis,
        r.keys.len()
    );
    for k in &r.keys {
        println!(
            "   {:<24} {:<11} size {:>7}, re-evaluated {:>6} profiles: +{} entered, -{} exited, {} values changed",
            k.key, k.mode, k.size, k.affected, k.entered, k.exited, k.changed
        );
    }
    if r.committed.is_some() {
        let batches = q("SELECT c.audience_key, c.change, count(*) AS profiles, min(c.profile_id) AS example FROM membership_changes c WHERE c.version > 1 AND c.profile_id IS NOT NULL GROUP BY c.audience_key, c.change ORDER BY c.audience_key, c.change").await?;
        println!("   who entered and exited (membership_changes of the refreshed versions):");
        crate::cli::print_batches(g.json, &batches)?;
    }
    let reports = crate::destinations::sync(&store, &space, &Default::default()).await?;
    println!("9. synced the refresh's changes of '{DEMO_SYNCED}' to the webhook receiver:");
    for r in &reports {
        println!("   {}", crate::cli::sync_line(r));
    }
    let calls = receiver.calls();
    let mut shown = 0;
    for c in &calls[backfill..] {
        for m in c.body["batch"].as_array().into_iter().flatten() {
            if shown < 6 {
                println!(
                    "   {} {:<16} {} (messageId {})",
                    m["timestamp"].as_str().unwrap_or(""),
                    m["event"].as_str().unwrap_or(""),
                    m["context"]["externalIds"][0]["id"].as_str().unwrap_or(""),
                    m["messageId"].as_str().unwrap_or("")
                );
            }
            shown += 1;
        }
    }
    println!(
        "   {} calls received after the refresh ({} messages); `audiences destinations status` shows the cursor",
        calls.len() - backfill,
        shown
    );
    receiver.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "Try: audiences --store {} --space {} sql \"SELECT * FROM events LIMIT 5\"",
        store.url(),
        space
    );
    Ok(())
}

/// The demo audience a webhook is connected to.
const DEMO_SYNCED: &str = "cart_abandoners";

/// Add a webhook destination to `key` (an edit that keeps the definition version).
async fn connect_webhook(
    store: &crate::store::Store,
    space: &crate::store::Space,
    key: &str,
    url: &str,
) -> Result<u64> {
    let defs = crate::definitions::live(store, space).await?;
    let stored = defs
        .get(key)
        .ok_or_else(|| Error::Usage(format!("demo audience '{key}' is missing")))?;
    let file = crate::lang::definition::DefinitionFile {
        destinations: Some(vec![serde_json::json!({
            "name": "demo-webhook", "kind": "webhook", "url": url, "mode": "track",
            "id_type": "email", "batch_size": 100,
            "rate_limit": {"per_second": 1000, "burst": 100},
            "headers": {"Authorization": "Bearer demo-secret"},
        })]),
        ..stored.file.clone()
    };
    crate::definitions::edit(store, space, &file).await?;
    Ok(crate::definitions::live(store, space)
        .await?
        .get(key)
        .map_or(0, |s| s.version))
}

/// Remove everything of a space (the demo starts from scratch each run).
async fn clear_space(store: &crate::store::Store, space: &crate::store::Space) -> Result<()> {
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;
    let prefix = crate::store::keys::space_dir(space);
    let os = store.object_store();
    let metas: Vec<_> = os.list(Some(prefix.path())).try_collect().await?;
    for m in metas {
        os.delete(&m.location).await?;
    }
    Ok(())
}
