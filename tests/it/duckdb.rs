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
