//! Key records and the [`KeyStore`] trait the host implements over its own
//! database; [`MemoryKeyStore`] ships.

mod memory;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;

use jiff::Timestamp;
use rand_core::TryCryptoRng;

pub use memory::MemoryKeyStore;

/// The string type of a record's short text fields (name, hint, format):
/// held inline up to 23 bytes, a `&'static str` by reference, longer text in
/// one shared allocation. Build one with `.into()` from a `&str` or
/// `String`; it derefs to `&str`.
pub use smol_str::SmolStr;

use crate::backend::BackendError;
use crate::format::{Alphabet, Environment, FillError, KeyId, MintError, Region};
use crate::hash::StoredDigest;
use crate::scope::Scope;
use crate::secret::OsBatch;

/// Flat string metadata of a record ([`KeyRecord::metadata`]) or a portal
/// session: keys and values as [`SmolStr`], so short ones (most: a customer
/// id, a role, a record id) are held inline, not allocated each.
pub type Metadata = BTreeMap<SmolStr, SmolStr>;

/// A string id failed its grammar: 1 to 64 ASCII letters, digits, `_` or `-`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{what} must be 1 to 64 ASCII letters, digits, `_` or `-`")]
#[non_exhaustive]
pub struct IdError {
    /// Which id.
    pub what: &'static str,
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        ///
        /// Held inline up to 23 bytes (a generated record id, typical
        /// workspace and application ids): making or copying one allocates
        /// nothing. A longer id is one shared allocation, copied by
        /// reference.
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(SmolStr);

        impl $name {
            /// The id text.
            #[must_use]
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let ok = !s.is_empty()
                    && s.len() <= 64
                    && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if ok { Ok(Self(SmolStr::new(s))) } else { Err(IdError { what: $what }) }
            }
        }

        /// The id as text, without copying it again (inline, or shared).
        impl From<&$name> for SmolStr {
            fn from(id: &$name) -> Self {
                id.0.clone()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        #[cfg(feature = "serde")]
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        #[cfg(feature = "serde")]
        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// Public id of a key record, e.g. `key_3xY9aB2cD4eF6gH8` — safe to show and log.
    RecordId,
    "record id"
);
id_type!(
    /// A workspace, e.g. `ws_abc`.
    WorkspaceId,
    "workspace id"
);
id_type!(
    /// A project within a workspace.
    ProjectId,
    "project id"
);
id_type!(
    /// An application within a workspace, e.g. `app_123`.
    ApplicationId,
    "application id"
);

impl RecordId {
    /// A fresh random id: `key_` and 16 base62 characters (95 bits) from the
    /// OS CSPRNG.
    ///
    /// # Errors
    ///
    /// [`BackendError::Unavailable`] if the OS generator fails.
    pub fn generate() -> Result<Self, BackendError> {
        Self::generate_os(&mut OsBatch::new(Self::RANDOM_BYTES))
    }

    /// [`generate`](Self::generate) from a batch an operation shares (a
    /// key and its id): the OS error, if any, is the one reported.
    pub(crate) fn generate_os(rng: &mut OsBatch) -> Result<Self, BackendError> {
        Self::draw(rng).map_err(|e| match e {
            FillError::Rng(e) => BackendError::unavailable(e),
            FillError::Stuck => BackendError::unavailable(MintError::Rng),
        })
    }

    /// [`generate`](Self::generate) drawing from `rng`.
    ///
    /// # Errors
    ///
    /// [`MintError::Rng`] if `rng` fails, or yields only bytes base62
    /// rejects (a generator stuck on one value).
    pub fn generate_with<R: TryCryptoRng + ?Sized>(rng: &mut R) -> Result<Self, MintError> {
        Self::draw(rng).map_err(|_| MintError::Rng)
    }

    fn draw<R: TryCryptoRng + ?Sized>(rng: &mut R) -> Result<Self, FillError<R::Error>> {
        let mut out = *b"key_0000000000000000";
        Alphabet::BASE62.fill(rng, &mut out[4..4 + Self::RANDOM_CHARS])?;
        // ASCII throughout, so never the error: one check, one copy (a lossy
        // UTF-8 view cost as much as drawing the id), held inline.
        let id = std::str::from_utf8(&out).map_err(|_| FillError::Stuck)?;
        Ok(Self(SmolStr::new_inline(id)))
    }

    /// Random base62 characters in a generated id.
    pub(crate) const RANDOM_CHARS: usize = 16;

    /// Random bytes generating an id almost always consumes.
    pub(crate) const RANDOM_BYTES: usize = Alphabet::BASE62.bytes_for(Self::RANDOM_CHARS);
}

/// Who a key belongs to: exactly one workspace, optionally narrowed to a
/// project and an application. A key never reaches another tenant.
/// Deserialized (feature `serde`), `project` and `application` must be
/// present, `null` for none: a document missing one would read wider.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Tenant {
    /// The workspace.
    pub workspace: WorkspaceId,
    /// The project, for project-scoped keys.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "present"))]
    pub project: Option<ProjectId>,
    /// The application, for application-scoped credentials (portal sessions).
    #[cfg_attr(feature = "serde", serde(deserialize_with = "present"))]
    pub application: Option<ApplicationId>,
}

