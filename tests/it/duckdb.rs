//! DuckDB (an engine we did not write) reads our events Parquet directly, and its counts per
//! type and day and its property sums match ours.

use audiences::store::{S3Options, Store};

use crate::common::*;

const DUCK: &str = r#"
import duckdb, json, sys
root = sys.argv[1]
con = duckdb.connect()
con.execute("SET threads TO 2")
src = f"read_parquet('{root}/spaces/default/events/*/*.parquet', hive_partitioning = true, union_by_name = true)"
rows = con.execute(f"SELECT type, CAST(date AS VARCHAR) AS d, count(*) FROM {src} GROUP BY ALL ORDER BY ALL").fetchall()
price = con.execute(f'SELECT round(sum("properties.price:num"), 2), count(DISTINCT identity_key) FROM {src} WHERE event = \'Order Completed\'').fetchone()
print(json.dumps({"rows": [[t, d, n] for t, d, n in rows], "price": price[0], "users": price[1]}))
"#;

#[tokio::test(flavor = "multi_thread")]
async fn duckdb_reads_our_parquet_and_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = Store::open(root.to_str().unwrap(), &S3Options::default()).unwrap();
    let p = dir.path().join("x.ndjson");
    std::fs::write(&p, generated(20_000, 77)).unwrap();
    let r = ingest_files(&store, "default", &[p], &dir.path().join("d")).await;
    assert_eq!(r.accepted, 20_000);
    let duck: serde_json::Value =
        serde_json::from_str(&python(DUCK, &[root.to_str().unwrap()])).unwrap();
    let ours = sql_rows(
        &store,
        "default",
        "SELECT type, date AS d, count(*) AS n FROM events GROUP BY type, date ORDER BY type, d",
    )
    .await;
    let ours: Vec<serde_json::Value> = ours
        .iter()
        .map(|r| serde_json::json!([r["type"], r["d"], r["n"]]))
        .collect();
    assert_eq!(serde_json::Value::Array(ours), duck["rows"]);
    let p = sql_rows(
        &store,
        "default",
        r#"SELECT round(sum("properties.price:num"), 2) AS p, count(DISTINCT identity_key) AS u FROM events WHERE event = 'Order Completed'"#,
    )
    .await;
    assert_eq!(p[0]["p"].as_f64(), duck["price"].as_f64());
    assert_eq!(p[0]["u"], duck["users"]);
}

