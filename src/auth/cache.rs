//! The verified-principal cache and coalesced last-use writes.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::Duration;

use jiff::Timestamp;
use smallvec::SmallVec;

use super::Principal;
use crate::backend::BackendError;
use crate::clock::{Nanos, duration_nanos};
use crate::secret::{Digest, DigestBuildHasher};
use crate::store::RecordId;

const SHARDS: usize = 16;

/// Invalidations remembered for [`PrincipalCache::insert_unless_invalidated`]:
/// an authentication that read its record while more than these began is
/// not cached, whichever records they dropped.
const REMEMBERED: usize = 64;

/// One shard: principals by digest, and the digests each record is cached
/// under (one, or a few across pepper rotations), so invalidating a record
/// is a lookup per shard, not a scan of every entry.
#[derive(Default)]
struct Shard {
    by_digest: HashMap<Digest, (Principal, Nanos), DigestBuildHasher>,
    /// One digest inline: a record has one, unless cached under several
    /// peppers.
    by_id: HashMap<RecordId, SmallVec<[Digest; 1]>, ahash::RandomState>,
}

impl Shard {
    fn len(&self) -> usize {
        self.by_digest.len()
    }

    fn insert(&mut self, digest: Digest, principal: Principal, now: Nanos) {
        let id = principal.record_id().clone();
        // The digest cached for another record before (the same key stored
        // again under a new id): it is that record's no longer.
        if let Some((old, _)) = self.by_digest.insert(digest, (principal, now))
            && *old.record_id() != id
        {
            self.unindex(old.record_id(), &digest);
        }
        let digests = self.by_id.entry(id).or_default();
        if !digests.contains(&digest) {
            digests.push(digest);
        }
    }

    /// Drops `digest` from record `id`'s list.
    fn unindex(&mut self, id: &RecordId, digest: &Digest) {
        if let Some(ds) = self.by_id.get_mut(id) {
            ds.retain(|x| x != digest);
            if ds.is_empty() {
                self.by_id.remove(id);
            }
        }
    }

    /// Keeps the entries `keep` says to keep (eviction, not the hot path).
    fn retain(&mut self, mut keep: impl FnMut(&Principal, Nanos) -> bool) {
        let mut dropped = Vec::new();
        self.by_digest.retain(|d, (p, at)| {
            let kept = keep(p, *at);
            if !kept {
                dropped.push((p.record_id().clone(), *d));
            }
            kept
        });
        for (id, d) in dropped {
            self.unindex(&id, &d);
        }
    }

    /// Drops record `id`'s entries.
    fn remove_record(&mut self, id: &RecordId) {
        for d in self.by_id.remove(id).unwrap_or_default() {
            self.by_digest.remove(&d);
        }
    }
}

/// Remembers principals that verified recently, keyed by the key's digest,
/// so a hot key costs one hash and one map probe.
///
/// An entry lives at most `ttl` (30 s by default): that, plus the lag of
/// the store's reads (see the `KeyStore` contract), is the bound on how
/// long a key revoked on another instance may keep working here. A key
/// revoked through this process is dropped at once with
/// [`invalidate`](Self::invalidate), and authentications that read it
/// before the revocation do not cache it after. The same bound holds for
/// any other change to a record made outside this process's
/// [`KeyManager`](crate::manager::KeyManager) (its scopes, plan or expiry
/// edited in the host's database): a cached principal keeps the record as
/// it was read until its entry expires or is invalidated. Memory is
/// bounded by `capacity`.
pub struct PrincipalCache {
    /// Read-locked on the hot path, so concurrent requests for one key do
    /// not queue behind each other.
    shards: Box<[RwLock<Shard>]>,
    ttl: Duration,
    per_shard: usize,
    /// Bumped by every [`invalidate`](Self::invalidate): an authentication
    /// that read its record before a revocation finished must not cache it
    /// after (see [`insert_unless_invalidated`](Self::insert_unless_invalidated)).
    /// Set under `dropped`'s lock, as its count.
    generation: AtomicU64,
    /// What the latest invalidations dropped, so that an authentication
    /// is kept out of the cache by a revocation of its own record only,
    /// not by any revocation at all (a flood of them would keep every key
    /// out, and each of its requests would go to the store).
    dropped: Mutex<Dropped>,
}

