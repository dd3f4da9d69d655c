//! The [`PortalStore`] trait: single-use redemption as one atomic step.

use std::collections::HashMap;
use std::future::{Future, ready};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use crate::backend::BackendError;
use crate::clock::{Clock, SystemClock};
use crate::format::{Environment, Region};
use crate::scope::Role;
use crate::secret::{Digest, DigestBuildHasher};
use crate::store::{ApplicationId, Metadata, RecordId, WorkspaceId};

/// A minted portal session, stored under its code's digest.
///
/// With feature `serde`, it serializes (for a host's own [`PortalStore`])
/// with its field names, times in RFC 3339 and the role by name. Its
/// `Deserialize` wants the fields whose absence would widen the session —
/// `environment`, `region`, `minter`, as `KeyRecord`'s do — present, `null`
/// for none (as `Serialize` writes them): a document missing one is
/// damaged, and reading it as "none" would open a portal valid in every
/// environment and region, or one no revocation of its minter stops. The
/// rest, `expires_at` included, are required as any non-`Option` field.
/// Unknown fields are ignored, as for `KeyRecord` (a document store's own
/// `_id`).
///
/// `RedisPortalStore` does not use this encoding; its own is kept so that
/// stored sessions stay readable: short field names (`ws`, `app`, `meta`,
/// `created`, `expires`, `env`), times as 21-digit sortable nanosecond
/// strings; it too refuses a stored session missing `env`, `region` or
/// `minter` (corrupt data). Neither reads the other's.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PortalSession {
    /// The workspace.
    pub workspace: WorkspaceId,
    /// The application whose endpoints the session manages.
    pub application: ApplicationId,
    /// What the session may do.
    pub role: Role,
    /// Flat metadata, copied onto the access token's record (where the host
    /// reads it to attach to what the session creates).
    pub metadata: Metadata,
    /// When it was minted.
    pub created_at: Timestamp,
    /// When the code stops working.
    pub expires_at: Timestamp,
    /// The minting token's environment (`test`, `live`), carried to the
    /// access token: authentication enforces it there as on the minter,
    /// so a `test` token's portal never reaches `live`.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "crate::store::present"))]
    pub environment: Option<Environment>,
    /// The minting token's region, carried to the access token likewise.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "crate::store::present"))]
    pub region: Option<Region>,
    /// The minting management token's record. Redeeming checks that it is
    /// still active (a revoked minter's links stop; see
    /// [`Portal::minters_elsewhere`](crate::portal::Portal::minters_elsewhere)),
    /// and the access token
    /// names it under [`MINTER_METADATA_KEY`](crate::portal::MINTER_METADATA_KEY)
    /// so revoking the minter through the `KeyManager` revokes the tokens
    /// too. `None` (a session built by hand: [`Portal`](crate::portal::Portal)
    /// always names the minter, and both stored forms refuse a session
    /// missing the field) skips the check.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "crate::store::present"))]
    pub minter: Option<RecordId>,
}

/// What redeeming a code found.
#[must_use = "only `Session` admits the code's holder"]
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Redeem {
    /// The code was valid and unused; it is now used. Returned exactly once
    /// per code.
    Session(PortalSession),
    /// The code was already redeemed.
    AlreadyUsed,
    /// The code expired before it was redeemed.
    Expired,
    /// No session has this code (never minted, or long forgotten).
    Unknown,
}

