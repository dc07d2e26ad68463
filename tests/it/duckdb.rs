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
root, keys, t0 = sys.argv[1], sys.argv[2], sys.argv[3]
con = duckdb.connect()
con.execute("SET threads TO 2")
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
}
print(json.dumps({k: sorted(r[0] for r in con.execute(v).fetchall()) for k, v in q.items()}))
"#;

/// BENCH.md queries 1-4 and 7: our memberships equal DuckDB's SQL over the same Parquet, with
/// the same resolved profile ids (exported from our identities table).
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
    // The resolved identity keys, for DuckDB.
    let keys = audiences::tables::query(&store, &space, "SELECT identity_key, profile_id FROM identities WHERE id_type IN ('user_id', 'anonymous_id')").await.unwrap();
    let schema = keys[0].schema();
    let batch = arrow::compute::concat_batches(&schema, &keys).unwrap();
    let keys_path = dir.path().join("keys.parquet");
    std::fs::write(
        &keys_path,
        audiences::events::writer::encode_parquet(
            &batch,
            audiences::events::writer::writer_properties(None),
        )
        .unwrap(),
    )
    .unwrap();
    let duck: serde_json::Value = serde_json::from_str(&python(
        DUCK_AUDIENCES,
        &[
            root.to_str().unwrap(),
            keys_path.to_str().unwrap(),
            "2026-01-01 00:00:00+00",
        ],
    ))
    .unwrap();
    for key in [
        "repeat_buyers",
        "big_repeat_buyers",
        "viewed_not_bought",
        "lapsed",
        "high_value",
    ] {
        let (_, batches) = audiences::compute::members(&store, &space, key, None)
            .await
            .unwrap()
            .unwrap();
        let mut ours: Vec<String> = Vec::new();
        for b in &batches {
            use arrow::array::AsArray;
            ours.extend(
                b.column_by_name("profile_id")
                    .unwrap()
                    .as_string::<i32>()
                    .iter()
                    .flatten()
                    .map(String::from),
            );
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