impl Tenant {
    /// A workspace-wide tenant.
    #[must_use]
    pub const fn workspace(workspace: WorkspaceId) -> Self {
        Self { workspace, project: None, application: None }
    }

    /// Narrows to `project`.
    #[must_use]
    pub fn with_project(mut self, project: ProjectId) -> Self {
        self.project = Some(project);
        self
    }

    /// Narrows to `application`.
    #[must_use]
    pub fn with_application(mut self, application: ApplicationId) -> Self {
        self.application = Some(application);
        self
    }

    /// Whether a credential of this tenant may reach `target`: same
    /// workspace, and each of project and application either unrestricted on
    /// the credential or equal to the target's.
    #[must_use]
    pub fn reaches(&self, target: &Self) -> bool {
        self.workspace == target.workspace
            && narrower(self.project.as_ref(), target.project.as_ref())
            && narrower(self.application.as_ref(), target.application.as_ref())
    }
}

fn narrower<T: PartialEq>(credential: Option<&T>, target: Option<&T>) -> bool {
    match (credential, target) {
        (None, _) => true,
        (Some(c), Some(t)) => c == t,
        // A project key addressing the workspace as a whole does not reach it.
        (Some(_), None) => false,
    }
}

/// Deserializes an `Option` field that must be present (`null` for none):
/// with `deserialize_with`, serde reports a missing field as an error
/// instead of reading it as `None`.
#[cfg(feature = "serde")]
pub(crate) fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    <Option<T> as serde::Deserialize>::deserialize(d)
}

/// Everything stored about a key — never the key itself. Its `Serialize`
/// (feature `serde`, for stores) includes the digest: never send records to
/// clients as they are; pick the fields (as the reference server's list
/// does). Its `Deserialize` wants every field whose absence would widen the
/// key — `key_id`, `environment`, `region`, `plan`, `expires_at`,
/// `revoked_at`, the tenant's `project` and `application` — present, `null`
/// for none (as `Serialize` writes them): a document missing one is damaged,
/// and reading it as "none" would make a revoked key active, a project key
/// workspace-wide. Only `last_used_at` may be absent.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct KeyRecord {
    /// Public record id.
    pub id: RecordId,
    /// Human name, e.g. `Production Key`.
    pub name: SmolStr,
    /// Non-secret display form, e.g. `sk_live_abc`.
    pub hint: SmolStr,
    /// Digest of the key, with the algorithm that made it.
    pub digest: StoredDigest,
    /// Name of the key's format, e.g. `sk`.
    pub format: SmolStr,
    /// Public key id, for formats that have one (the lookup handle).
    #[cfg_attr(feature = "serde", serde(deserialize_with = "present"))]
    pub key_id: Option<KeyId>,
    /// Environment: the key's own, for formats that have one (a record
    /// naming another, or none, is refused as not the key's); for other
    /// formats, set by the host or none.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "present"))]
    pub environment: Option<Environment>,
    /// Region: the key's own, for formats that have one (a record naming
    /// another, or none, is refused as not the key's).
    #[cfg_attr(feature = "serde", serde(deserialize_with = "present"))]
    pub region: Option<Region>,
    /// The tenant the key belongs to.
    pub tenant: Tenant,
    /// Granted scopes, shared: records minted from one template (a portal
    /// role, a rolled key) hold one list.
    pub scopes: Arc<[Scope]>,
    /// Rate-limit plan name, if the host assigns plans per key.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "present"))]
    pub plan: Option<String>,
    /// Creation time.
    pub created_at: Timestamp,
    /// When the key stops working, if ever.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "present"))]
    pub expires_at: Option<Timestamp>,
    /// When the key was revoked, if it was.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "present"))]
    pub revoked_at: Option<Timestamp>,
    /// Last successful authentication (coalesced; may lag).
    pub last_used_at: Option<Timestamp>,
    /// Host-defined string metadata.
    pub metadata: Metadata,
}

