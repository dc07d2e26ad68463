//! The identity graph: flat matching of each event's external ids, in processing order, with
//! blocked values, per-type limits and priority-ordered demotion (SPEC §3); plus the custom
//! traits and account links that ride along with identify and group calls.
//!
//! Profiles get dense indexes in creation order; a merge points the younger profile at the
//! older one (which keeps its id) and records the merge. Profile ids are derived from the
//! highest-priority id of the event that created the profile, so they are stable across runs.

use std::collections::BTreeMap;

use hashbrown::HashMap;

use super::rules::IdentityRules;

/// Dense profile index.
pub type ProfileIdx = u32;

/// One external id: (type, value).
pub type ExternalId = (String, String);

/// A profile of the graph.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// Stable id (`p-` and 16 hex digits).
    pub id: String,
    /// The profile this one was merged into (itself when canonical).
    pub parent: ProfileIdx,
    /// Creation time (event timestamp, UTC microseconds).
    pub created_at: i64,
    /// The message that created it.
    pub first_message_id: String,
    /// How many ids of each type (index into [`Graph::id_types`]) the profile holds (only
    /// meaningful on canonical profiles; the ids themselves live in [`Graph::ids`]).
    pub id_counts: Vec<(u16, u32)>,
}

/// Where an id was first seen.
#[derive(Debug, Clone, PartialEq)]
pub struct IdInfo {
    /// Owning profile (possibly merged away; resolve with [`Graph::canonical`]).
    pub profile: ProfileIdx,
    /// First time seen.
    pub first_seen: i64,
    /// The message it was first seen in (shared by the ids one message linked).
    pub first_message_id: std::sync::Arc<str>,
}

/// A recorded merge.
#[derive(Debug, Clone, PartialEq)]
pub struct Merge {
    /// The merged-away profile id.
    pub from: String,
    /// The surviving profile id.
    pub into: String,
    /// When (event timestamp).
    pub at: i64,
    /// The triggering message.
    pub message_id: String,
}

/// A trait value with the time that set it (latest wins; ties by message id).
#[derive(Debug, Clone, PartialEq)]
pub struct TraitValue {
    /// JSON text of the value.
    pub value: String,
    /// Event timestamp.
    pub updated_at: i64,
    /// The message that set it (shared by the traits one message set).
    pub message_id: std::sync::Arc<str>,
}

impl TraitValue {
    fn newer_than(&self, other: &TraitValue) -> bool {
        other.older_than(self.updated_at, &self.message_id)
    }

    /// Was this value set before message (`at`, `message_id`)?
    fn older_than(&self, at: i64, message_id: &str) -> bool {
        (at, message_id) > (self.updated_at, &*self.message_id)
    }

    /// Set `key` in `traits` to `value` from message (`at`, `message_id`) unless a newer
    /// message set it; true when it changed.
    fn set(
        traits: &mut BTreeMap<String, TraitValue>,
        key: &str,
        value: &str,
        at: i64,
        message_id: &std::sync::Arc<str>,
    ) -> bool {
        let tv = || TraitValue {
            value: value.to_string(),
            updated_at: at,
            message_id: message_id.clone(),
        };
        match traits.get_mut(key) {
            Some(old) if !old.older_than(at, message_id) => false,
            Some(old) => {
                *old = tv();
                true
            }
            None => {
                traits.insert(key.to_string(), tv());
                true
            }
        }
    }
}

/// The whole identity state of a space.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    /// Profiles by dense index.
    pub profiles: Vec<Profile>,
    /// Id type names, indexed by the type numbers of [`Profile::id_counts`].
    pub id_types: Vec<String>,
    /// Every linked id: type → value → where it belongs (two levels, so lookups borrow).
    pub ids: HashMap<String, HashMap<String, IdInfo>>,
    /// Merges in the order they happened.
    pub merges: Vec<Merge>,
    /// Custom traits per profile (keyed by the profile that received them; fold through
    /// [`Graph::canonical`]).
    pub profile_traits: HashMap<ProfileIdx, BTreeMap<String, TraitValue>>,
    /// Account traits by group id.
    pub account_traits: BTreeMap<String, BTreeMap<String, TraitValue>>,
    /// Account links: profile → group id → first linked time.
    pub account_links: HashMap<ProfileIdx, BTreeMap<String, i64>>,
    /// Hashes of id lists known to be fully linked to one profile (a cache; not persisted).
    pub stable_sets: hashbrown::HashSet<u64>,
    /// Profiles that gained ids, traits, account links or merged profiles since the graph was
    /// loaded (not persisted): with the profiles whose canonical profile or known flag moved,
    /// what an incremental commit rewrites.
    pub touched: hashbrown::HashSet<ProfileIdx>,
    /// Accounts whose traits changed since the graph was loaded (not persisted).
    pub touched_accounts: hashbrown::HashSet<String>,
}