/// Where portal sessions live between minting and redemption.
///
/// # Contract
///
/// - **Single use.** `redeem` is one atomic step: of any number of
///   concurrent calls with the same code, exactly one gets
///   [`Redeem::Session`]; the others get [`Redeem::AlreadyUsed`]. SQL:
///   `UPDATE portal_sessions SET used_at = $now WHERE code_digest = $1 AND
///   used_at IS NULL AND expires_at > $now RETURNING …`, then tell the
///   no-row cases apart with a plain `SELECT`. Redis: one Lua script that
///   reads the session, checks expiry, and replaces it with an "used"
///   tombstone. (Not `GETDEL` then `SET NX`: a loser that runs between the
///   two finds nothing and answers unknown instead of already used.)
/// - **Expiry.** A code is redeemable strictly before `expires_at`, judged
///   at each call's `now`: an [`Expired`](Redeem::Expired) answer does not use the
///   code up, so a clock that steps back before `expires_at` finds it
///   redeemable again (once, as ever: single use does not depend on time).
/// - **Bounded.** Expired sessions and tombstones are dropped on their own
///   (TTL, or in-band purging); memory does not grow with history. Not at
///   expiry: a used or expired code is remembered for a while past it, so
///   that a late second open still says already used or expired rather
///   than unknown (the shipped stores keep it [`TOMBSTONE_RETENTION`]; SQL:
///   a periodic `DELETE … WHERE expires_at < now() - retention`). The purge
///   may go by the store's own clock: `insert` is given no time, and a
///   retention this long outlasts any skew.
/// - **Failure.** An unreachable backend is a [`BackendError`] — never a
///   redemption.
pub trait PortalStore: Send + Sync {
    /// Stores `session` under `code`. `Ok(false)` if that digest exists —
    /// pending, used or expired, as long as the store still holds it (SQL:
    /// `INSERT … ON CONFLICT DO NOTHING`, never an upsert): the code is
    /// another session's, and the caller must not hand it out.
    fn insert(
        &self,
        code: Digest,
        session: PortalSession,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send;

    /// Redeems `code` at `now`, atomically.
    fn redeem(
        &self,
        code: &Digest,
        now: Timestamp,
    ) -> impl Future<Output = Result<Redeem, BackendError>> + Send;
}

/// How long used and expired codes are remembered past their expiry, so
/// that a late second open still says "already used" or "expired" rather
/// than "unknown".
pub const TOMBSTONE_RETENTION: Duration = Duration::from_secs(3600);

enum Entry {
    Pending(PortalSession),
    Used { expires_at: Timestamp },
}

impl Entry {
    fn expires_at(&self) -> Timestamp {
        match self {
            Self::Pending(s) => s.expires_at,
            Self::Used { expires_at } => *expires_at,
        }
    }

    /// Whether the entry is past its tombstone retention at `now`: as good
    /// as gone (the Redis store's key has expired by then).
    ///
    /// Compared as durations since the epoch: `Timestamp` arithmetic checks
    /// its range through a general path that cost a redemption 3 %.
    fn forgotten(&self, now: Timestamp) -> bool {
        // An hour: no wrap.
        #[allow(clippy::cast_possible_wrap)]
        const KEEP: SignedDuration =
            SignedDuration::from_secs(TOMBSTONE_RETENTION.as_secs() as i64);
        self.expires_at().as_duration().saturating_add(KEEP) <= now.as_duration()
    }
}

const SHARDS: usize = 16;

struct Shard {
    map: HashMap<Digest, Entry, DigestBuildHasher>,
    /// Map size at which the next purge runs (doubles when little is freed).
    purge_at: usize,
}

/// A [`PortalStore`] in process memory: sharded maps behind mutexes, so
/// redemption is atomic per code; expired sessions and tombstones are
/// purged in band as new sessions arrive.
pub struct MemoryPortalStore {
    shards: Box<[Mutex<Shard>]>,
    /// The clock purges are judged by, at most (default: the system's).
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for MemoryPortalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryPortalStore").field("entries", &self.len()).finish()
    }
}

impl Default for MemoryPortalStore {
    fn default() -> Self {
        let shards = (0..SHARDS)
            .map(|_| Mutex::new(Shard { map: HashMap::default(), purge_at: 64 }))
            .collect();
        Self { shards, clock: Arc::new(SystemClock::new()) }
    }
}