impl KeyRecord {
    /// Whether the key works at `now`: not revoked and not expired.
    #[must_use]
    pub fn is_active(&self, now: Timestamp) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| now < e)
    }

    /// When the key stopped working for good, if it has: the earlier of its
    /// expiry and its revocation. Stores forget a record a retention after
    /// this.
    #[must_use]
    pub fn ended_at(&self) -> Option<Timestamp> {
        match (self.expires_at, self.revoked_at) {
            (Some(e), Some(r)) => Some(e.min(r)),
            (e, r) => e.or(r),
        }
    }
}

/// How long the shipped stores keep a record after it expires or is revoked
/// (listed, and refused as expired or revoked) before forgetting it: one
/// day.
pub const EXPIRED_RETENTION: std::time::Duration = std::time::Duration::from_secs(24 * 60 * 60);

/// A cap on active keys per project, enforced by [`KeyStore::insert`] in the
/// same atomic step as the insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveLimit {
    /// Most active keys a project may hold. `u32::MAX` is no cap at all
    /// (what a roll without a cap passes to have `replacing` checked):
    /// skip the count then ([`is_capped`](Self::is_capped)).
    pub max: u32,
    /// The time at which "active" (not revoked, not expired) is judged, as
    /// [`KeyRecord::is_active`] does: only the expiry is compared with it
    /// (SQL: `revoked_at IS NULL AND (expires_at IS NULL OR expires_at >
    /// $now)`). A revoked record is inactive whatever its `revoked_at`: one
    /// stamped after `now` (by an instance whose clock runs ahead) is revoked
    /// all the same, or a roll racing the revocation would replace it.
    pub now: Timestamp,
    /// The record the new one replaces (a roll), if any. The insert
    /// succeeds only while that record exists and is active at `now`
    /// ([`InsertOutcome::ReplacingInactive`] otherwise), and it is not
    /// counted against `max`: during the grace the project holds it and
    /// its replacement, one over the cap. Checked in the same atomic step,
    /// so a revocation or a create racing the roll cannot leave the project
    /// over its cap for good, nor a revoked key with a fresh replacement.
    ///
    /// A record has at most one active replacement: the store remembers
    /// which record replaced it, and while that one is active at `now`
    /// another replacement is [`InsertOutcome::AlreadyReplaced`] — so two
    /// rolls of one key racing yield one new key, not two (which would
    /// leave the project over its cap once the grace ends).
    pub replacing: Option<RecordId>,
}

impl ActiveLimit {
    /// A cap of `max` active keys, judged at `now`.
    #[must_use]
    pub const fn new(max: u32, now: Timestamp) -> Self {
        Self { max, now, replacing: None }
    }

    /// Whether `max` caps anything (`u32::MAX` does not).
    #[must_use]
    pub const fn is_capped(&self) -> bool {
        self.max != u32::MAX
    }
}

/// What [`KeyStore::insert`] did.
#[must_use = "only `Inserted` stored the record"]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum InsertOutcome {
    /// The record was stored.
    Inserted,
    /// A record with the same id exists; nothing was stored.
    DuplicateId,
    /// A record with the same digest (or format and key id) exists; nothing
    /// was stored.
    DuplicateKey,
    /// The project already holds `max` active keys; nothing was stored.
    LimitReached {
        /// The cap.
        max: u32,
    },
    /// The record named by [`ActiveLimit::replacing`] is gone, revoked or
    /// expired at [`ActiveLimit::now`]; nothing was stored.
    ReplacingInactive,
    /// The record named by [`ActiveLimit::replacing`] already has a
    /// replacement that is active at [`ActiveLimit::now`]; nothing was
    /// stored.
    AlreadyReplaced,
}