/// What one event brings to the graph.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IdentityEvent {
    /// Message id.
    pub message_id: String,
    /// Event timestamp.
    pub timestamp: i64,
    /// External ids (blocked values are ignored by the graph).
    pub ids: Vec<ExternalId>,
    /// Profile traits (identify): key → JSON text.
    pub traits: Vec<(String, String)>,
    /// Group call: the account id and its traits.
    pub group: Option<(String, Vec<(String, String)>)>,
    /// Alias call: the previous id (a known `user_id`, else treated as an `anonymous_id`).
    pub alias_previous: Option<String>,
    /// The id list is known to occur for the first time in this run (the first occurrence of
    /// a plain call's list): the cache of fully linked lists can neither hold it nor need it.
    pub distinct: bool,
}

/// Add `n` to the count of `t` in a short list of (type, count).
fn add_count<K: PartialEq>(counts: &mut Vec<(K, u32)>, t: K, n: u32) {
    match counts.iter_mut().find(|c| c.0 == t) {
        Some(c) => c.1 += n,
        None => counts.push((t, n)),
    }
}

fn profile_id_for(id_type: &str, value: &str) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(id_type.as_bytes());
    h.update(&[0]);
    h.update(value.as_bytes());
    format!("p-{:016x}", h.digest())
}

impl Graph {
    /// The canonical profile of `p`.
    pub fn canonical(&self, mut p: ProfileIdx) -> ProfileIdx {
        while self.profiles[p as usize].parent != p {
            p = self.profiles[p as usize].parent;
        }
        p
    }

    /// The canonical profile owning an id.
    pub fn lookup(&self, id_type: &str, value: &str) -> Option<ProfileIdx> {
        self.ids
            .get(id_type)
            .and_then(|m| m.get(value))
            .map(|i| self.canonical(i.profile))
    }

    /// Touch what resolving `ev` will read (its ids' entries and profiles), so the loads are
    /// under way before it is resolved; changes nothing.
    pub fn warm(&self, ev: &IdentityEvent) {
        for (t, v) in &ev.ids {
            if let Some(i) = self.ids.get(t.as_str()).and_then(|m| m.get(v.as_str())) {
                std::hint::black_box(self.profiles[i.profile as usize].parent);
            }
        }
    }

