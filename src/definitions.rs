//! Stored audience and computed-trait definitions: versioned in the space's `definitions` log
//! (the definition JSON travels in the entries), keys immutable and never reused, references
//! forming a DAG.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lang::ast::{Condition, Filter, Operand, Reducer, Value};
use crate::lang::definition::{Body, DefinitionFile, Kind};
use crate::store::log::CommitDraft;
use crate::store::{CommitLog, Space, Store, TableName};

/// The definitions log.
pub const DEFINITIONS: TableName = TableName::Named("definitions");

/// One stored definition (its latest version).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    /// The definition as last written.
    pub file: DefinitionFile,
    /// Definition version (1 on create, +1 per edit).
    pub version: u64,
    /// Creation time (UTC microseconds), for `historical_backfill: false`.
    pub created_at: i64,
    /// Last change time.
    pub updated_at: i64,
    /// Deleted (the key stays reserved).
    pub deleted: bool,
}

/// All definitions of a space, by key (deleted ones included, marked).
pub async fn load(store: &Store, space: &Space) -> Result<BTreeMap<String, Stored>> {
    replay(&CommitLog::new(store, space, DEFINITIONS).entries().await?)
}

/// The live (not deleted) definitions.
pub async fn live(store: &Store, space: &Space) -> Result<BTreeMap<String, Stored>> {
    Ok(load(store, space)
        .await?
        .into_iter()
        .filter(|(_, s)| !s.deleted)
        .collect())
}

/// Keys referenced by a body: (audiences, traits).
pub fn references(body: &Body) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut a = BTreeSet::new();
    let mut t = BTreeSet::new();
    match body {
        Body::Audience(c) => cond_refs(c, &mut a, &mut t),
        Body::Trait(v) => value_refs(v, &mut a, &mut t),
    }
    (a, t)
}

fn cond_refs(c: &Condition, a: &mut BTreeSet<String>, t: &mut BTreeSet<String>) {
    match c {
        Condition::And { items } | Condition::Or { items } => {
            items.iter().for_each(|i| cond_refs(i, a, t))
        }
        Condition::Not { item }
        | Condition::Any { item }
        | Condition::All { item }
        | Condition::AllNot { item } => cond_refs(item, a, t),
        Condition::Compare { value, operand, .. } => {
            value_refs(value, a, t);
            if let Some(Operand::Value { value }) = operand {
                value_refs(value, a, t);
            }
        }
        Condition::Bare { value } => value_refs(value, a, t),
    }
}

fn value_refs(v: &Value, a: &mut BTreeSet<String>, t: &mut BTreeSet<String>) {
    match v {
        Value::Audience { key } => {
            a.insert(key.clone());
        }
        Value::Trait { key } => {
            t.insert(key.clone());
        }
        Value::Aggregate { events, reducer } => {
            for f in &events.filters {
                if let Filter::Where { condition } = f {
                    cond_refs(condition, a, t);
                }
            }
            match reducer {
                Reducer::Count => {}
                Reducer::Sum { value }
                | Reducer::Avg { value }
                | Reducer::Min { value }
                | Reducer::Max { value }
                | Reducer::Mode { value, .. }
                | Reducer::First { value }
                | Reducer::Last { value }
                | Reducer::Unique { value }
                | Reducer::UniqueCount { value } => value_refs(value, a, t),
            }
        }
        _ => {}
    }
}

/// Dependencies of every live definition on other live definitions (audience refs and
/// computed-trait refs; custom traits are not definitions).
pub fn dependencies(defs: &BTreeMap<String, Stored>) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let mut deps = BTreeMap::new();
    for (k, s) in defs {
        let body = s
            .file
            .validate()
            .map_err(|e| Error::Usage(format!("{k}: {e}")))?;
        let (a, t) = references(&body);
        let d: BTreeSet<String> = a
            .into_iter()
            .chain(t)
            .filter(|r| defs.contains_key(r))
            .collect();
        deps.insert(k.clone(), d);
    }
    Ok(deps)
}

