//! An in-process [`KeyStore`]: one read-mostly lock over three indexes.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::future::{Future, ready};
use std::sync::{Arc, PoisonError, RwLock};

use jiff::{SignedDuration, Timestamp};
use smol_str::SmolStr;

use super::{ActiveLimit, InsertOutcome, KeyRecord, KeyStore, ProjectId, RecordId, WorkspaceId};
use crate::backend::BackendError;
use crate::clock::signed_duration;
use crate::format::KeyId;
use crate::hash::StoredDigest;
use crate::secret::{Digest, DigestBuildHasher};

type DigestMap<V> = HashMap<Digest, V, DigestBuildHasher>;
/// Ids are random but caller-supplied: a keyed hash keeps probing fast and
/// flood-resistant.
type IdMap<K, V> = HashMap<K, V, ahash::RandomState>;

// Three indexes over the same records; the shared prefix names them.
#[allow(clippy::struct_field_names)]
struct Inner {
    by_id: IdIndex,
    by_digest: DigestMap<Arc<KeyRecord>>,
    /// `hashbrown` so that a lookup borrows the format name (see
    /// [`KeyIdQuery`]) instead of allocating a `String` per request.
    by_key_id: hashbrown::HashMap<(SmolStr, KeyId), RecordId, ahash::RandomState>,
    /// Records of each (workspace, project) that are not revoked, so the
    /// active-key cap is checked against one project's records that may
    /// count, not all of them: a revoked record never counts again, and a
    /// loop of creating and revoking keys would otherwise make each create
    /// walk a retention's worth of revoked ones (under the write lock that
    /// every lookup waits for).
    by_project: IdMap<(WorkspaceId, ProjectId), Vec<RecordId>>,
    /// The replacement of each rolled record: a record has one active
    /// replacement at most. An entry goes when either record is forgotten
    /// (a freed id taken again by another record replaces nothing).
    replaced_by: IdMap<RecordId, RecordId>,
    /// `replaced_by` the other way round: replacement to replaced.
    replaces: IdMap<RecordId, RecordId>,
    /// How long a record stays after it ends (expires or is revoked).
    retention: SignedDuration,
    /// (end, id hash) of every record that expires or was revoked (its
    /// [`KeyRecord::ended_at`]), soonest first: no copy of the id. An entry whose record is
    /// gone or has a different end since is stale and skipped; an id that
    /// shares the hash is forgotten only if it ended as long ago.
    expiries: BinaryHeap<Reverse<(Timestamp, u64)>>,
}

impl Inner {
    fn with_capacity(n: usize) -> Self {
        Self {
            by_id: IdIndex::with_capacity(n),
            by_digest: DigestMap::with_capacity_and_hasher(n, DigestBuildHasher::default()),
            by_key_id: hashbrown::HashMap::default(),
            by_project: IdMap::default(),
            replaced_by: IdMap::default(),
            replaces: IdMap::default(),
            retention: signed_duration(super::EXPIRED_RETENTION),
            expiries: BinaryHeap::new(),
        }
    }

    /// Forgets every record expired or revoked for longer than the
    /// retention at `now`: pops due entries off the heap, so the cost is
    /// that of the records forgotten (and a heap peek when there are none).
    ///
    /// `now` comes from the caller (the time a new record is stamped with);
    /// when anything is due, the system clock bounds it, so a record stamped
    /// ahead of the real time never makes the store forget keys still in
    /// use. (Read only then: most inserts forget nothing.)
    fn forget_expired(&mut self, now: Timestamp) {
        // Compared as durations since the epoch: `Timestamp` arithmetic
        // checks its range through a general path that cost more than the
        // rest of this check (every insert makes it). A cutoff before
        // `Timestamp::MIN` is due for nothing, as the checked form was.
        let due = |heap: &BinaryHeap<Reverse<(Timestamp, u64)>>, cutoff: SignedDuration| {
            heap.peek().is_some_and(|Reverse((at, _))| at.as_duration() <= cutoff)
        };
        let cutoff = now.as_duration().saturating_sub(self.retention);
        if !due(&self.expiries, cutoff) {
            return;
        }
        let cutoff = now.min(Timestamp::now()).as_duration().saturating_sub(self.retention);
        while due(&self.expiries, cutoff) {
            let Some(Reverse((at, hash))) = self.expiries.pop() else { break };
            // Almost always one record, whose id is copied inline: no list
            // of them is allocated per record forgotten.
            loop {
                let ended = self.by_id.with_hash(hash).find(|r| r.ended_at() == Some(at));
                let Some(id) = ended.map(|r| r.id.clone()) else { break };
                self.remove(&id);
            }
        }
    }