/// What the last [`REMEMBERED`] invalidations dropped, oldest first: the
/// last `records.len()` of `count`. `None` is a [`clear`](PrincipalCache::clear).
#[derive(Default)]
struct Dropped {
    count: u64,
    records: VecDeque<Option<RecordId>>,
}

impl Dropped {
    /// Whether an invalidation after the `generation`th may have dropped
    /// record `id` (or one after it is forgotten already).
    fn since(&self, generation: u64, id: &RecordId) -> bool {
        let Some(n) = self.count.checked_sub(generation) else { return true };
        let Ok(n) = usize::try_from(n) else { return true };
        n > self.records.len()
            || self.records.iter().rev().take(n).any(|r| r.as_ref().is_none_or(|r| r == id))
    }
}

impl fmt::Debug for PrincipalCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrincipalCache")
            .field("ttl", &self.ttl)
            .field("capacity", &self.per_shard.saturating_mul(SHARDS))
            .finish_non_exhaustive()
    }
}

impl Default for PrincipalCache {
    fn default() -> Self {
        Self::new(Duration::from_secs(30), 100_000)
    }
}

impl PrincipalCache {
    /// A cache whose entries live at most `ttl`, holding at most about
    /// `capacity` principals.
    #[must_use]
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        let per_shard = capacity.div_ceil(SHARDS).max(1);
        let shards = (0..SHARDS).map(|_| RwLock::new(Shard::default())).collect();
        let dropped = Mutex::default();
        Self { shards, ttl, per_shard, generation: AtomicU64::new(0), dropped }
    }

    /// The invalidation generation: read it before looking a record up, and
    /// pass it to [`insert_unless_invalidated`](Self::insert_unless_invalidated).
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The staleness bound.
    #[must_use]
    pub const fn ttl(&self) -> Duration {
        self.ttl
    }

    fn shard(&self, d: &Digest) -> &RwLock<Shard> {
        let h = DigestBuildHasher::default().hash_one(d);
        // Bits the map inside the shard does not use: hashbrown takes the
        // bucket from the low bits and each slot's tag from the top seven
        // (shards picked by top bits would leave each map 3 tag bits of 7).
        &self.shards[(h >> 32) as usize % SHARDS]
    }

    /// The cached principal for `digest`, if cached less than `ttl` ago.
    ///
    /// Ages are told by the authenticators' monotonic clocks, so share a
    /// cache among authenticators whose clocks read one time line: the
    /// [`SystemClock`](crate::clock::SystemClock)s and `QuantaClock`s of a
    /// process do, clones of a `FakeClock` do. An entry stamped
    /// after `now` is stale: it came from another time line, so its age is
    /// unknown.
    #[must_use]
    pub fn get(&self, digest: &Digest, now: Nanos) -> Option<Principal> {
        let shard = self.shard(digest).read().unwrap_or_else(PoisonError::into_inner);
        let (p, at) = shard.by_digest.get(digest)?;
        fresh(*at, now, self.ttl).then(|| p.clone())
    }

    /// Caches `principal` under `digest`. An [`Authenticator`] is served
    /// only principals it verified itself (under a key of its own), so a
    /// principal built by hand ([`Principal::from_record`]) and inserted
    /// here is found by `get`, never by an authenticator.
    ///
    /// [`Authenticator`]: crate::auth::Authenticator
    /// [`Principal::from_record`]: crate::auth::Principal::from_record
    pub fn insert(&self, digest: Digest, principal: Principal, now: Nanos) {
        let mut shard = self.shard(&digest).write().unwrap_or_else(PoisonError::into_inner);
        self.insert_locked(&mut shard, digest, principal, now);
    }

    /// Caches `principal` under `digest` unless an
    /// [`invalidate`](Self::invalidate) of its record (or a
    /// [`clear`](Self::clear)) began since `generation` was read: a record
    /// read before a revocation is then not cached after it, where it would
    /// keep a revoked key working here for up to the TTL. Not cached
    /// either when more than 64 invalidations began meanwhile, of whichever
    /// records. Whether it was cached.
    pub fn insert_unless_invalidated(
        &self,
        generation: u64,
        digest: Digest,
        principal: Principal,
        now: Nanos,
    ) -> bool {
        let mut shard = self.shard(&digest).write().unwrap_or_else(PoisonError::into_inner);
        // Checked under the shard lock: an invalidation notes its record
        // (and bumps the generation) before it locks the shards, so either
        // this insert sees it, or the invalidation's sweep sees this entry.
        // No invalidation since `generation` (the common case): no need to
        // ask which records they were.
        if self.generation.load(Ordering::SeqCst) != generation {
            let dropped = self.dropped.lock().unwrap_or_else(PoisonError::into_inner);
            if dropped.since(generation, principal.record_id()) {
                return false;
            }
        }
        self.insert_locked(&mut shard, digest, principal, now);
        true
    }

    fn insert_locked(&self, shard: &mut Shard, digest: Digest, principal: Principal, now: Nanos) {
        let (per_shard, ttl) = (self.per_shard, self.ttl);
        if shard.len() >= per_shard {
            shard.retain(|_, at| fresh(at, now, ttl));
            // A sweep leaves room for a sixteenth of the shard, so the next
            // one is that many inserts away (each sweep is a pass over the
            // shard: amortized O(1) per insert). Expired entries go first;
            // if they were fewer (live entries only, or a stream of keys
            // expiring as fast as new ones come in, one a sweep), arbitrary
            // live ones make up the rest. Any eviction only costs a store
            // lookup later.
            let room = (per_shard / 16).max(1);
            let mut evict = (shard.len() + room).saturating_sub(per_shard);
            if evict > 0 {
                shard.retain(|_, _| {
                    let keep = evict == 0;
                    evict = evict.saturating_sub(1);
                    keep
                });
            }
        }
        shard.insert(digest, principal, now);
    }

    /// Drops every entry of record `id` (called on revocation, after the
    /// store has recorded it), and keeps authentications already under way
    /// from caching it again.
    pub fn invalidate(&self, id: &RecordId) {
        self.drop_in_each(Some(id), |s| s.remove_record(id));
    }

    /// Drops every entry (say, after revocation messages may have been
    /// missed), and keeps authentications already under way from caching
    /// what they read before.
    pub fn clear(&self) {
        self.drop_in_each(None, |s| *s = Shard::default());
    }

    /// Notes that record `id` (every record, for `None`) is dropped and
    /// bumps the generation, then drops entries from each shard with
    /// `drop`: an insert racing it either sees the note or is swept. A
    /// record's entries are found through its id, so invalidating one (a
    /// revocation message) costs a lookup per shard, not a scan.
    fn drop_in_each(&self, id: Option<&RecordId>, mut drop: impl FnMut(&mut Shard)) {
        {
            let mut dropped = self.dropped.lock().unwrap_or_else(PoisonError::into_inner);
            if dropped.records.len() == REMEMBERED {
                dropped.records.pop_front();
            }
            dropped.records.push_back(id.cloned());
            dropped.count += 1;
            self.generation.store(dropped.count, Ordering::SeqCst);
        }
        for s in &self.shards {
            drop(&mut s.write().unwrap_or_else(PoisonError::into_inner));
        }
    }

    /// Number of cached principals.
    #[must_use]
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().unwrap_or_else(PoisonError::into_inner).len()).sum()
    }

    /// Whether nothing is cached.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether an entry stamped `at` is younger than `ttl` at `now` (an entry