/// A dependency order (dependencies first), or an error naming a cycle.
pub fn order(deps: &BTreeMap<String, BTreeSet<String>>) -> Result<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit(
        k: &str,
        deps: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
        out: &mut Vec<String>,
    ) -> Result<()> {
        match marks.get(k) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::Visiting) => {
                let start = stack.iter().position(|s| s == k).unwrap_or(0);
                let mut cycle = stack[start..].to_vec();
                cycle.push(k.to_string());
                return Err(Error::Usage(format!(
                    "definitions form a cycle: {}",
                    cycle.join(" → ")
                )));
            }
            None => {}
        }
        marks.insert(k.to_string(), Mark::Visiting);
        stack.push(k.to_string());
        for d in deps.get(k).into_iter().flatten() {
            visit(d, deps, marks, stack, out)?;
        }
        stack.pop();
        marks.insert(k.to_string(), Mark::Done);
        out.push(k.to_string());
        Ok(())
    }
    let mut marks = BTreeMap::new();
    let mut out = Vec::new();
    for k in deps.keys() {
        visit(k, deps, &mut marks, &mut Vec::new(), &mut out)?;
    }
    Ok(out)
}

async fn write(
    store: &Store,
    space: &Space,
    op: &str,
    key: &str,
    file: Option<&DefinitionFile>,
    check: impl Fn(&BTreeMap<String, Stored>) -> Result<()>,
) -> Result<u64> {
    let log = CommitLog::new(store, space, DEFINITIONS);
    let info = serde_json::json!({ "op": op, "key": key, "file": file });
    // Validate against the state each attempt sees, so racing writers cannot both create a key.
    for _ in 0..crate::store::log::MAX_COMMIT_ATTEMPTS {
        let snap = log.snapshot().await?;
        let defs = replay(&snap.entries)?;
        check(&defs)?;
        let draft = CommitDraft {
            operation: format!("definition-{op}"),
            adds: vec![],
            removes: vec![],
            info: info.clone(),
        };
        if let Some(e) = log.try_commit(snap.version, draft).await? {
            return Ok(e.version);
        }
    }
    Err(log.conflict_error())
}