    /// Schedules the record whose id hashes to `hash` to be forgotten a
    /// retention after `at`. An end that moved earlier (a revocation, a
    /// shortened expiry) leaves the old entry stale until its time; when
    /// stale entries outnumber the records, the heap is rebuilt from the
    /// records (amortized O(1) per push), so a loop of create-with-expiry
    /// and revoke does not grow it for a year.
    fn schedule(&mut self, at: Timestamp, hash: u64) {
        self.expiries.push(Reverse((at, hash)));
        if self.expiries.len() > 2 * self.by_id.len() + 64 {
            // The table keeps its peak capacity; shrink it so a store that
            // emptied does not walk its peak size at every rebuild.
            self.by_id.table.shrink_to_fit(|(h, _)| *h);
            self.expiries = self
                .by_id
                .table
                .iter()
                .filter_map(|(h, r)| r.ended_at().map(|at| Reverse((at, *h))))
                .collect();
        }
    }

    /// Removes record `id` from every index.
    fn remove(&mut self, id: &RecordId) {
        let Some(r) = self.by_id.remove(id) else { return };
        self.by_digest.remove(r.digest.digest());
        if let Some(new) = self.replaced_by.remove(id) {
            self.replaces.remove(&new);
        }
        if let Some(old) = self.replaces.remove(id) {
            self.replaced_by.remove(&old);
        }
        if let Some(kid) = r.key_id {
            self.by_key_id.remove(&KeyIdQuery(&r.format, &kid));
        }
        self.unlist(&r);
    }

    /// Drops record `r` from its project's index (revoked, or forgotten).
    fn unlist(&mut self, r: &KeyRecord) {
        if let Some(p) = &r.tenant.project {
            let key = (r.tenant.workspace.clone(), p.clone());
            if let Some(ids) = self.by_project.get_mut(&key) {
                ids.retain(|x| *x != r.id);
                if ids.is_empty() {
                    self.by_project.remove(&key);
                }
            }
        }
    }
}

impl Default for Inner {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

/// A borrowed `(format, key id)` key of `by_key_id`. It hashes exactly as
/// the owned tuple does (`str` and `String` hash alike), so lookups need no
/// allocation.
#[derive(Hash)]
struct KeyIdQuery<'a>(&'a str, &'a KeyId);

impl hashbrown::Equivalent<(SmolStr, KeyId)> for KeyIdQuery<'_> {
    fn equivalent(&self, key: &(SmolStr, KeyId)) -> bool {
        self.0 == key.0 && *self.1 == key.1
    }
}

/// Records by id. Each entry keeps its id's hash, so growing the table
/// never follows a pointer to re-hash an id string, and the id is not
/// copied into a separate key: the record is the entry.
struct IdIndex {
    table: hashbrown::HashTable<(u64, Arc<KeyRecord>)>,
    hasher: ahash::RandomState,
}

impl Default for IdIndex {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl IdIndex {
    fn with_capacity(n: usize) -> Self {
        Self { table: hashbrown::HashTable::with_capacity(n), hasher: ahash::RandomState::new() }
    }

    fn get(&self, id: &RecordId) -> Option<&Arc<KeyRecord>> {
        self.find(self.hash(id), id)
    }

    /// The record with id `id`, whose hash is `h`.
    fn find(&self, h: u64, id: &RecordId) -> Option<&Arc<KeyRecord>> {
        self.table.find(h, |(eh, r)| *eh == h && r.id == *id).map(|(_, r)| r)
    }

    /// The hash `id` is filed under.
    fn hash(&self, id: &RecordId) -> u64 {
        self.hasher.hash_one(id)
    }

    /// The records filed under `hash` (one, bar a collision).
    fn with_hash(&self, hash: u64) -> impl Iterator<Item = &Arc<KeyRecord>> {
        self.table.iter_hash(hash).filter(move |(eh, _)| *eh == hash).map(|(_, r)| r)
    }

