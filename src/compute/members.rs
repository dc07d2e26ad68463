//! The members of an audience version as sorted columns, and the merge that makes the next
//! version from the previous one and a fresh evaluation (of every profile, or of the profiles
//! a refresh re-evaluates), with who entered and who exited.
//!
//! Member keys are profile ids (account ids for an account audience), kept sorted and unique,
//! which is also the order of a members file: the merge walks the previous version once and
//! looks up each fresh member by a galloping search, so a refresh that re-evaluates 1% of the
//! profiles costs one pass over the previous version's columns, not a map of its strings.

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
    UInt32Array,
};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, TimestampMicrosecondType};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;

use super::bits::{Bits, gallop};
use super::{VersionRef, schema};
use crate::error::{Error, Result};
use crate::lang::definition::Level;
use crate::store::Store;

/// The merge's walk over the previous version.
struct Walk<'a> {
    prev: &'a MemberSet,
    /// Whether each previous member is replaced.
    drop: Vec<bool>,
    /// (0: previous, 1: fresh; row) of each member of the next version.
    rows: Vec<(usize, usize)>,
    /// Each member's entry time.
    since: Vec<i64>,
    /// Previous members that exited.
    exited: Vec<u32>,
}

impl Walk<'_> {
    /// Previous members `range`, none of them fresh: kept, or exited when replaced.
    fn keep(&mut self, range: std::ops::Range<usize>) {
        for r in range {
            if self.drop[r] {
                self.exited.push(r as u32);
            } else {
                self.rows.push((0, r));
                self.since.push(self.prev.entered.value(r));
            }
        }
    }
}

/// The members of an audience version, sorted by member key, each key once.
#[derive(Debug, Clone)]
pub(crate) struct MemberSet {
    /// Whether the keys are account ids (an account audience).
    pub accounts: bool,
    /// Profile ids, or account ids; sorted, unique.
    pub keys: StringArray,
    /// Profile indexes (None for accounts).
    pub idx: Vec<Option<i64>>,
    /// When each member entered (null in a fresh evaluation: it has no history).
    pub entered: TimestampMicrosecondArray,
}