const DUCK_AUDIENCES: &str = r#"
import duckdb, json, sys
root, keys, t0, links, atraits = sys.argv[1:6]
con = duckdb.connect()
con.execute("SET threads TO 2")
con.execute(f"CREATE VIEW links AS SELECT DISTINCT account_id, profile_id FROM read_parquet('{links}')")
con.execute(f"CREATE VIEW atraits AS SELECT * FROM read_parquet('{atraits}')")
con.execute(f"CREATE VIEW raw AS SELECT * FROM read_parquet('{root}/spaces/default/events/*/*.parquet', hive_partitioning = true, union_by_name = true)")
con.execute(f"CREATE VIEW ev AS SELECT raw.*, k.profile_id FROM raw JOIN read_parquet('{keys}') k USING (identity_key)")
T0 = f"TIMESTAMPTZ '{t0}'"
q = {
 "repeat_buyers": f"SELECT profile_id FROM ev WHERE event = 'Order Completed' AND timestamp >= {T0} - INTERVAL 30 DAY AND timestamp <= {T0} GROUP BY profile_id HAVING count(*) >= 2",
 "big_repeat_buyers": f"SELECT profile_id FROM ev WHERE event = 'Order Completed' AND \"properties.price:num\" > 100 AND timestamp >= {T0} - INTERVAL 30 DAY AND timestamp <= {T0} GROUP BY profile_id HAVING count(*) >= 2",
 "viewed_not_bought": f"""SELECT profile_id FROM ev WHERE timestamp >= {T0} - INTERVAL 30 DAY AND timestamp <= {T0} GROUP BY profile_id
     HAVING count(*) FILTER (WHERE event = 'Product Viewed' AND "properties.price:num" > 100) >= 1
        AND count(*) FILTER (WHERE event = 'Order Completed') = 0""",
 "lapsed": f"""SELECT profile_id FROM ev WHERE event = 'Logged In' AND timestamp >= {T0} - INTERVAL 90 DAY AND timestamp <= {T0} GROUP BY profile_id
     HAVING count(*) FILTER (WHERE timestamp <= {T0} - INTERVAL 30 DAY) > 0 AND count(*) FILTER (WHERE timestamp >= {T0} - INTERVAL 30 DAY) = 0""",
 "high_value": f"SELECT profile_id FROM ev WHERE event = 'Order Completed' AND timestamp >= {T0} - INTERVAL 180 DAY AND timestamp <= {T0} GROUP BY profile_id HAVING sum(\"properties.revenue:num\") > 500",
 # 5: the first Order Completed strictly after each Checkout Started, at most 7 days later
 "checkout_funnel": f"""WITH a AS (SELECT profile_id, timestamp ts FROM ev WHERE event = 'Checkout Started' AND timestamp >= {T0} - INTERVAL 90 DAY AND timestamp <= {T0}),
     b AS (SELECT profile_id, timestamp ts FROM ev WHERE event = 'Order Completed' AND timestamp <= {T0})
     SELECT DISTINCT a.profile_id FROM a ASOF JOIN b ON a.profile_id = b.profile_id AND a.ts < b.ts WHERE b.ts <= a.ts + INTERVAL 7 DAY""",
 # 6: the same, matching product ids
 "bought_viewed_product": f"""WITH a AS (SELECT profile_id, "properties.product_id:str" pid, timestamp ts FROM ev WHERE event = 'Product Viewed' AND timestamp >= {T0} - INTERVAL 30 DAY AND timestamp <= {T0}),
     b AS (SELECT profile_id, "properties.product_id:str" pid, timestamp ts FROM ev WHERE event = 'Order Completed' AND timestamp <= {T0})
     SELECT DISTINCT a.profile_id FROM a ASOF JOIN b ON a.profile_id = b.profile_id AND a.pid = b.pid AND a.ts < b.ts WHERE b.ts <= a.ts + INTERVAL 7 DAY""",
}
# 8: business accounts by how many of their linked profiles logged in within 30 days
acc = con.execute(f"""WITH lp AS (SELECT l.account_id, l.profile_id,
        EXISTS (SELECT 1 FROM ev WHERE ev.profile_id = l.profile_id AND event = 'Logged In' AND timestamp >= {T0} - INTERVAL 30 DAY AND timestamp <= {T0}) AS hit
      FROM links l),
    agg AS (SELECT account_id, count(*) AS n, count(*) FILTER (WHERE hit) AS m FROM lp GROUP BY account_id)
    SELECT t.account_id, coalesce(n, 0), coalesce(m, 0) FROM atraits t LEFT JOIN agg USING (account_id) WHERE t.plan = 'business'""").fetchall()
out = {k: sorted(r[0] for r in con.execute(v).fetchall()) for k, v in q.items()}
out["business_logged_in_all"] = sorted(a for a, n, m in acc if n > 0 and m == n)
out["business_logged_in_any"] = sorted(a for a, n, m in acc if m > 0)
out["business_logged_in_none"] = sorted(a for a, n, m in acc if m == 0)
print(json.dumps(out))
"#;

/// chDB's `windowFunnel` in `strict_increase` mode over the same Parquet (BENCH.md query 5:
/// two steps, where its first-step-anchored window and our parent-relative one coincide).
const CHDB_FUNNEL: &str = r#"
import chdb, json, sys
root, keys, t0 = sys.argv[1], sys.argv[2], sys.argv[3]
T0 = f"toDateTime64('{t0}', 6, 'UTC')"
sql = f"""SELECT profile_id FROM (
    SELECT e.event AS event, e.timestamp AS ts, k.profile_id AS profile_id
    FROM file('{root}/spaces/default/events/*/*.parquet', Parquet) e
    JOIN file('{keys}', Parquet) k ON e.identity_key = k.identity_key
    WHERE e.timestamp <= {T0})
  GROUP BY profile_id
  HAVING windowFunnel(604800000000, 'strict_increase')(toUInt64(toUnixTimestamp64Micro(ts)),
      event = 'Checkout Started' AND ts >= {T0} - INTERVAL 90 DAY, event = 'Order Completed') = 2
  SETTINGS max_threads = 2"""
rows = chdb.query(sql, "JSONEachRow").bytes().decode().splitlines()
print(json.dumps(sorted(json.loads(r)["profile_id"] for r in rows if r.strip())))
"#;