    /// Removes and returns the record with id `id`.
    fn remove(&mut self, id: &RecordId) -> Option<Arc<KeyRecord>> {
        let h = self.hash(id);
        let entry = self.table.find_entry(h, |(eh, r)| *eh == h && r.id == *id).ok()?;
        Some(entry.remove().0.1)
    }

    /// Inserts `record`, whose id hashes to `h`, replacing the record with
    /// the same id.
    fn insert(&mut self, h: u64, record: Arc<KeyRecord>) {
        match self.table.entry(h, |(eh, r)| *eh == h && r.id == record.id, |(eh, _)| *eh) {
            hashbrown::hash_table::Entry::Occupied(mut e) => e.get_mut().1 = record,
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert((h, record));
            }
        }
    }

    fn len(&self) -> usize {
        self.table.len()
    }

    fn records(&self) -> impl Iterator<Item = &Arc<KeyRecord>> {
        self.table.iter().map(|(_, r)| r)
    }
}

impl Inner {
    /// Replaces the stored record, whose id hashes to `h` (all indexes
    /// point at the new `Arc`).
    fn replace(&mut self, h: u64, record: Arc<KeyRecord>) {
        self.by_digest.insert(*record.digest.digest(), Arc::clone(&record));
        self.by_id.insert(h, record);
    }
}

/// A [`KeyStore`] in process memory, safe for concurrent use.
///
/// Lookups take a shared read lock and probe one hash map, so they run in
/// parallel; writes (insert, revoke, last-use batches) take the write lock
/// briefly. Futures are always ready. Nothing survives a restart: use it for
/// tests, demos and single-instance deployments.
///
/// Cheap to clone (one `Arc`): clones share one set of records, so the
/// `KeyManager`, the `Authenticator` and the `Portal` each take a clone of
/// the same store, and a key one creates is the key the others find.
#[derive(Default, Clone)]
pub struct MemoryKeyStore {
    inner: Arc<RwLock<Inner>>,
}

impl std::fmt::Debug for MemoryKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryKeyStore").field("records", &self.len()).finish()
    }
}

impl MemoryKeyStore {
    /// An empty store.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store with room for `n` records.
    #[must_use]
    pub fn with_capacity(n: usize) -> Self {
        Self { inner: Arc::new(RwLock::new(Inner::with_capacity(n))) }
    }

    /// Keeps records for `retention` after they expire or are revoked
    /// (default [`EXPIRED_RETENTION`](super::EXPIRED_RETENTION), one day):
    /// until then they are listed and refused as expired or revoked;
    /// afterwards the next insert forgets them (judged at the earlier of
    /// its record's creation time and the system clock), so short-lived
    /// credentials such as portal access tokens do not accumulate. The
    /// store keeps its expiring
    /// records in a heap by expiry, so an insert pays only for the records
    /// it forgets: no scan, no pause. Clones share the records, so the
    /// setting applies to every clone.
    #[must_use]
    pub fn expired_retention(self, retention: std::time::Duration) -> Self {
        self.write(|i| i.retention = signed_duration(retention));
        self
    }

    /// Number of records, revoked ones included.
    #[must_use]
    pub fn len(&self) -> usize {
        self.read(|i| i.by_id.len())
    }

    /// Whether the store holds no record.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    // A panic while holding the lock cannot leave the maps half-updated
    // (every write is a few infallible inserts), so a poisoned lock is
    // still consistent and is used as is.
    fn read<T>(&self, f: impl FnOnce(&Inner) -> T) -> T {
        f(&self.inner.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn write<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.write().unwrap_or_else(PoisonError::into_inner))
    }

    /// Synchronous lookup by digest: the hot path of authentication.
    #[must_use]
    pub fn get_by_digest(&self, digest: &StoredDigest) -> Option<Arc<KeyRecord>> {
        self.read(|i| {
            i.by_digest.get(digest.digest()).filter(|r| r.digest == *digest).map(Arc::clone)
        })
    }