/// from the future is not: its clock was another one).
fn fresh(at: Nanos, now: Nanos, ttl: Duration) -> bool {
    at <= now && now.saturating_since(at) < ttl
}

/// Collects last-use times and hands them out as one batch per interval,
/// so a hot key costs one store write per interval, not one per request.
#[derive(Debug)]
pub(crate) struct LastUse {
    pending: Mutex<HashMap<RecordId, Timestamp, ahash::RandomState>>,
    /// Monotonic time of the last flush, in nanoseconds; 0 before the
    /// first.
    last_flush: AtomicU64,
    interval: u64,
}

impl LastUse {
    /// Most last-use times kept back for a retry after failed writes: an
    /// outage delays last use, it does not grow memory without bound.
    pub(crate) const MAX_PENDING: usize = 100_000;

    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            pending: Mutex::new(HashMap::default()),
            last_flush: AtomicU64::new(0),
            interval: duration_nanos(interval),
        }
    }

    /// Notes a use, for a flush by the host: as far as the pending map
    /// stays under [`MAX_PENDING`](Self::MAX_PENDING) entries (a host that
    /// never flushes loses last use, not memory).
    pub(crate) fn record(&self, id: &RecordId, at: Timestamp) {
        self.put(id, at, Self::MAX_PENDING);
    }

    /// Notes a use in the pending map, unless that holds `cap` others.
    fn put(&self, id: &RecordId, at: Timestamp, cap: usize) {
        let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let full = p.len() >= cap;
        match p.get_mut(id) {
            Some(t) => *t = (*t).max(at),
            None if !full => {
                p.insert(id.clone(), at);
            }
            None => {}
        }
    }

    /// Notes a use; returns a batch to write when the interval has passed.
    pub(crate) fn note(
        &self,
        id: &RecordId,
        at: Timestamp,
        now: Nanos,
    ) -> Option<Vec<(RecordId, Timestamp)>> {
        // Unbounded: a request takes the whole map out every interval, so
        // it holds at most the keys used in one.
        self.put(id, at, usize::MAX);
        // 0 is "never flushed": the first use after start is written at
        // once, and from then on at most one batch per interval.
        let last = self.last_flush.load(Ordering::Relaxed);
        if last != 0 && now.as_u64().saturating_sub(last) < self.interval {
            return None;
        }
        // One caller wins the right to flush this interval.
        if self
            .last_flush
            .compare_exchange(last, now.as_u64().max(1), Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return None;
        }
        let batch: Vec<_> =
            self.pending.lock().unwrap_or_else(PoisonError::into_inner).drain().collect();
        (!batch.is_empty()).then_some(batch)
    }

    /// Everything pending, regardless of the interval.
    pub(crate) fn drain(&self) -> Vec<(RecordId, Timestamp)> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).drain().collect()
    }

    /// Puts back a batch whose write failed with `error`, so the next flush
    /// retries it (times noted since then win when later), as far as the
    /// pending map stays under [`MAX_PENDING`](Self::MAX_PENDING) entries.
    /// Only after a transient error: a batch the store refuses as such
    /// (corrupt data) would fail every later flush with it.
    pub(crate) fn restore_after(&self, error: &BackendError, batch: Vec<(RecordId, Timestamp)>) {
        if !matches!(
            error,
            BackendError::Timeout | BackendError::Unavailable { .. } | BackendError::Full { .. }
        ) {
            return;
        }
        self.restore(batch);
    }

    /// Puts back a batch that was not written (its write failed or was
    /// cancelled); times noted since then win when later.
    pub(crate) fn restore(&self, batch: Vec<(RecordId, Timestamp)>) {
        let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let room = Self::MAX_PENDING.saturating_sub(p.len());
        for (id, at) in batch.into_iter().take(room) {
            let t = p.entry(id).or_insert(at);
            *t = (*t).max(at);
        }
    }
}