    /// Process one event; returns the canonical profile it resolved to (None without ids).
    pub fn process(&mut self, rules: &IdentityRules, ev: &IdentityEvent) -> Option<ProfileIdx> {
        // Fast path: an id list already seen fully linked to one profile cannot change the
        // graph (ids never leave a profile and merges only combine), so it resolves by lookup.
        let set_hash =
            (!ev.distinct && ev.alias_previous.is_none() && !ev.ids.is_empty()).then(|| {
                let mut h = xxhash_rust::xxh3::Xxh3::new();
                for (t, v) in &ev.ids {
                    h.update(t.as_bytes());
                    h.update(&[0]);
                    h.update(v.as_bytes());
                    h.update(&[0]);
                }
                h.digest()
            });
        let cached = set_hash
            .filter(|h| self.stable_sets.contains(h))
            .and_then(|_| ev.ids.iter().find_map(|(t, v)| self.lookup(t, v)));
        let resolved = match cached {
            Some(p) => Some(p),
            None => {
                let mut ids: Vec<(&str, &str)> = ev
                    .ids
                    .iter()
                    .filter(|(_, v)| !rules.is_blocked(v))
                    .map(|(t, v)| (t.as_str(), v.as_str()))
                    .collect();
                if let Some(prev) = &ev.alias_previous
                    && !rules.is_blocked(prev)
                {
                    let t = if self.lookup("user_id", prev).is_some() {
                        "user_id"
                    } else {
                        "anonymous_id"
                    };
                    ids.push((t, prev.as_str()));
                }
                ids.sort_by(|a, b| {
                    rules
                        .rank(a.0)
                        .cmp(&rules.rank(b.0))
                        .then_with(|| a.1.cmp(b.1))
                });
                ids.dedup();
                let wanted = ids.len();
                let resolved = loop {
                    if ids.is_empty() {
                        break None;
                    }
                    // each id is looked up once; fits and apply reuse what it found
                    let found: Vec<Option<ProfileIdx>> =
                        ids.iter().map(|(t, v)| self.lookup(t, v)).collect();
                    let mut matched: Vec<ProfileIdx> = found.iter().flatten().copied().collect();
                    matched.sort_unstable();
                    matched.dedup();
                    if self.fits(rules, &matched, &ids, &found) {
                        break Some(self.apply(&matched, &ids, &found, ev));
                    }
                    // Demote: drop the event's lowest-priority id and retry.
                    ids.pop();
                };
                if let (Some(h), Some(_)) = (set_hash, resolved)
                    && ids.len() == wanted
                {
                    self.stable_sets.insert(h);
                }
                resolved
            }
        };
        // one shared copy of the message id for every trait this message sets
        let shared_id = std::cell::OnceCell::new();
        let message_id = || shared_id.get_or_init(|| ev.message_id.as_str().into());
        if let Some(p) = resolved {
            if !ev.traits.is_empty() {
                let slot = self.profile_traits.entry(p).or_default();
                let mut changed = false;
                for (k, v) in &ev.traits {
                    changed |= TraitValue::set(slot, k, v, ev.timestamp, message_id());
                }
                if changed {
                    self.touched.insert(p);
                }
            }
            if let Some((group, _)) = &ev.group {
                let links = self.account_links.entry(p).or_default();
                let t = links.entry(group.clone()).or_insert(ev.timestamp);
                if ev.timestamp <= *t {
                    *t = ev.timestamp;
                    self.touched.insert(p);
                }
            }
        }
        if let Some((group, traits)) = &ev.group {
            let slot = self.account_traits.entry(group.clone()).or_default();
            let mut changed = false;
            for (k, v) in traits {
                changed |= TraitValue::set(slot, k, v, ev.timestamp, message_id());
            }
            if changed {
                self.touched_accounts.insert(group.clone());
            }
        }
        resolved
    }

    /// Would the union of `matched` plus the new ids respect every per-type limit?
    /// `found` holds the canonical profile of each of `ids`, if linked.
    fn fits(
        &self,
        rules: &IdentityRules,
        matched: &[ProfileIdx],
        ids: &[(&str, &str)],
        found: &[Option<ProfileIdx>],
    ) -> bool {
        let mut counts: Vec<(&str, u32)> = Vec::new();
        for p in matched {
            for &(t, n) in &self.profiles[*p as usize].id_counts {
                add_count(&mut counts, self.id_types[t as usize].as_str(), n);
            }
        }
        for (&(t, _), f) in ids.iter().zip(found) {
            if f.is_none() {
                add_count(&mut counts, t, 1);
            }
        }
        counts.iter().all(|(t, n)| *n <= rules.limit(t))
    }

    /// The type number of an id type, interning it on first use.
    fn type_number(&mut self, t: &str) -> u16 {
        match self.id_types.iter().position(|x| x == t) {
            Some(i) => i as u16,
            None => {
                self.id_types.push(t.to_string());
                (self.id_types.len() - 1) as u16
            }
        }
    }

    /// Count one more id of type `t` on profile `p`.
    pub fn count_id(&mut self, p: ProfileIdx, t: &str) {
        let t = self.type_number(t);
        add_count(&mut self.profiles[p as usize].id_counts, t, 1);
    }

    /// How many ids of type `t` the canonical profile of `p` holds.
    pub fn id_count(&self, p: ProfileIdx, t: &str) -> u32 {
        let Some(t) = self.id_types.iter().position(|x| x == t) else {
            return 0;
        };
        self.profiles[self.canonical(p) as usize]
            .id_counts
            .iter()
            .find(|c| c.0 as usize == t)
            .map_or(0, |c| c.1)
    }