    fn insert_sync(&self, record: Arc<KeyRecord>, limit: Option<ActiveLimit>) -> InsertOutcome {
        self.write(|i| {
            // A new record is stamped with the time it is made (bounded by
            // the system clock: an import, a caller's clock running fast).
            i.forget_expired(record.created_at);
            // One hash of the id serves the check, the expiry heap and the
            // insert.
            let h = i.by_id.hash(&record.id);
            if i.by_id.find(h, &record.id).is_some() {
                return InsertOutcome::DuplicateId;
            }
            if i.by_digest.contains_key(record.digest.digest()) {
                return InsertOutcome::DuplicateKey;
            }
            if let Some(kid) = record.key_id
                && i.by_key_id.contains_key(&KeyIdQuery(&record.format, &kid))
            {
                return InsertOutcome::DuplicateKey;
            }
            let project_key =
                record.tenant.project.clone().map(|p| (record.tenant.workspace.clone(), p));
            if let Some(limit) = &limit
                && let Some(old) = &limit.replacing
                && !i.by_id.get(old).is_some_and(|r| r.is_active(limit.now))
            {
                return InsertOutcome::ReplacingInactive;
            }
            let replacing = limit.as_ref().and_then(|l| Some((l.replacing.as_ref()?, l.now)));
            if let Some((old, now)) = replacing
                && i.replaced_by
                    .get(old)
                    .and_then(|n| i.by_id.get(n))
                    .is_some_and(|r| r.is_active(now))
            {
                return InsertOutcome::AlreadyReplaced;
            }
            let replacing = replacing.map(|(old, _)| old.clone());
            if let (Some(limit), Some(pk)) = (limit.filter(ActiveLimit::is_capped), &project_key) {
                let active = i.by_project.get(pk).map_or(0, |ids| {
                    ids.iter()
                        .filter(|id| limit.replacing.as_ref() != Some(*id))
                        .filter_map(|id| i.by_id.get(id))
                        .filter(|r| r.is_active(limit.now))
                        .count()
                });
                if active >= limit.max as usize {
                    return InsertOutcome::LimitReached { max: limit.max };
                }
            }
            if let Some(kid) = record.key_id {
                i.by_key_id.insert((record.format.clone(), kid), record.id.clone());
            }
            if let Some(pk) = project_key
                && record.revoked_at.is_none()
            {
                i.by_project.entry(pk).or_default().push(record.id.clone());
            }
            if let Some(old) = replacing {
                i.replaces.insert(record.id.clone(), old.clone());
                if let Some(earlier) = i.replaced_by.insert(old, record.id.clone()) {
                    i.replaces.remove(&earlier);
                }
            }
            // Scheduled once stored: a rebuild of the heap reads the records.
            let end = record.ended_at();
            i.replace(h, record);
            if let Some(at) = end {
                i.schedule(at, h);
            }
            InsertOutcome::Inserted
        })
    }

    fn update(&self, id: &RecordId, f: impl FnOnce(&mut KeyRecord) -> bool) -> bool {
        self.write(|i| {
            let h = i.by_id.hash(id);
            let Some(current) = i.by_id.find(h, id) else { return false };
            let mut next = KeyRecord::clone(current);
            let changed = f(&mut next);
            if changed {
                // A new end is scheduled (once stored: a rebuild of the
                // heap reads the records); the old heap entry goes stale.
                let end = next.ended_at();
                let moved = end != current.ended_at();
                if next.revoked_at.is_some() && current.revoked_at.is_none() {
                    i.unlist(&next);
                }
                i.replace(h, Arc::new(next));
                if moved && let Some(at) = end {
                    i.schedule(at, h);
                }
            }
            changed
        })
    }
}

impl KeyStore for MemoryKeyStore {
    fn insert(
        &self,
        record: Arc<KeyRecord>,
        limit: Option<ActiveLimit>,
    ) -> impl Future<Output = Result<InsertOutcome, BackendError>> + Send {
        ready(Ok(self.insert_sync(record, limit)))
    }

    fn find_by_digest(
        &self,
        digest: &StoredDigest,
    ) -> impl Future<Output = Result<Option<Arc<KeyRecord>>, BackendError>> + Send {
        ready(Ok(self.get_by_digest(digest)))
    }

    fn find_by_key_id(
        &self,
        format: &str,
        key_id: &KeyId,
    ) -> impl Future<Output = Result<Option<Arc<KeyRecord>>, BackendError>> + Send {
        let found = self.read(|i| {
            i.by_key_id.get(&KeyIdQuery(format, key_id)).and_then(|id| i.by_id.get(id)).cloned()
        });
        ready(Ok(found))
    }