/// A last-use batch out of the pending map while its write runs: put back
/// if the write's future is dropped before it finished (a cancelled
/// request, a timeout layer), so its times wait for the next flush instead
/// of being lost.
pub(crate) struct InFlight<'a> {
    last_use: &'a LastUse,
    batch: Option<Vec<(RecordId, Timestamp)>>,
}

impl<'a> InFlight<'a> {
    pub(crate) const fn new(last_use: &'a LastUse, batch: Vec<(RecordId, Timestamp)>) -> Self {
        Self { last_use, batch: Some(batch) }
    }

    /// The batch being written.
    pub(crate) fn batch(&self) -> &[(RecordId, Timestamp)] {
        self.batch.as_deref().unwrap_or_default()
    }

    /// The write finished: the batch, for the caller to deal with.
    pub(crate) fn done(mut self) -> Vec<(RecordId, Timestamp)> {
        self.batch.take().unwrap_or_default()
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(batch) = self.batch.take() {
            self.last_use.restore(batch);
        }
    }
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::scope::ScopeRegistry;
    use crate::testkit::keys::sample_record;

    fn principal() -> (Digest, Principal) {
        let r = sample_record("ws_c", None, 0, false);
        let d = *r.digest.digest();
        (d, Principal::from_record(Arc::new(r), &ScopeRegistry::default()).unwrap())
    }

    /// Digests of `c`'s first shard, each with a principal of its own.
    fn in_first_shard(c: &PrincipalCache) -> impl FnMut() -> (Digest, Principal) {
        let mut seed = 0_u64;
        move || loop {
            seed += 1;
            let mut bytes = [0; Digest::LEN];
            bytes[..8].copy_from_slice(&seed.to_le_bytes());
            let d = Digest::from_bytes(bytes);
            if std::ptr::eq(c.shard(&d), &raw const c.shards[0]) {
                return (d, principal().1);
            }
        }
    }