    fn apply(
        &mut self,
        matched: &[ProfileIdx],
        ids: &[(&str, &str)],
        found: &[Option<ProfileIdx>],
        ev: &IdentityEvent,
    ) -> ProfileIdx {
        let survivor = match matched.first() {
            Some(p) => *p,
            None => {
                let idx = self.profiles.len() as ProfileIdx;
                let (t, v) = &ids[0];
                self.profiles.push(Profile {
                    id: profile_id_for(t, v),
                    parent: idx,
                    created_at: ev.timestamp,
                    first_message_id: ev.message_id.clone(),
                    id_counts: Vec::new(),
                });
                idx
            }
        };
        for &other in matched.iter().skip(1) {
            self.merge(other, survivor, ev);
        }
        let mut message_id: Option<std::sync::Arc<str>> = None;
        for (&(t, v), _) in ids.iter().zip(found).filter(|(_, f)| f.is_none()) {
            if let hashbrown::hash_map::EntryRef::Vacant(slot) =
                self.ids.entry_ref(t).or_default().entry_ref(v)
            {
                slot.insert(IdInfo {
                    profile: survivor,
                    first_seen: ev.timestamp,
                    first_message_id: message_id
                        .get_or_insert_with(|| ev.message_id.as_str().into())
                        .clone(),
                });
                self.count_id(survivor, t);
                self.touched.insert(survivor);
            }
        }
        survivor
    }

    fn merge(&mut self, from: ProfileIdx, into: ProfileIdx, ev: &IdentityEvent) {
        let moved = std::mem::take(&mut self.profiles[from as usize].id_counts);
        for (t, n) in moved {
            add_count(&mut self.profiles[into as usize].id_counts, t, n);
        }
        self.profiles[from as usize].parent = into;
        self.touched.extend([from, into]);
        if let Some(traits) = self.profile_traits.remove(&from) {
            let slot = self.profile_traits.entry(into).or_default();
            for (k, tv) in traits {
                match slot.get(&k) {
                    Some(old) if !tv.newer_than(old) => {}
                    _ => {
                        slot.insert(k, tv);
                    }
                }
            }
        }
        if let Some(links) = self.account_links.remove(&from) {
            let slot = self.account_links.entry(into).or_default();
            for (g, t) in links {
                let e = slot.entry(g).or_insert(t);
                *e = (*e).min(t);
            }
        }
        self.merges.push(Merge {
            from: self.profiles[from as usize].id.clone(),
            into: self.profiles[into as usize].id.clone(),
            at: ev.timestamp,
            message_id: ev.message_id.clone(),
        });
    }

    /// Canonical profile and [`Graph::is_known`] of every profile, in index order: one
    /// sequential pass over the profiles instead of a lookup per profile.
    pub fn canonical_known(&self) -> Vec<(ProfileIdx, bool)> {
        let known_type: Vec<bool> = self
            .id_types
            .iter()
            .map(|t| matches!(t.as_str(), "user_id" | "email"))
            .collect();
        let own: Vec<bool> = self
            .profiles
            .iter()
            .map(|p| {
                p.id_counts
                    .iter()
                    .any(|(t, n)| *n > 0 && known_type.get(*t as usize).copied().unwrap_or(false))
            })
            .collect();
        (0..self.profiles.len() as ProfileIdx)
            .map(|p| {
                let c = self.canonical(p);
                (c, own[c as usize])
            })
            .collect()
    }

