//! SQL-visible behaviour pinned in `.slt` files (sqllogictest), run against a store built from
//! `tests/slt/fixture.ndjson` and the definitions below, computed at 2026-01-01.
//! `AUDIENCES_SLT_COMPLETE=1 cargo test --test it slt` regenerates the expected output.

use arrow::array::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use audiences::store::{Space, Store};
use sqllogictest::{DBOutput, DefaultColumnType};

#[derive(Debug)]
struct SqlError(String);

impl std::fmt::Display for SqlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SqlError {}

struct Db {
    store: Store,
}

fn rows(batches: &[RecordBatch]) -> Result<Vec<Vec<String>>, SqlError> {
    let opts = FormatOptions::default().with_null("NULL");
    let mut out = Vec::new();
    for b in batches {
        let fmts = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SqlError(e.to_string()))?;
        for r in 0..b.num_rows() {
            out.push(fmts.iter().map(|f| f.value(r).to_string()).collect());
        }
    }
    Ok(out)
}

#[async_trait::async_trait]
impl sqllogictest::AsyncDB for Db {
    type Error = SqlError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, SqlError> {
        let ctx = audiences::tables::session(&self.store, &Space::default())
            .await
            .map_err(|e| SqlError(e.to_string()))?;
        let df = ctx.sql(sql).await.map_err(|e| SqlError(e.to_string()))?;
        let n = df.schema().fields().len();
        let batches = df.collect().await.map_err(|e| SqlError(e.to_string()))?;
        Ok(DBOutput::Rows {
            types: vec![DefaultColumnType::Any; n],
            rows: rows(&batches)?,
        })
    }

    async fn shutdown(&mut self) {}
}

async fn fixture() -> Store {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let store = Store::memory();
    let dir = tempfile::tempdir().unwrap();
    crate::common::ingest_files(
        &store,
        "default",
        &[root.join("tests/slt/fixture.ndjson")],
        &dir.path().join("d"),
    )
    .await;
    let space = Space::default();
    for f in ["revenue_180d", "repeat_buyers", "q7_high_value"] {
        let text =
            std::fs::read_to_string(root.join(format!("data/definitions/{f}.json"))).unwrap();
        let (def, _) = audiences::lang::definition::DefinitionFile::parse(&text).unwrap();
        audiences::definitions::create(&store, &space, &def)
            .await
            .unwrap();
    }
    audiences::compute::compute(
        &store,
        &space,
        &audiences::identity::IdentityRules::default(),
        crate::common::END,
        &[],
    )
    .await
    .unwrap();
    store
}

#[tokio::test(flavor = "multi_thread")]
async fn slt_files() {
    let store = fixture().await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/slt");
    let mut files: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "slt"))
        .collect();
    files.sort();
    assert!(files.len() >= 2);
    for f in files {
        let s = store.clone();
        let mut runner = sqllogictest::Runner::new(move || {
            let store = s.clone();
            async move { Ok::<_, SqlError>(Db { store }) }
        });
        if std::env::var("AUDIENCES_SLT_COMPLETE").is_ok() {
            runner
                .update_test_file(
                    &f,
                    " ",
                    sqllogictest::default_validator,
                    sqllogictest::default_normalizer,
                    sqllogictest::default_column_validator,
                )
                .await
                .unwrap();
        } else {
            runner
                .run_file_async(&f)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        }
    }
}