    /// With requests writing, every key used in an interval is in the
    /// next batch, however many: the map empties each interval.
    #[test]
    fn every_key_used_in_an_interval_is_in_its_batch() {
        let last_use = LastUse::new(Duration::from_secs(60));
        let at = Timestamp::from_second(1_767_225_600).unwrap();
        let id = |i: usize| format!("key_{i:016}").parse::<RecordId>().unwrap();
        assert_eq!(last_use.note(&id(0), at, Nanos::new(1)).map(|b| b.len()), Some(1));
        let n = LastUse::MAX_PENDING + 10;
        for i in 1..=n {
            assert!(last_use.note(&id(i), at, Nanos::new(2)).is_none());
        }
        let batch = last_use.note(&id(n + 1), at, Nanos::new(61_000_000_000)).expect("a batch");
        assert_eq!(batch.len(), n + 1);
        // Noted for the host's flushes, they are bounded.
        for i in 0..n {
            last_use.record(&id(i), at);
        }
        assert_eq!(last_use.drain().len(), LastUse::MAX_PENDING);
    }

    /// Every digest indexed by id is cached under that id, and every
    /// cached entry is indexed: invalidation by id finds exactly them.
    fn consistent(c: &PrincipalCache) {
        for s in &c.shards {
            let s = s.read().unwrap();
            let indexed: usize = s.by_id.values().map(SmallVec::len).sum();
            assert_eq!(indexed, s.by_digest.len());
            for (id, ds) in &s.by_id {
                for d in ds {
                    assert_eq!(s.by_digest.get(d).map(|(p, _)| p.record_id()), Some(id));
                }
            }
        }
    }

    #[test]
    fn the_id_index_follows_inserts_evictions_and_invalidations() {
        let c = PrincipalCache::new(Duration::from_secs(30), 64);
        let mut kept = Vec::new();
        for i in 0..1_000_u64 {
            let (d, p) = principal();
            c.insert(d, p.clone(), Nanos::new(i * 1_000_000));
            kept.push((d, p));
            if i % 7 == 0 {
                let (_, victim) = &kept[usize::try_from(i / 2).unwrap()];
                c.invalidate(victim.record_id());
            }
        }
        consistent(&c);
        assert!(c.len() <= 64 + SHARDS, "bounded: {}", c.len());
        // Invalidating one record drops its entry and nothing else (in a
        // cache with room, so no eviction muddles it).
        let c = PrincipalCache::new(Duration::from_secs(30), 1_000);
        let now = Nanos::new(1_000 * 1_000_000);
        let (d, p) = &kept[999];
        let (d2, p2) = &kept[998];
        c.insert(*d, p.clone(), now);
        c.insert(*d2, p2.clone(), now);
        let before = c.len();
        c.invalidate(p.record_id());
        assert!(c.get(d, now).is_none() && c.get(d2, now).is_some());
        assert_eq!(c.len(), before - 1);
        consistent(&c);
        assert!(!c.is_empty());
        c.clear();
        assert!(c.is_empty());
        consistent(&c);
        // One key stored again under a new id: its digest moves records.
        let (d, first) = principal();
        let mut again = first.record().clone();
        again.id = RecordId::generate().unwrap();
        let again = Principal::from_record(Arc::new(again), &ScopeRegistry::default()).unwrap();
        c.insert(d, first.clone(), now);
        c.insert(d, again.clone(), now);
        consistent(&c);
        c.invalidate(first.record_id());
        assert!(c.get(&d, now).is_some(), "the old id no longer names the entry");
        c.invalidate(again.record_id());
        assert!(c.get(&d, now).is_none());
        consistent(&c);
    }