/// Write the result of a SQL query over the store as a Parquet file (for the peers).
async fn export(store: &Store, sql: &str, path: &std::path::Path) {
    let space = audiences::store::Space::default();
    let batches = audiences::tables::query(store, &space, sql).await.unwrap();
    let schema = batches[0].schema();
    let batch = arrow::compute::concat_batches(&schema, &batches).unwrap();
    std::fs::write(
        path,
        audiences::events::writer::encode_parquet(
            &batch,
            audiences::events::writer::writer_properties(None),
        )
        .unwrap(),
    )
    .unwrap();
}

/// BENCH.md queries 1-8: our memberships equal DuckDB's SQL over the same Parquet (ASOF joins
/// for the funnel and the dynamic reference), with the same resolved profile ids, account links
/// and account plans (exported from our tables); chDB's `windowFunnel` agrees on query 5.
#[tokio::test(flavor = "multi_thread")]
async fn bench_queries_agree_with_duckdb() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = Store::open(root.to_str().unwrap(), &S3Options::default()).unwrap();
    let p = dir.path().join("x.ndjson");
    std::fs::write(&p, generated(30_000, 13)).unwrap();
    ingest_files(&store, "default", &[p], &dir.path().join("d")).await;
    let space = audiences::store::Space::default();
    let defs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/definitions");
    let mut files: Vec<_> = [
        "revenue_180d",
        "repeat_buyers",
        "q2_big_repeat_buyers",
        "q3_viewed_not_bought",
        "q4_lapsed",
        "q7_high_value",
        "q5_checkout_funnel",
        "q6_bought_viewed_product",
        "q8_business_all",
        "q8_business_any",
        "q8_business_none",
    ]
    .iter()
    .map(|f| defs.join(format!("{f}.json")))
    .collect();
    files.sort_by_key(|f| !f.ends_with("revenue_180d.json"));
    for f in files {
        let (mut def, _) = audiences::lang::definition::DefinitionFile::parse(
            &std::fs::read_to_string(&f).unwrap(),
        )
        .unwrap();
        def.include_anonymous = true;
        audiences::definitions::create(&store, &space, &def)
            .await
            .unwrap();
    }
    let as_of = END;
    audiences::compute::compute(
        &store,
        &space,
        &audiences::identity::IdentityRules::default(),
        as_of,
        &[],
    )
    .await
    .unwrap();
    // The resolved identity keys, account links and account plans, for the peers.
    let keys_path = dir.path().join("keys.parquet");
    export(&store, "SELECT identity_key, profile_id FROM identities WHERE id_type IN ('user_id', 'anonymous_id')", &keys_path).await;
    let links_path = dir.path().join("links.parquet");
    export(
        &store,
        "SELECT account_id, profile_id FROM account_links",
        &links_path,
    )
    .await;
    let atraits_path = dir.path().join("atraits.parquet");
    export(&store, "SELECT account_id, value_str AS plan FROM traits WHERE entity = 'account' AND key = 'plan'", &atraits_path).await;
    let duck: serde_json::Value = serde_json::from_str(&python(
        DUCK_AUDIENCES,
        &[
            root.to_str().unwrap(),
            keys_path.to_str().unwrap(),
            "2026-01-01 00:00:00+00",
            links_path.to_str().unwrap(),
            atraits_path.to_str().unwrap(),
        ],
    ))
    .unwrap();
    let chdb: serde_json::Value = serde_json::from_str(&python(
        CHDB_FUNNEL,
        &[
            root.to_str().unwrap(),
            keys_path.to_str().unwrap(),
            "2026-01-01 00:00:00",
        ],
    ))
    .unwrap();
    assert_eq!(
        chdb, duck["checkout_funnel"],
        "chDB windowFunnel and DuckDB disagree on query 5"
    );
    for key in [
        "repeat_buyers",
        "big_repeat_buyers",
        "viewed_not_bought",
        "lapsed",
        "high_value",
        "checkout_funnel",
        "bought_viewed_product",
        "business_logged_in_all",
        "business_logged_in_any",
        "business_logged_in_none",
    ] {
        let (_, batches) = audiences::compute::members(&store, &space, key, None)
            .await
            .unwrap()
            .unwrap();
        let mut ours: Vec<String> = Vec::new();
        for b in &batches {
            use arrow::array::AsArray;
            for c in ["profile_id", "account_id"] {
                ours.extend(
                    b.column_by_name(c)
                        .unwrap()
                        .as_string::<i32>()
                        .iter()
                        .flatten()
                        .map(String::from),
                );
            }
        }
        ours.sort();
        let theirs: Vec<String> = duck[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert!(
            !ours.is_empty(),
            "{key} is empty: the comparison would prove nothing"
        );
        assert_eq!(ours, theirs, "{key}");
    }
}