fn replay(entries: &[crate::store::CommitEntry]) -> Result<BTreeMap<String, Stored>> {
    let mut out: BTreeMap<String, Stored> = BTreeMap::new();
    for e in entries {
        let op = e
            .info
            .get("op")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let key = e
            .info
            .get("key")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        match op {
            "create" | "edit" => {
                let file: DefinitionFile = serde_json::from_value(e.info["file"].clone())?;
                let prev = out.get(&key);
                let created_at = prev.map_or(e.committed_at, |p| p.created_at);
                // An edit of only the name or the destinations keeps the version: what is
                // evaluated did not change, so nothing is recomputed.
                let version = match prev {
                    Some(p) if !p.deleted && same_evaluation(&p.file, &file) => p.version,
                    Some(p) => p.version + 1,
                    None => 1,
                };
                out.insert(
                    key,
                    Stored {
                        file,
                        version,
                        created_at,
                        updated_at: e.committed_at,
                        deleted: false,
                    },
                );
            }
            "delete" => {
                if let Some(s) = out.get_mut(&key) {
                    s.deleted = true;
                    s.updated_at = e.committed_at;
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

fn check_graph(defs: &BTreeMap<String, Stored>, file: &DefinitionFile, body: &Body) -> Result<()> {
    let (auds, _) = references(body);
    for a in &auds {
        match defs.get(a) {
            Some(s) if !s.deleted && s.file.kind == Kind::Audience => {}
            Some(s) if !s.deleted => {
                return Err(Error::Usage(format!(
                    "{}: audience('{a}') refers to a computed trait; use trait('{a}')",
                    file.key
                )));
            }
            _ => {
                return Err(Error::Usage(format!(
                    "{}: audience('{a}') does not exist in this space",
                    file.key
                )));
            }
        }
    }
    let mut live: BTreeMap<String, Stored> = defs
        .iter()
        .filter(|(_, s)| !s.deleted)
        .map(|(k, s)| (k.clone(), s.clone()))
        .collect();
    live.insert(
        file.key.clone(),
        Stored {
            file: file.clone(),
            version: 0,
            created_at: 0,
            updated_at: 0,
            deleted: false,
        },
    );
    order(&dependencies(&live)?)?;
    Ok(())
}

/// True when two definition files evaluate the same (they differ at most in name and
/// destinations).
pub fn same_evaluation(a: &DefinitionFile, b: &DefinitionFile) -> bool {
    let strip = |f: &DefinitionFile| DefinitionFile {
        name: None,
        destinations: None,
        ..f.clone()
    };
    strip(a) == strip(b)
}

impl Stored {
    /// A copy safe to show: destination header values (secrets) replaced by `<redacted>`.
    pub fn redacted(&self) -> Stored {
        let mut s = self.clone();
        for d in s.file.destinations.iter_mut().flatten() {
            if let Some(h) = d.get_mut("headers").and_then(|h| h.as_object_mut()) {
                for v in h.values_mut() {
                    *v = serde_json::json!(crate::destinations::config::REDACTED);
                }
            }
        }
        s
    }
}

/// Header values written as `<redacted>` (a shown definition sent back) take the stored value
/// of the same header of the same destination.
fn unredact(file: &mut DefinitionFile, stored: Option<&DefinitionFile>) -> Result<()> {
    let redacted = serde_json::json!(crate::destinations::config::REDACTED);
    for d in file.destinations.iter_mut().flatten() {
        let name = d
            .get("name")
            .and_then(|n| n.as_str())
            .unwrap_or("")
            .to_string();
        let Some(h) = d.get_mut("headers").and_then(|h| h.as_object_mut()) else {
            continue;
        };
        for (k, v) in h.iter_mut() {
            if *v != redacted {
                continue;
            }
            let old = stored
                .and_then(|f| f.destinations.as_ref())
                .and_then(|ds| {
                    ds.iter()
                        .find(|o| o.get("name").and_then(|n| n.as_str()) == Some(name.as_str()))
                })
                .and_then(|o| o.get("headers"))
                .and_then(|o| o.get(k.as_str()))
                .cloned();
            match old {
                Some(o) => *v = o,
                None => {
                    return Err(Error::Usage(format!(
                        "destination '{name}': header '{k}' is {} and there is no stored value to keep; write the value",
                        crate::destinations::config::REDACTED
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Create a definition. Fails if the key exists or ever existed in the space.
pub async fn create(store: &Store, space: &Space, file: &DefinitionFile) -> Result<u64> {
    let body = file.validate().map_err(|e| Error::Usage(e.to_string()))?;
    write(store, space, "create", &file.key, Some(file), |defs| {
        if let Some(s) = defs.get(&file.key) {
            let why = if s.deleted {
                "was deleted; keys are never reused"
            } else {
                "already exists"
            };
            return Err(Error::Usage(format!("key '{}' {why}", file.key)));
        }
        check_graph(defs, file, &body)
    })
    .await
}

/// Edit a definition: a new version of an existing key of the same kind.
pub async fn edit(store: &Store, space: &Space, file: &DefinitionFile) -> Result<u64> {
    let mut file = file.clone();
    let stored = load(store, space).await?;
    let key = file.key.clone();
    unredact(&mut file, stored.get(&key).map(|s| &s.file))?;
    let file = &file;
    let body = file.validate().map_err(|e| Error::Usage(e.to_string()))?;
    write(store, space, "edit", &file.key, Some(file), |defs| {
        match defs.get(&file.key) {
            None => {
                return Err(Error::Usage(format!(
                    "key '{}' does not exist; create it first",
                    file.key
                )));
            }
            Some(s) if s.deleted => {
                return Err(Error::Usage(format!("key '{}' was deleted", file.key)));
            }
            Some(s) if s.file.kind != file.kind => {
                return Err(Error::Usage(format!(
                    "key '{}' is a {:?}; its kind cannot change",
                    file.key, s.file.kind
                )));
            }
            Some(_) => {}
        }
        check_graph(defs, file, &body)
    })
    .await
}

/// Delete a definition (its key stays reserved). Fails while another definition refers to it.
pub async fn delete(store: &Store, space: &Space, key: &str) -> Result<u64> {
    write(store, space, "delete", key, None, |defs| {
        match defs.get(key) {
            Some(s) if !s.deleted => {}
            _ => return Err(Error::Usage(format!("key '{key}' does not exist"))),
        }
        let live: BTreeMap<String, Stored> = defs
            .iter()
            .filter(|(_, s)| !s.deleted)
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        for (k, d) in dependencies(&live)? {
            if d.contains(key) {
                return Err(Error::Usage(format!(
                    "'{k}' refers to '{key}'; change or delete '{k}' first"
                )));
            }
        }
        Ok(())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(key: &str, kind: &str, text: &str) -> DefinitionFile {
        serde_json::from_value(serde_json::json!({"key": key, "kind": kind, "definition": text}))
            .unwrap()
    }

    #[tokio::test]
    async fn shown_definitions_hide_header_values_and_edits_keep_them() {
        let store = Store::memory();
        let s = Space::default();
        let with = |secret: &str| -> DefinitionFile {
            serde_json::from_value(serde_json::json!({
                "key": "a", "kind": "audience", "definition": "trait('x') = 1",
                "destinations": [{"name": "crm", "kind": "webhook", "url": "http://h/x",
                                  "headers": {"Authorization": secret}}]
            }))
            .unwrap()
        };
        create(&store, &s, &with("Bearer one")).await.unwrap();
        let shown = live(&store, &s).await.unwrap()["a"].redacted();
        let text = serde_json::to_string(&shown).unwrap();
        assert!(
            !text.contains("Bearer one") && text.contains("<redacted>"),
            "{text}"
        );
        // sending the shown file back keeps the secret, and the version (nothing evaluated changed)
        edit(&store, &s, &shown.file).await.unwrap();
        let now = &live(&store, &s).await.unwrap()["a"];
        assert_eq!(now.version, 1);
        assert_eq!(
            now.file.destinations.as_ref().unwrap()[0]["headers"]["Authorization"],
            "Bearer one"
        );
        // a new value replaces it; a redacted header with nothing stored is an error
        edit(&store, &s, &with("Bearer two")).await.unwrap();
        assert_eq!(
            live(&store, &s).await.unwrap()["a"]
                .file
                .destinations
                .as_ref()
                .unwrap()[0]["headers"]["Authorization"],
            "Bearer two"
        );
        let mut other = with("<redacted>");
        other.destinations.as_mut().unwrap()[0]["name"] = serde_json::json!("other");
        let e = edit(&store, &s, &other).await.unwrap_err().to_string();
        assert!(e.contains("no stored value"), "{e}");
        // an edit of the definition itself is a new version
        let mut changed = with("Bearer two");
        changed.definition = "trait('x') = 2".into();
        edit(&store, &s, &changed).await.unwrap();
        assert_eq!(live(&store, &s).await.unwrap()["a"].version, 2);
    }

    #[tokio::test]
    async fn keys_are_immutable_and_never_reused() {
        let store = Store::memory();
        let s = Space::default();
        create(&store, &s, &def("a", "audience", "trait('x') = 1"))
            .await
            .unwrap();
        assert!(
            create(&store, &s, &def("a", "audience", "trait('x') = 2"))
                .await
                .unwrap_err()
                .to_string()
                .contains("already exists")
        );
        edit(&store, &s, &def("a", "audience", "trait('x') = 3"))
            .await
            .unwrap();
        assert!(
            edit(
                &store,
                &s,
                &def("a", "computed_trait", "event('E').count()")
            )
            .await
            .is_err()
        );
        let all = load(&store, &s).await.unwrap();
        assert_eq!(all["a"].version, 2);
        delete(&store, &s, "a").await.unwrap();
        assert!(
            create(&store, &s, &def("a", "audience", "trait('x') = 1"))
                .await
                .unwrap_err()
                .to_string()
                .contains("never reused")
        );
        assert!(live(&store, &s).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn references_must_exist_and_form_a_dag() {
        let store = Store::memory();
        let s = Space::default();
        assert!(
            create(&store, &s, &def("b", "audience", "audience('a')"))
                .await
                .unwrap_err()
                .to_string()
                .contains("does not exist")
        );
        create(&store, &s, &def("a", "audience", "trait('x') = 1"))
            .await
            .unwrap();
        create(
            &store,
            &s,
            &def("b", "audience", "audience('a') AND trait('y') = 2"),
        )
        .await
        .unwrap();
        create(&store, &s, &def("c", "audience", "audience('b')"))
            .await
            .unwrap();
        let err = edit(&store, &s, &def("a", "audience", "audience('c')"))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cycle") && err.contains("a → c → b → a") || err.contains("→"),
            "{err}"
        );
        assert!(
            delete(&store, &s, "a")
                .await
                .unwrap_err()
                .to_string()
                .contains("refers to 'a'")
        );
        let defs = live(&store, &s).await.unwrap();
        assert_eq!(
            order(&dependencies(&defs).unwrap()).unwrap(),
            vec!["a", "b", "c"]
        );
    }
}