/// Where the host keeps key records: SQL, Redis, or [`MemoryKeyStore`].
///
/// # Contract
///
/// - **Atomicity.** `insert` is one atomic step: the uniqueness of the id,
///   the digest and (format, key id), the replaced record's standing (active,
///   and no active replacement yet) and the active-key cap are checked and
///   the record written together (SQL: one transaction that locks the
///   project's row — `SELECT … FROM projects WHERE … FOR UPDATE`, or an
///   advisory lock on the project — then locks and reads the replaced record
///   (`SELECT … FOR UPDATE`, with a `replaced_by` column set by the insert),
///   counts the project's active keys and inserts, with
///   unique indexes on the id, the digest and (format, key id); a bare
///   `INSERT … SELECT … WHERE (SELECT count(*) …) < max` races under READ
///   COMMITTED; Redis: one Lua script). `revoke` and `shorten_expiry` (which
///   never extends an expiry) are single-record conditional updates.
/// - **Fidelity.** A record reads back equal to the one inserted (then as
///   `revoke`, `shorten_expiry` and `record_last_used` changed it): scopes
///   in their order (not sorted), metadata values as given (empty ones
///   too), times to the nanosecond. SQL time columns keep less — Postgres
///   `timestamptz` microseconds, a `DATETIME` without fractions whole
///   seconds, rounded (an expiry read back later than it was set keeps the
///   key working past it, and a roll whose cut of the old key's expiry
///   timed out reads it back as not cut, and revokes the new key) — so keep
///   nanoseconds since the epoch in a `BIGINT` (good until 2262), or the
///   record's serde form beside the columns you index.
/// - **Staleness.** Reads may come from a replica or cache that lags. Lag
///   and the verified-principal cache's TTL add up: a revoked key may
///   authenticate on other instances for the replica lag plus the TTL (30
///   seconds by default), so a host whose bound is 30 s and whose replicas
///   lag up to 5 s sets the TTL to 25 s. In the process that revoked it, a
///   key stops at once when the `KeyManager` shares the authenticator's
///   cache and the store reads its own writes; with replica reads, a
///   lookup racing the revocation can cache the stale record there too,
///   for the lag plus the TTL. `last_used_at` is advisory and may lag.
/// - **Failure.** Infrastructure failures are [`BackendError`]s; "not found"
///   is `Ok(None)`. The authenticator always turns a key-store error into a
///   503 (fail closed); the gate's fail modes apply to the limiter and
///   quota stores only.
/// - **Retention.** A store may forget a record once it has been expired or
///   revoked for longer than a retention period of the host's choosing
///   (SQL: a periodic `DELETE` of rows whose earlier of `expires_at` and
///   `revoked_at` is older than the retention; Redis: a key expiry). Short-lived credentials such as
///   portal access tokens are records too, and a tenant may create and
///   revoke keys in a loop, so a store that never forgets grows without
///   bound. A forgotten key fails as unknown instead of expired or revoked:
///   the same 401. [`MemoryKeyStore`] and `RedisKeyStore` keep ended
///   records for [`EXPIRED_RETENTION`] by default.
///
/// Methods return `impl Future + Send`; implement them with `async` blocks.
pub trait KeyStore: Send + Sync {
    /// Stores `record` if its id, digest and (format, key id) are new and,
    /// when `limit` is given: the record it is [`replacing`] (if any) is
    /// active at `limit.now` and has no replacement active then, and, when
    /// the record has a project, the project holds fewer than `limit.max`
    /// active keys besides that one. The checks come in that order:
    /// duplicates (a record clashing on both its id and its key may report
    /// either), then the replaced record, then the cap. A stored
    /// replacement becomes the replaced record's one replacement.
    ///
    /// [`replacing`]: ActiveLimit::replacing
    ///
    /// The record is shared, not copied: an in-process store keeps this
    /// very allocation, and the caller keeps its handle to it.
    fn insert(
        &self,
        record: Arc<KeyRecord>,
        limit: Option<ActiveLimit>,
    ) -> impl Future<Output = Result<InsertOutcome, BackendError>> + Send;