    /// True when the canonical profile has a `user_id` or an `email`.
    pub fn is_known(&self, p: ProfileIdx) -> bool {
        // one pass over the profile's few counts (this runs for every profile per commit)
        self.profiles[self.canonical(p) as usize]
            .id_counts
            .iter()
            .any(|(t, n)| {
                *n > 0 && matches!(self.id_types[*t as usize].as_str(), "user_id" | "email")
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(msg: &str, ts: i64, ids: &[(&str, &str)]) -> IdentityEvent {
        IdentityEvent {
            message_id: msg.into(),
            timestamp: ts,
            ids: ids
                .iter()
                .map(|(t, v)| (t.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn anonymous_then_identified_is_one_profile() {
        let r = IdentityRules::default();
        let mut g = Graph::default();
        let a = g
            .process(&r, &ev("1", 1, &[("anonymous_id", "a1")]))
            .unwrap();
        let b = g
            .process(
                &r,
                &ev("2", 2, &[("user_id", "u1"), ("anonymous_id", "a1")]),
            )
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(g.profiles.len(), 1);
        assert!(g.is_known(a));
    }

    #[test]
    fn two_devices_then_login_merge_and_the_older_survives() {
        let r = IdentityRules::default();
        let mut g = Graph::default();
        let p1 = g
            .process(&r, &ev("1", 1, &[("anonymous_id", "a1")]))
            .unwrap();
        let p2 = g
            .process(&r, &ev("2", 2, &[("anonymous_id", "a2")]))
            .unwrap();
        assert_ne!(p1, p2);
        g.process(
            &r,
            &ev("3", 3, &[("user_id", "u1"), ("anonymous_id", "a1")]),
        );
        let p = g
            .process(
                &r,
                &ev("4", 4, &[("user_id", "u1"), ("anonymous_id", "a2")]),
            )
            .unwrap();
        assert_eq!(p, p1);
        assert_eq!(g.lookup("anonymous_id", "a2"), Some(p1));
        assert_eq!(g.merges.len(), 1);
        assert_eq!(g.merges[0].into, g.profiles[p1 as usize].id);
    }

    #[test]
    fn shared_device_with_user_id_limit_demotes_the_anonymous_id() {
        let r = IdentityRules::default();
        let mut g = Graph::default();
        let p1 = g
            .process(
                &r,
                &ev("1", 1, &[("user_id", "u1"), ("anonymous_id", "a1")]),
            )
            .unwrap();
        let p2 = g
            .process(
                &r,
                &ev("2", 2, &[("user_id", "u2"), ("anonymous_id", "a1")]),
            )
            .unwrap();
        assert_ne!(p1, p2);
        assert_eq!(g.lookup("anonymous_id", "a1"), Some(p1));
        assert_eq!(g.lookup("user_id", "u2"), Some(p2));
        assert!(g.merges.is_empty());
    }

    #[test]
    fn blocked_values_link_nothing() {
        let r = IdentityRules::default();
        let mut g = Graph::default();
        let p1 = g
            .process(&r, &ev("1", 1, &[("user_id", "u1"), ("email", "null")]))
            .unwrap();
        let p2 = g
            .process(&r, &ev("2", 2, &[("user_id", "u2"), ("email", "null")]))
            .unwrap();
        assert_ne!(p1, p2);
        assert_eq!(
            g.process(
                &r,
                &ev(
                    "3",
                    3,
                    &[("anonymous_id", "anonymous"), ("user_id", "0000")]
                )
            ),
            None
        );
    }

    #[test]
    fn the_sixth_anonymous_id_starts_a_new_profile() {
        let r = IdentityRules::default();
        let mut g = Graph::default();
        let p = g.process(&r, &ev("0", 0, &[("user_id", "u1")])).unwrap();
        for i in 1..=5 {
            assert_eq!(
                g.process(
                    &r,
                    &ev(
                        &i.to_string(),
                        i,
                        &[("user_id", "u1"), ("anonymous_id", &format!("a{i}"))]
                    )
                ),
                Some(p)
            );
        }
        assert_eq!(g.id_count(p, "anonymous_id"), 5);
        // a6 cannot join: demoted, the event stays with u1's profile, a6 unlinked.
        assert_eq!(
            g.process(
                &r,
                &ev("6", 6, &[("user_id", "u1"), ("anonymous_id", "a6")])
            ),
            Some(p)
        );
        assert_eq!(g.lookup("anonymous_id", "a6"), None);
        let q = g
            .process(&r, &ev("7", 7, &[("anonymous_id", "a6")]))
            .unwrap();
        assert_ne!(p, q);
    }

    #[test]
    fn alias_links_previous_id_and_user_id() {
        let r = IdentityRules::default();
        let mut g = Graph::default();
        let p = g
            .process(&r, &ev("1", 1, &[("anonymous_id", "a1")]))
            .unwrap();
        let mut e = ev("2", 2, &[("user_id", "u1")]);
        e.alias_previous = Some("a1".into());
        assert_eq!(g.process(&r, &e), Some(p));
        assert_eq!(g.lookup("user_id", "u1"), Some(p));
    }

    #[test]
    fn traits_latest_wins_whatever_the_order() {
        let r = IdentityRules::default();
        let mut g = Graph::default();
        let mut e = ev("b", 20, &[("user_id", "u1")]);
        e.traits = vec![("plan".into(), "\"pro\"".into())];
        g.process(&r, &e);
        let mut e = ev("a", 10, &[("user_id", "u1")]);
        e.traits = vec![
            ("plan".into(), "\"free\"".into()),
            ("age".into(), "30".into()),
        ];
        let p = g.process(&r, &e).unwrap();
        let t = &g.profile_traits[&p];
        assert_eq!(t["plan"].value, "\"pro\"");
        assert_eq!(t["age"].value, "30");
    }
}