/// Which members of the previous version a fresh evaluation replaces.
pub(crate) enum Replace<'a> {
    /// All of them: the evaluation covered every profile.
    All,
    /// The members with these profile indexes (and no others).
    Profiles(&'a HashSet<i64>),
    /// The members with these account ids.
    Accounts(&'a HashSet<String>),
}

/// The next version of an audience: its members and its changes against the previous one.
pub(crate) struct Next {
    /// The members, `entered` set (kept from the previous version, or the as-of time).
    pub members: MemberSet,
    /// The members that entered (in key order).
    pub entered: MemberSet,
    /// The members of the previous version that exited (in key order).
    pub exited: MemberSet,
}

impl Next {
    /// The profile indexes that entered or exited.
    pub fn changed_profiles(&self) -> HashSet<i64> {
        self.entered
            .idx
            .iter()
            .chain(&self.exited.idx)
            .flatten()
            .copied()
            .collect()
    }
}

fn utc(a: TimestampMicrosecondArray) -> TimestampMicrosecondArray {
    a.with_timezone("UTC")
}

impl MemberSet {
    /// No members.
    pub fn empty(level: Level) -> MemberSet {
        MemberSet {
            accounts: level == Level::Accounts,
            keys: StringArray::from(Vec::<&str>::new()),
            idx: Vec::new(),
            entered: utc(TimestampMicrosecondArray::from(Vec::<i64>::new())),
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// The members of committed version `v` (none when `v` is None).
    pub async fn read_opt(
        store: &Store,
        v: Option<&VersionRef>,
        level: Level,
    ) -> Result<MemberSet> {
        match v {
            Some(v) => MemberSet::read(store, v).await,
            None => Ok(MemberSet::empty(level)),
        }
    }

    /// The members of committed version `v` (its file is written sorted by member key; sorted
    /// here if not).
    pub async fn read(store: &Store, v: &VersionRef) -> Result<MemberSet> {
        // only the columns a member set holds (the others repeat one value per row)
        const COLUMNS: &[&str] = &["profile_id", "profile_idx", "entered_at", "account_id"];
        let started = std::time::Instant::now();
        let bytes = store
            .get(&crate::store::keys::Key::from_committed(&v.data.path))
            .await?;
        let batches = super::decode_parallel(bytes, Some(COLUMNS), &v.data.path).await?;
        let target = schema("members");
        let mut cols = Vec::with_capacity(COLUMNS.len());
        for name in COLUMNS {
            let f = target.field_with_name(name)?;
            let parts = batches
                .iter()
                .map(|b| match b.column_by_name(name) {
                    Some(c) if c.data_type() == f.data_type() => Ok(Arc::clone(c)),
                    Some(c) => Err(Error::Usage(format!(
                        "members file {}: column {name} is {}, not {}",
                        v.data.path,
                        c.data_type(),
                        f.data_type()
                    ))),
                    None if f.is_nullable() => {
                        Ok(arrow::array::new_null_array(f.data_type(), b.num_rows()))
                    }
                    None => Err(Error::Usage(format!(
                        "members file {} has no column {name}",
                        v.data.path
                    ))),
                })
                .collect::<Result<Vec<ArrayRef>>>()?;
            cols.push(match parts.as_slice() {
                [] => arrow::array::new_empty_array(f.data_type()),
                [one] => Arc::clone(one),
                _ => {
                    let refs: Vec<&dyn Array> = parts.iter().map(|c| c.as_ref()).collect();
                    arrow::compute::concat(&refs)?
                }
            });
        }
        let [profile_id, profile_idx, entered, account_id] =
            <[ArrayRef; 4]>::try_from(cols).expect("one array per column");
        let accounts = account_id.null_count() < account_id.len();
        let mut key = if accounts { account_id } else { profile_id };
        let (mut profile_idx, mut entered) = (profile_idx, entered);
        // members without a key of this kind (none in a well-formed file) are left out
        if key.null_count() > 0 {
            let keep = arrow::compute::is_not_null(&key)?;
            key = arrow::compute::filter(&key, &keep)?;
            profile_idx = arrow::compute::filter(&profile_idx, &keep)?;
            entered = arrow::compute::filter(&entered, &keep)?;
        }
        let idx: Vec<Option<i64>> = if accounts {
            vec![None; key.len()]
        } else {
            profile_idx.as_primitive::<Int64Type>().iter().collect()
        };
        let entered = entered.as_primitive::<TimestampMicrosecondType>().clone();
        let set = MemberSet {
            accounts,
            keys: key.as_string::<i32>().clone(),
            idx,
            entered: utc(entered),
        }
        .sorted()?;
        tracing::debug!(
            key = %v.key,
            version = v.version,
            members = set.len(),
            millis = started.elapsed().as_millis() as u64,
            "members read"
        );
        Ok(set)
    }

    /// The members a compiled audience returned (`profile_idx, profile_id` rows, or
    /// `account_id` rows at account level).
    pub fn evaluated(batches: &[RecordBatch], level: Level) -> Result<MemberSet> {
        let mut keys: Vec<ArrayRef> = Vec::new();
        let mut idx: Vec<Option<i64>> = Vec::new();
        for b in batches {
            match level {
                Level::Users => {
                    let i = b
                        .column(0)
                        .as_primitive_opt::<Int64Type>()
                        .ok_or_else(|| Error::Usage("plan returned no profile_idx".into()))?;
                    let p = b
                        .column(1)
                        .as_string_opt::<i32>()
                        .ok_or_else(|| Error::Usage("plan returned no profile_id".into()))?;
                    let keep = arrow::compute::and(
                        &arrow::compute::is_not_null(i)?,
                        &arrow::compute::is_not_null(p)?,
                    )?;
                    keys.push(arrow::compute::filter(p, &keep)?);
                    let i = arrow::compute::filter(i, &keep)?;
                    idx.extend(i.as_primitive::<Int64Type>().iter());
                }
                Level::Accounts => {
                    let a = arrow::compute::cast(b.column(0), &DataType::Utf8)?;
                    let keep = arrow::compute::is_not_null(&a)?;
                    let a = arrow::compute::filter(&a, &keep)?;
                    idx.extend(std::iter::repeat_n(None, a.len()));
                    keys.push(a);
                }
            }
        }
        let keys = match keys.len() {
            0 => StringArray::from(Vec::<&str>::new()),
            _ => {
                let refs: Vec<&dyn Array> = keys.iter().map(|a| a.as_ref()).collect();
                arrow::compute::concat(&refs)?.as_string::<i32>().clone()
            }
        };
        let n = keys.len();
        MemberSet {
            accounts: level == Level::Accounts,
            keys,
            idx,
            entered: utc(TimestampMicrosecondArray::new_null(n)),
        }
        .sorted()
    }

    /// Sorted by key, each key once (of rows with the same key, the last one).
    fn sorted(self) -> Result<MemberSet> {
        let k = &self.keys;
        if (1..k.len()).all(|r| k.value(r - 1) < k.value(r)) {
            return Ok(self);
        }
        let mut order: Vec<u32> = (0..k.len() as u32).collect();
        order.sort_by(|a, b| k.value(*a as usize).cmp(k.value(*b as usize)));
        let mut last: Vec<u32> = Vec::with_capacity(order.len());
        for r in order {
            match last.last_mut() {
                Some(l) if k.value(*l as usize) == k.value(r as usize) => *l = r,
                _ => last.push(r),
            }
        }
        self.take(&last)
    }

    fn take(&self, rows: &[u32]) -> Result<MemberSet> {
        let ix = UInt32Array::from(rows.to_vec());
        Ok(MemberSet {
            accounts: self.accounts,
            keys: arrow::compute::take(&self.keys, &ix, None)?
                .as_string::<i32>()
                .clone(),
            idx: rows.iter().map(|r| self.idx[*r as usize]).collect(),
            entered: arrow::compute::take(&self.entered, &ix, None)?
                .as_primitive::<TimestampMicrosecondType>()
                .clone(),
        })
    }

    /// Whether each member is among those `replace` names.
    fn replaced(&self, replace: &Replace) -> Vec<bool> {
        match replace {
            Replace::All => vec![true; self.len()],
            Replace::Profiles(set) => {
                let bits = Bits::of(set.iter().copied());
                self.idx
                    .iter()
                    .map(|i| i.is_some_and(|i| bits.contains(i)))
                    .collect()
            }
            Replace::Accounts(set) => self
                .keys
                .iter()
                .map(|k| k.is_some_and(|k| set.contains(k)))
                .collect(),
        }
    }

    /// The first row at or after `from` whose key is not below `target` (a galloping search:
    /// cheap when it is near, as for a fresh member among those of a full evaluation).
    fn seek(&self, from: usize, target: &str) -> usize {
        gallop(from, self.len(), |r| self.keys.value(r) < target)
    }

    /// The next version: the previous members (`self`) that `replace` does not name, and the
    /// `fresh` ones (a fresh member keeps the entry time it had; a new one enters at `as_of`).
    /// Entered: fresh members not in the previous version; exited: replaced members not fresh.
    pub fn next(&self, fresh: &MemberSet, replace: &Replace, as_of: i64) -> Result<Next> {
        let mut walk = Walk {
            prev: self,
            drop: self.replaced(replace),
            rows: Vec::with_capacity(self.len() + fresh.len()),
            since: Vec::with_capacity(self.len() + fresh.len()),
            exited: Vec::new(),
        };
        let mut entered: Vec<u32> = Vec::new();
        let mut i = 0;
        for j in 0..fresh.len() {
            let key = fresh.keys.value(j);
            let at = self.seek(i, key);
            walk.keep(i..at);
            i = at;
            let since = if i < self.len() && self.keys.value(i) == key {
                i += 1;
                self.entered.value(i - 1)
            } else {
                entered.push(j as u32);
                as_of
            };
            walk.rows.push((1, j));
            walk.since.push(since);
        }
        walk.keep(i..self.len());
        let keys =
            arrow::compute::interleave(&[&self.keys as &dyn Array, &fresh.keys], &walk.rows)?;
        let idx = walk
            .rows
            .iter()
            .map(|&(s, r)| if s == 0 { self.idx[r] } else { fresh.idx[r] })
            .collect();
        Ok(Next {
            members: MemberSet {
                accounts: fresh.accounts,
                keys: keys.as_string::<i32>().clone(),
                idx,
                entered: utc(TimestampMicrosecondArray::from(walk.since)),
            },
            entered: fresh.take(&entered)?,
            exited: self.take(&walk.exited)?,
        })
    }

    /// The `profile_id` and `account_id` columns of these members.
    pub fn key_columns(&self) -> (ArrayRef, ArrayRef) {
        super::key_columns(Arc::new(self.keys.clone()), self.accounts)
    }

    /// Register these members as `__members_<key>` (for audience references): a
    /// `profile_idx` column, or `account_id` for an account audience at `level`.
    pub fn register(&self, ctx: &SessionContext, key: &str, level: Level) -> Result<()> {
        let (schema, col): (_, ArrayRef) = match level {
            Level::Users => (
                Schema::new(vec![Field::new("profile_idx", DataType::Int64, false)]),
                Arc::new(Int64Array::from_iter_values(
                    self.idx.iter().flatten().copied(),
                )),
            ),
            Level::Accounts => (
                Schema::new(vec![Field::new("account_id", DataType::Utf8, false)]),
                Arc::new(StringArray::from_iter_values(self.keys.iter().flatten())),
            ),
        };
        let schema = Arc::new(schema);
        let batch = RecordBatch::try_new(Arc::clone(&schema), vec![col])?;
        let name = format!("__members_{key}");
        let _ = ctx.deregister_table(name.as_str());
        ctx.register_table(
            name.as_str(),
            Arc::new(MemTable::try_new(schema, vec![vec![batch]])?),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;

    fn set(rows: &[(String, Option<i64>, i64)], accounts: bool) -> MemberSet {
        MemberSet {
            accounts,
            keys: StringArray::from_iter_values(rows.iter().map(|r| r.0.as_str())),
            idx: rows.iter().map(|r| r.1).collect(),
            entered: utc(TimestampMicrosecondArray::from(
                rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            )),
        }
    }

    fn rows(m: &MemberSet) -> Vec<(String, Option<i64>, i64)> {
        (0..m.len())
            .map(|r| (m.keys.value(r).to_string(), m.idx[r], m.entered.value(r)))
            .collect()
    }

    fn keys(m: &MemberSet) -> Vec<(String, Option<i64>)> {
        (0..m.len())
            .map(|r| (m.keys.value(r).to_string(), m.idx[r]))
            .collect()
    }

    /// The merge against maps (the way it was first written): the previous members not
    /// replaced, then the fresh ones over them; entered and exited by key.
    #[test]
    fn next_version_agrees_with_a_map_merge() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let as_of = 1_000_000;
        for round in 0..300 {
            let accounts = round % 5 == 4;
            let universe = rng.random_range(1..300usize);
            // profile p has key "p{p}" (a few share a key: a renamed profile's id moved)
            let key = |p: usize| format!("p{:03}", if p % 17 == 3 { p - 1 } else { p });
            let mut old: BTreeMap<String, (Option<i64>, i64)> = BTreeMap::new();
            for p in 0..universe {
                if rng.random_bool(0.4) {
                    let idx = (!accounts).then_some(p as i64);
                    old.insert(key(p), (idx, rng.random_range(0..as_of)));
                }
            }
            let affected: HashSet<i64> = (0..universe as i64)
                .filter(|_| rng.random_bool(0.2))
                .collect();
            let replaced_accounts: HashSet<String> =
                affected.iter().map(|p| key(*p as usize)).collect();
            let replace = match round % 3 {
                0 => Replace::All,
                _ if accounts => Replace::Accounts(&replaced_accounts),
                _ => Replace::Profiles(&affected),
            };
            let pool: Vec<usize> = match replace {
                Replace::All => (0..universe).collect(),
                _ => affected.iter().map(|p| *p as usize).collect(),
            };
            // fresh rows unsorted, with a repeated key (the last one counts)
            let mut fresh_rows: Vec<(String, Option<i64>)> = pool
                .iter()
                .filter(|_| rng.random_bool(0.5))
                .map(|p| (key(*p), (!accounts).then_some(*p as i64)))
                .collect();
            if let Some(r) = fresh_rows.first().cloned() {
                fresh_rows.push((r.0, r.1.map(|i| i + 1000)));
            }
            let batch = RecordBatch::try_from_iter(match accounts {
                false => vec![
                    (
                        "profile_idx",
                        Arc::new(Int64Array::from_iter(fresh_rows.iter().map(|r| r.1))) as ArrayRef,
                    ),
                    (
                        "profile_id",
                        Arc::new(StringArray::from_iter_values(
                            fresh_rows.iter().map(|r| r.0.as_str()),
                        )),
                    ),
                ],
                true => vec![(
                    "account_id",
                    Arc::new(StringArray::from_iter_values(
                        fresh_rows.iter().map(|r| r.0.as_str()),
                    )) as ArrayRef,
                )],
            })
            .unwrap();
            let level = if accounts {
                Level::Accounts
            } else {
                Level::Users
            };
            let fresh = MemberSet::evaluated(&[batch], level).unwrap();
            let prev = set(
                &old.iter()
                    .map(|(k, (i, t))| (k.clone(), *i, *t))
                    .collect::<Vec<_>>(),
                accounts,
            );
            let got = prev.next(&fresh, &replace, as_of).unwrap();
            // the maps
            let fresh_map: BTreeMap<String, Option<i64>> = fresh_rows.into_iter().collect();
            let mut want: BTreeMap<String, Option<i64>> = old
                .iter()
                .filter(|(k, (i, _))| match &replace {
                    Replace::All => false,
                    Replace::Profiles(a) => i.is_none_or(|i| !a.contains(&i)),
                    Replace::Accounts(a) => !a.contains(*k),
                })
                .map(|(k, (i, _))| (k.clone(), *i))
                .collect();
            want.extend(fresh_map.clone());
            assert_eq!(
                keys(&fresh),
                fresh_map.clone().into_iter().collect::<Vec<_>>()
            );
            let want_rows: Vec<(String, Option<i64>, i64)> = want
                .iter()
                .map(|(k, i)| (k.clone(), *i, old.get(k).map_or(as_of, |o| o.1)))
                .collect();
            assert_eq!(rows(&got.members), want_rows, "round {round}");
            let entered: Vec<(String, Option<i64>)> = want
                .iter()
                .filter(|(k, _)| !old.contains_key(*k))
                .map(|(k, i)| (k.clone(), *i))
                .collect();
            let exited: Vec<(String, Option<i64>)> = old
                .iter()
                .filter(|(k, _)| !want.contains_key(*k))
                .map(|(k, (i, _))| (k.clone(), *i))
                .collect();
            assert_eq!(keys(&got.entered), entered, "round {round}");
            assert_eq!(keys(&got.exited), exited, "round {round}");
            assert!(!accounts || got.members.accounts);
        }
    }
}