    /// The record whose digest is `digest` — exactly, algorithm included
    /// (compare whole digests, as binary or exact text; the authenticator
    /// refuses a record whose digest differs from the one it asked for).
    fn find_by_digest(
        &self,
        digest: &StoredDigest,
    ) -> impl Future<Output = Result<Option<Arc<KeyRecord>>, BackendError>> + Send;

    /// The record of format `format` with public key id `key_id`. The caller
    /// then compares digests in constant time.
    fn find_by_key_id(
        &self,
        format: &str,
        key_id: &KeyId,
    ) -> impl Future<Output = Result<Option<Arc<KeyRecord>>, BackendError>> + Send;

    /// The record with id `id`.
    fn get(
        &self,
        id: &RecordId,
    ) -> impl Future<Output = Result<Option<Arc<KeyRecord>>, BackendError>> + Send;

    /// Every record of `workspace` (narrowed to `project` when given; `None`
    /// is the whole workspace, not only its workspace-wide keys), oldest
    /// first by `created_at` (records created at the same instant in any
    /// order), revoked ones included.
    fn list(
        &self,
        workspace: &WorkspaceId,
        project: Option<&ProjectId>,
    ) -> impl Future<Output = Result<Vec<Arc<KeyRecord>>, BackendError>> + Send;

    /// Marks the record revoked at `at`. `Ok(true)` if this call revoked it,
    /// `Ok(false)` if it was unknown or already revoked.
    fn revoke(
        &self,
        id: &RecordId,
        at: Timestamp,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send;

    /// Sets the record's expiry to `expires_at` if that is earlier than its
    /// current expiry (never extends). `Ok(true)` if the record exists.
    fn shorten_expiry(
        &self,
        id: &RecordId,
        expires_at: Timestamp,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send;

    /// Records last use for a batch of keys (coalesced by the caller). Later
    /// times win; unknown ids are ignored. Only `last_used_at` changes: a
    /// conditional update of that one field, never the whole record written
    /// back as read before, which would undo a revocation or a shortened
    /// expiry that came in between (a use noted before the revocation is
    /// written after it).
    fn record_last_used(
        &self,
        uses: &[(RecordId, Timestamp)],
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
}

impl<S: KeyStore + ?Sized> KeyStore for Arc<S> {
    fn insert(
        &self,
        record: Arc<KeyRecord>,
        limit: Option<ActiveLimit>,
    ) -> impl Future<Output = Result<InsertOutcome, BackendError>> + Send {
        (**self).insert(record, limit)
    }
    fn find_by_digest(
        &self,
        digest: &StoredDigest,
    ) -> impl Future<Output = Result<Option<Arc<KeyRecord>>, BackendError>> + Send {
        (**self).find_by_digest(digest)
    }
    fn find_by_key_id(
        &self,
        format: &str,
        key_id: &KeyId,
    ) -> impl Future<Output = Result<Option<Arc<KeyRecord>>, BackendError>> + Send {
        (**self).find_by_key_id(format, key_id)
    }
    fn get(
        &self,
        id: &RecordId,
    ) -> impl Future<Output = Result<Option<Arc<KeyRecord>>, BackendError>> + Send {
        (**self).get(id)
    }
    fn list(
        &self,
        workspace: &WorkspaceId,
        project: Option<&ProjectId>,
    ) -> impl Future<Output = Result<Vec<Arc<KeyRecord>>, BackendError>> + Send {
        (**self).list(workspace, project)
    }
    fn revoke(
        &self,
        id: &RecordId,
        at: Timestamp,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        (**self).revoke(id, at)
    }
    fn shorten_expiry(
        &self,
        id: &RecordId,
        expires_at: Timestamp,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        (**self).shorten_expiry(id, expires_at)
    }
    fn record_last_used(
        &self,
        uses: &[(RecordId, Timestamp)],
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        (**self).record_last_used(uses)
    }
}