    fn get(
        &self,
        id: &RecordId,
    ) -> impl Future<Output = Result<Option<Arc<KeyRecord>>, BackendError>> + Send {
        ready(Ok(self.read(|i| i.by_id.get(id).cloned())))
    }

    fn list(
        &self,
        workspace: &WorkspaceId,
        project: Option<&ProjectId>,
    ) -> impl Future<Output = Result<Vec<Arc<KeyRecord>>, BackendError>> + Send {
        let mut out: Vec<Arc<KeyRecord>> = self.read(|i| {
            i.by_id
                .records()
                .filter(|r| {
                    &r.tenant.workspace == workspace
                        && project.is_none_or(|p| r.tenant.project.as_ref() == Some(p))
                })
                .cloned()
                .collect()
        });
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.id.cmp(&b.id)));
        ready(Ok(out))
    }

    fn revoke(
        &self,
        id: &RecordId,
        at: Timestamp,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        ready(Ok(self.update(id, |r| {
            if r.revoked_at.is_some() {
                return false;
            }
            r.revoked_at = Some(at);
            true
        })))
    }

    fn shorten_expiry(
        &self,
        id: &RecordId,
        expires_at: Timestamp,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        // Found under the same write lock as the update: a record forgotten
        // in between is not reported as there.
        let mut found = false;
        self.update(id, |r| {
            found = true;
            if r.expires_at.is_some_and(|e| e <= expires_at) {
                return false;
            }
            r.expires_at = Some(expires_at);
            true
        });
        ready(Ok(found))
    }

    fn record_last_used(
        &self,
        uses: &[(RecordId, Timestamp)],
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        for (id, at) in uses {
            self.update(id, |r| {
                if r.last_used_at.is_some_and(|t| t >= *at) {
                    return false;
                }
                r.last_used_at = Some(*at);
                true
            });
        }
        ready(Ok(()))
    }
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use super::*;
    use crate::testkit::keys::sample_record;
    use crate::testkit::portal::block_on;

    #[test]
    fn a_store_counts_its_records_and_debugs_as_the_count() {
        let store = MemoryKeyStore::with_capacity(4);
        assert!(store.is_empty());
        assert_eq!(format!("{store:?}"), "MemoryKeyStore { records: 0 }");
        let r = sample_record("ws_h", Some("p"), 0, false);
        assert_eq!(block_on(store.insert(Arc::new(r), None)).unwrap(), InsertOutcome::Inserted);
        assert!(!store.is_empty());
        assert_eq!(format!("{store:?}"), "MemoryKeyStore { records: 1 }");
    }

    #[test]
    fn create_and_revoke_loops_keep_the_expiry_heap_bounded() {
        let t = |secs: i64| Timestamp::from_second(1_767_225_600 + secs).unwrap();
        let store = MemoryKeyStore::new().expired_retention(std::time::Duration::from_secs(60));
        let mut now = 0;
        for _ in 0..5_000 {
            // A key that would expire in a year, revoked at once.
            let mut r = sample_record("ws_h", Some("p"), 0, false);
            r.created_at = t(now);
            r.expires_at = Some(t(now + 365 * 86_400));
            let id = r.id.clone();
            let inserted = block_on(store.insert(Arc::new(r), None));
            assert_eq!(inserted.unwrap(), InsertOutcome::Inserted);
            assert!(block_on(store.revoke(&id, t(now))).unwrap());
            now += 61;
        }
        let (heap, records) = store.read(|i| (i.expiries.len(), i.by_id.len()));
        assert!(records <= 2, "revoked records are forgotten: {records}");
        assert!(heap <= 2 * records + 65, "stale heap entries are dropped: {heap}");
    }

    #[test]
    fn the_entry_that_triggers_a_heap_rebuild_is_kept() {
        // Shortening one expiry over and over pushes stale entries until a
        // rebuild; the end scheduled by that very push must survive it.
        // From 2024: the whole story lies behind the system clock, which
        // bounds the time forgetting is judged at.
        let t = |secs: i64| Timestamp::from_second(1_704_067_200 + secs).unwrap();
        let year = 365 * 86_400;
        let store = MemoryKeyStore::new().expired_retention(std::time::Duration::from_secs(60));
        let mut a = sample_record("ws_h", Some("p"), 0, false);
        a.expires_at = Some(t(year));
        let id = a.id.clone();
        assert_eq!(block_on(store.insert(Arc::new(a), None)).unwrap(), InsertOutcome::Inserted);
        // Until the push that makes the heap rebuild (its length drops).
        for k in 1.. {
            let before = store.read(|i| i.expiries.len());
            assert!(block_on(store.shorten_expiry(&id, t(year - k))).unwrap());
            if store.read(|i| i.expiries.len()) < before {
                break;
            }
        }
        let mut b = sample_record("ws_h", Some("p"), 0, false);
        b.created_at = t(year + 86_400);
        assert_eq!(block_on(store.insert(Arc::new(b), None)).unwrap(), InsertOutcome::Inserted);
        assert!(block_on(store.get(&id)).unwrap().is_none(), "forgotten a retention after its end");
    }

    #[test]
    fn the_expiry_heap_rebuilds_after_forgetting_took_it_past_its_bound() {
        // The heap's bound moves down two for each record forgotten, while
        // forgetting pops only that record's entry: a heap just under its
        // bound can end up above it with no push in between. Later pushes
        // must still rebuild it, not wait for a bound they have passed.
        let t = |secs: i64| Timestamp::from_second(1_704_067_200 + secs).unwrap();
        let year = 365 * 86_400;
        let store = MemoryKeyStore::new().expired_retention(std::time::Duration::from_secs(60));
        let insert = |mut r: KeyRecord, at: i64| {
            r.created_at = t(at);
            assert_eq!(block_on(store.insert(Arc::new(r), None)).unwrap(), InsertOutcome::Inserted);
        };
        let mut long = sample_record("ws_h", Some("p"), 0, false);
        long.expires_at = Some(t(year));
        let id = long.id.clone();
        insert(long, 0);
        for _ in 0..10 {
            let mut short = sample_record("ws_h", Some("p"), 0, false);
            short.expires_at = Some(t(100));
            insert(short, 0);
        }
        // Stale entries of the long record's end, up to one under the bound.
        let bound = |i: &Inner| 2 * i.by_id.len() + 64;
        let mut k = 0;
        while store.read(|i| i.expiries.len() + 1 < bound(i)) {
            k += 1;
            assert!(block_on(store.shorten_expiry(&id, t(year - k))).unwrap());
        }
        // The ten short records are forgotten by an insert that schedules
        // nothing: the heap is now above its bound.
        insert(sample_record("ws_h", Some("p"), 0, false), 86_400);
        assert!(store.read(|i| i.expiries.len() > bound(i)), "the case under test");
        for _ in 0..200 {
            k += 1;
            assert!(block_on(store.shorten_expiry(&id, t(year - k))).unwrap());
        }
        let (heap, bound) = store.read(|i| (i.expiries.len(), bound(i)));
        assert!(heap <= bound, "stale heap entries are dropped: {heap} > {bound}");
    }

    /// A loop of creating a key in a project and revoking it (a CI job's
    /// key per run) leaves revoked records for a retention; the project's
    /// index, which the cap check walks on every create, holds only the
    /// records that may still count (a revoked one never does).
    #[test]
    fn create_and_revoke_loops_keep_the_project_index_to_unrevoked_records() {
        let t = |secs: i64| Timestamp::from_second(1_767_225_600 + secs).unwrap();
        let store = MemoryKeyStore::new();
        for now in 0..1_000 {
            let mut r = sample_record("ws_h", Some("p"), 0, false);
            r.created_at = t(now);
            let id = r.id.clone();
            let capped = Some(ActiveLimit::new(10, t(now)));
            assert_eq!(
                block_on(store.insert(Arc::new(r), capped)).unwrap(),
                InsertOutcome::Inserted
            );
            assert!(block_on(store.revoke(&id, t(now))).unwrap());
        }
        assert_eq!(store.len(), 1_000, "revoked records are kept a retention");
        let indexed = store.read(|i| i.by_project.values().map(Vec::len).sum::<usize>());
        assert_eq!(indexed, 0, "every record of the project is revoked");
    }
}