impl MemoryPortalStore {
    /// An empty store.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store whose purges are judged by `clock`, the one its
    /// [`Portal`](crate::portal::Portal) reads: a session stamped ahead of
    /// that clock (a caller's fast clock) purges nothing still in use, and
    /// a clock ahead of the system's (a [`FakeClock`](crate::clock::FakeClock)
    /// set in the future) still purges. By default, the system clock.
    #[must_use]
    pub fn with_clock(clock: impl Clock + 'static) -> Self {
        Self { clock: Arc::new(clock), ..Self::default() }
    }

    /// Entries held (pending sessions and tombstones).
    #[must_use]
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).map.len()).sum()
    }

    /// Whether the store holds nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, d: &Digest) -> &Mutex<Shard> {
        let h = std::hash::BuildHasher::hash_one(&DigestBuildHasher::default(), d);
        // Bits the map inside the shard does not use: hashbrown takes the
        // bucket from the low bits and each slot's tag from the top seven
        // (shards picked by top bits would leave each map 3 tag bits of 7).
        &self.shards[(h >> 32) as usize % SHARDS]
    }

    /// Synchronous [`PortalStore::insert`]; `now` drives in-band purging.
    /// `false`: the code is another session's (never hand it out).
    #[must_use = "`false` means the code is another session's: never hand it out"]
    pub fn insert_sync(&self, code: Digest, session: PortalSession, now: Timestamp) -> bool {
        let mut shard = self.shard(&code).lock().unwrap_or_else(PoisonError::into_inner);
        if shard.map.len() >= shard.purge_at {
            // A session stamped ahead of the store's clock must not purge
            // codes and tombstones still in use.
            let now = now.min(self.clock.now());
            shard.map.retain(|_, e| !e.forgotten(now));
            // Amortised: the next purge waits until the map doubles.
            shard.purge_at = (shard.map.len() * 2).max(64);
        }
        // An entry past its tombstone retention is as good as gone (Redis
        // has dropped its key by then), whether or not a purge ran.
        if shard.map.get(&code).is_some_and(|e| !e.forgotten(now.min(self.clock.now()))) {
            return false;
        }
        shard.map.insert(code, Entry::Pending(session));
        true
    }

    /// Synchronous [`PortalStore::redeem`].
    pub fn redeem_sync(&self, code: &Digest, now: Timestamp) -> Redeem {
        let mut shard = self.shard(code).lock().unwrap_or_else(PoisonError::into_inner);
        let Some(entry) = shard.map.get_mut(code) else { return Redeem::Unknown };
        if entry.forgotten(now) {
            // Not purged yet (a quiet shard): unknown all the same.
            shard.map.remove(code);
            return Redeem::Unknown;
        }
        match entry {
            Entry::Used { .. } => Redeem::AlreadyUsed,
            Entry::Pending(s) if now >= s.expires_at => Redeem::Expired,
            Entry::Pending(s) => {
                let expires_at = s.expires_at;
                match std::mem::replace(entry, Entry::Used { expires_at }) {
                    Entry::Pending(s) => Redeem::Session(s),
                    Entry::Used { .. } => Redeem::AlreadyUsed,
                }
            }
        }
    }
}

impl PortalStore for MemoryPortalStore {
    fn insert(
        &self,
        code: Digest,
        session: PortalSession,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        let now = session.created_at;
        ready(Ok(self.insert_sync(code, session, now)))
    }

    fn redeem(
        &self,
        code: &Digest,
        now: Timestamp,
    ) -> impl Future<Output = Result<Redeem, BackendError>> + Send {
        ready(Ok(self.redeem_sync(code, now)))
    }
}

impl<P: PortalStore + ?Sized> PortalStore for std::sync::Arc<P> {
    fn insert(
        &self,
        code: Digest,
        session: PortalSession,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        (**self).insert(code, session)
    }

    fn redeem(
        &self,
        code: &Digest,
        now: Timestamp,
    ) -> impl Future<Output = Result<Redeem, BackendError>> + Send {
        (**self).redeem(code, now)
    }
}