    /// A stream of new keys that outlives the TTL as fast as it comes in
    /// (one entry expiring per insert) keeps a sweep a sixteenth of the
    /// shard away: each insert into a full shard is a pass over it, so a
    /// sweep that freed only the one expired entry made every insert
    /// O(capacity).
    #[test]
    fn a_full_shard_expiring_one_entry_per_insert_sweeps_once_per_sixteenth() {
        let per_shard = 128;
        let c = PrincipalCache::new(Duration::from_millis(per_shard), 16 * 128);
        assert_eq!(c.per_shard, 128);
        let mut next = in_first_shard(&c);
        let ms = |t: u64| Nanos::new(t * 1_000_000);
        // One entry a millisecond: the first expires as the shard fills.
        for t in 0..per_shard {
            let (d, p) = next();
            c.insert(d, p, ms(t));
        }
        let inserts = 8 * per_shard;
        let mut passes = 0;
        for t in per_shard..per_shard + inserts {
            let (d, p) = next();
            if c.shards[0].read().unwrap().len() >= c.per_shard {
                passes += 1;
            }
            c.insert(d, p, ms(t));
        }
        let bound = inserts / (per_shard / 16) + 1;
        assert!(passes <= bound, "{passes} passes over a full shard in {inserts} inserts");
        consistent(&c);
    }

    /// A full shard of live principals makes room for a sixteenth of it,
    /// evicting no more (each eviction costs a store lookup later).
    #[test]
    fn a_full_shard_of_live_principals_evicts_a_sixteenth() {
        let c = PrincipalCache::new(Duration::from_secs(30), 16 * 128);
        let mut next = in_first_shard(&c);
        let now = Nanos::new(1);
        for _ in 0..128 {
            let (d, p) = next();
            c.insert(d, p, now);
        }
        assert_eq!(c.shards[0].read().unwrap().len(), 128);
        let (d, p) = next();
        c.insert(d, p, now);
        assert_eq!(c.shards[0].read().unwrap().len(), 128 - 8 + 1);
        assert!(c.get(&d, now).is_some(), "the new entry is kept");
        consistent(&c);
    }

    /// Digests spread over every shard: one shard for all would hold a
    /// sixteenth of the capacity.
    #[test]
    fn digests_spread_over_every_shard() {
        let c = PrincipalCache::default();
        let used: std::collections::HashSet<_> = (0..256_u64)
            .map(|i| {
                let mut bytes = [0; Digest::LEN];
                bytes[..8].copy_from_slice(&i.to_le_bytes());
                std::ptr::from_ref(c.shard(&Digest::from_bytes(bytes)))
            })
            .collect();
        assert_eq!(used.len(), SHARDS);
    }

    #[test]
    fn debug_shows_the_ttl_and_the_capacity() {
        // 100 over 16 shards: 7 each.
        let c = PrincipalCache::new(Duration::from_secs(30), 100);
        assert_eq!(format!("{c:?}"), "PrincipalCache { ttl: 30s, capacity: 112, .. }");
    }

    /// A revocation keeps out what was read before it of its own record
    /// only: a flood of revocations (of keys long revoked, say) must not
    /// keep every other key's principal out of the cache, each of whose
    /// requests would then go to the store.
    #[test]
    fn only_the_revoked_record_is_kept_out_of_the_cache() {
        let c = PrincipalCache::new(Duration::from_secs(30), 1_000);
        let now = Nanos::new(1);
        let (d, p) = principal();
        let (_, other) = principal();
        // Read before a revocation of another record, cached after it.
        let g = c.generation();
        c.invalidate(other.record_id());
        assert!(c.insert_unless_invalidated(g, d, p.clone(), now), "another record's revocation");
        assert!(c.get(&d, now).is_some());
        // Its own revocation, or a clear, keeps it out.
        c.invalidate(p.record_id());
        let g = c.generation();
        c.invalidate(other.record_id());
        c.invalidate(p.record_id());
        c.invalidate(other.record_id());
        assert!(!c.insert_unless_invalidated(g, d, p.clone(), now), "its own revocation");
        let g = c.generation();
        c.clear();
        assert!(!c.insert_unless_invalidated(g, d, p.clone(), now), "a clear");
        // More revocations than are remembered while it was read: kept
        // out, whatever they were of.
        let g = c.generation();
        for _ in 0..=REMEMBERED {
            c.invalidate(other.record_id());
        }
        assert!(!c.insert_unless_invalidated(g, d, p.clone(), now), "too many to tell");
        let g = c.generation();
        for _ in 0..REMEMBERED {
            c.invalidate(other.record_id());
        }
        assert!(c.insert_unless_invalidated(g, d, p, now), "as many as are remembered");
        consistent(&c);
    }
}
