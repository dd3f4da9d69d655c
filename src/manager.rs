//! Key lifecycle on top of a [`KeyStore`]: create, list, revoke, roll.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use smol_str::SmolStr;

use crate::auth::{Principal, PrincipalCache};
use crate::backend::BackendError;
use crate::clock::{Clock, SystemClock};
use crate::format::{
    ApiKey, Environment, FormatSet, KeyFormat, MintError, MintSpec, NHM, Region, Segment,
};
use crate::hash::Hasher;
use crate::http::Rejection;
use crate::scope::{Scope, ScopeError, ScopeRegistry, ScopeSet};
use crate::secret::OsBatch;
use crate::store::{
    ActiveLimit, InsertOutcome, KeyRecord, KeyStore, Metadata, ProjectId, RecordId, Tenant,
    WorkspaceId,
};

/// Expiry choices for management tokens: exactly those the seed offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TokenExpiry {
    /// 30 days (`30d`).
    Days30,
    /// 90 days (`90d`).
    Days90,
    /// One year (`1y`): the same date and time a year later, in UTC (366
    /// days across a leap day; from 29 February, the 28th).
    Year1,
    /// Never expires (`never`).
    Never,
}

impl TokenExpiry {
    /// The lifetime, or `None` for [`TokenExpiry::Never`]. A year is 365
    /// days here; a token created with [`NewKey::token_expiry`] lasts a
    /// calendar year ([`TokenExpiry::Year1`]).
    #[must_use]
    pub const fn duration(self) -> Option<Duration> {
        const DAY: u64 = 86_400;
        match self {
            Self::Days30 => Some(Duration::from_secs(30 * DAY)),
            Self::Days90 => Some(Duration::from_secs(90 * DAY)),
            Self::Year1 => Some(Duration::from_secs(365 * DAY)),
            Self::Never => None,
        }
    }
}

/// `scopes` with each scope once, in first-seen order (the same list when
/// nothing repeats). Distinct known scopes are bounded by the registry, so
/// this bounds what a key stores and what checking it against a parent's
/// list costs, however long the list a request sends.
fn distinct(scopes: Arc<[Scope]>) -> Arc<[Scope]> {
    let mut seen = std::collections::HashSet::with_capacity(scopes.len());
    if scopes.iter().all(|s| seen.insert(s.as_str())) {
        return scopes;
    }
    seen.clear();
    scopes.iter().filter(|s| seen.insert(s.as_str())).cloned().collect()
}

/// Not one of `30d`, `90d`, `1y`, `never`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("expiry must be one of 30d, 90d, 1y, never")]
pub struct TokenExpiryError;

/// The name [`FromStr`] reads (`30d`, `90d`, `1y`, `never`), so a choice
/// written out reads back as itself.
impl fmt::Display for TokenExpiry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Days30 => "30d",
            Self::Days90 => "90d",
            Self::Year1 => "1y",
            Self::Never => "never",
        })
    }
}

impl FromStr for TokenExpiry {
    type Err = TokenExpiryError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "30d" => Ok(Self::Days30),
            "90d" => Ok(Self::Days90),
            "1y" => Ok(Self::Year1),
            "never" => Ok(Self::Never),
            _ => Err(TokenExpiryError),
        }
    }
}

/// What to create: the key's name, format, tenant and grants.
#[derive(Debug, Clone)]
pub struct NewKey {
    name: String,
    format: KeyFormat,
    tenant: Tenant,
    scopes: Arc<[Scope]>,
    environment: Option<Environment>,
    region: Option<Region>,
    lifetime: Option<Duration>,
    /// The lifetime is a calendar year ([`TokenExpiry::Year1`]), not
    /// `lifetime`'s 365 days.
    calendar_year: bool,
    /// An absolute cap on the expiry (a parent's or a rolled key's own),
    /// applied in the same insert as the record.
    not_after: Option<Timestamp>,
    plan: Option<String>,
    metadata: Metadata,
}

impl NewKey {
    /// A key named `name` of `format` for `tenant`, with no scopes, the
    /// format's default environment and region, and no expiry.
    #[must_use]
    pub fn new(name: impl Into<String>, format: KeyFormat, tenant: Tenant) -> Self {
        Self {
            name: name.into(),
            format,
            tenant,
            scopes: Arc::from([]),
            environment: None,
            region: None,
            lifetime: None,
            calendar_year: false,
            not_after: None,
            plan: None,
            metadata: BTreeMap::new(),
        }
    }

    /// Grants `scopes` (e.g. `["applications:read", "webhooks:write"]`).
    ///
    /// # Errors
    ///
    /// [`ScopeError::Syntax`] for a malformed scope. Unknown scopes are
    /// refused by [`KeyManager::create`].
    pub fn scopes(mut self, scopes: &[&str]) -> Result<Self, ScopeError> {
        let parsed: Arc<[Scope]> = scopes.iter().map(|s| s.parse()).collect::<Result<_, _>>()?;
        self.scopes = distinct(parsed);
        Ok(self)
    }

    /// Grants already-parsed `scopes` (a `Vec<Scope>`, or a shared list).
    /// A scope listed twice is kept once.
    #[must_use]
    pub fn with_scopes(mut self, scopes: impl Into<Arc<[Scope]>>) -> Self {
        self.scopes = distinct(scopes.into());
        self
    }

    /// The environment: for formats with an environment segment it must be
    /// one of theirs; for others it is recorded and enforced by
    /// authentication (e.g. a `staging` ingestion key).
    #[must_use]
    pub fn environment(mut self, env: Environment) -> Self {
        self.environment = Some(env);
        self
    }

    /// The region, for formats with a region segment.
    #[must_use]
    pub fn region(mut self, region: Region) -> Self {
        self.region = Some(region);
        self
    }

    /// The key stops working `lifetime` after creation. A management
    /// token's must be one of [`TokenExpiry`]'s; 365 days given here is
    /// 365 days, not the calendar year of
    /// [`token_expiry`](Self::token_expiry)`(`[`TokenExpiry::Year1`]`)`.
    #[must_use]
    pub fn expires_in(mut self, lifetime: Duration) -> Self {
        self.lifetime = Some(lifetime);
        self.calendar_year = false;
        self
    }

    /// A management-token lifetime: 30 days, 90 days, 1 year (a calendar
    /// year, in UTC) or never.
    #[must_use]
    pub fn token_expiry(mut self, expiry: TokenExpiry) -> Self {
        self.lifetime = expiry.duration();
        self.calendar_year = expiry == TokenExpiry::Year1;
        self
    }

    /// The rate-limit plan name.
    #[must_use]
    pub fn plan(mut self, plan: impl Into<String>) -> Self {
        self.plan = Some(plan.into());
        self
    }

    /// Adds a metadata entry.
    #[must_use]
    pub fn metadata(mut self, key: impl Into<SmolStr>, value: impl Into<SmolStr>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Replaces all metadata.
    #[must_use]
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }
}

/// A newly created key: the full key, shown once, and its stored record.
pub struct CreatedKey {
    key: ApiKey,
    record: Arc<KeyRecord>,
}

impl CreatedKey {
    /// The full key. Show it to its owner once; it is not stored anywhere.
    #[must_use]
    pub fn key(&self) -> &ApiKey {
        &self.key
    }

    /// The stored record (digest and metadata).
    #[must_use]
    pub fn record(&self) -> &KeyRecord {
        &self.record
    }

    /// Both parts.
    #[must_use]
    pub fn into_parts(self) -> (ApiKey, Arc<KeyRecord>) {
        (self.key, self.record)
    }
}

impl fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreatedKey").field("record", &self.record).finish_non_exhaustive()
    }
}

/// Why a lifecycle operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManagerError {
    /// The format cannot mint what was asked (environment, region, RNG).
    #[error("cannot mint: {0}")]
    Mint(#[from] MintError),
    /// A scope is malformed, unknown, or exceeds the parent's grants.
    #[error(transparent)]
    Scope(#[from] ScopeError),
    /// On behalf of a caller, metadata under a prefix the library keeps
    /// for itself (`keygate.`, as in [`ROLLED_FROM`]; `portal.`): a caller
    /// setting `keygate.rolled_from` could block a roll of another key.
    #[error("metadata key `{key}` is reserved")]
    ReservedMetadata {
        /// The key.
        key: String,
    },
    /// The key was already rolled and its replacement (or, that one rolled
    /// in turn, its latest replacement) is active: roll that one instead (a
    /// second roll's key would stop when the first roll's grace ends).
    #[error("key was already rolled; roll its replacement")]
    AlreadyRolled,
    /// The project already holds the maximum number of active keys.
    #[error("project already has {max} active keys")]
    LimitReached {
        /// The cap.
        max: u32,
    },
    /// No record has that id, or (for [`KeyManager::revoke_for`] and
    /// [`KeyManager::roll_for`]) none the caller reaches. On behalf of a
    /// caller, use the `_for` forms: [`KeyManager::revoke`] and
    /// [`KeyManager::roll`] look a record up by id alone.
    #[error("no such key")]
    NotFound,
    /// The key is revoked or expired, so it cannot be rolled; or the
    /// parent or caller a key is created or rolled for has expired (the
    /// key would expire on arrival).
    #[error("key is not active")]
    Inactive,
    /// The parent principal may not create keys for that tenant.
    #[error("parent credential does not reach that tenant")]
    TenantNotReachable,
    /// The parent principal may not create keys for that environment (a
    /// `test` key cannot mint a `live` one).
    #[error("parent credential does not reach that environment")]
    EnvironmentNotReachable,
    /// The parent principal is bound to a region and may create keys only
    /// of that region, in a format that carries it (a key without a region
    /// would reach every region).
    #[error("parent credential does not reach that region")]
    RegionNotReachable,
    /// Only a management token may create (or roll) a management token: the format
    /// is itself a capability (it alone mints portal sessions), which a
    /// key of another format must not hand itself through a child. No
    /// caller may create or roll a portal access token: only redeeming a
    /// portal session mints one.
    #[error(
        "only a management token can create a management token, and no caller a portal access token"
    )]
    FormatNotReachable,
    /// The requested lifetime is zero or too long to represent, or, for a
    /// management token, not one of 30 days, 90 days or a year.
    #[error(
        "key lifetime must be positive and end before the year 9999 (management tokens: 30d, 90d, 1y or never)"
    )]
    Lifetime,
    /// The record's format is not one the manager knows.
    #[error("unknown key format `{0}`")]
    UnknownFormat(String),
    /// The key names a plan the manager was told is not offered
    /// ([`KeyManager::plans`]).
    #[error("unknown plan `{0}`")]
    UnknownPlan(String),
    /// A generated id or key collided with an existing one (vanishingly
    /// unlikely; retry).
    #[error("generated id collided; retry")]
    Collision,
    /// The store failed.
    #[error("key store failed: {0}")]
    Backend(#[from] BackendError),
}

impl ManagerError {
    /// The rejection to show a management API caller.
    #[must_use]
    pub fn rejection(&self) -> Rejection {
        match self {
            Self::Mint(e @ MintError::Region) => {
                Rejection::BadRequest { field: "region".into(), message: e.to_string() }
            }
            Self::Mint(e @ MintError::Environment) => {
                Rejection::BadRequest { field: "environment".into(), message: e.to_string() }
            }
            // Asking for more than the parent holds, or for another tenant,
            // is a 403; the wire message stays generic.
            Self::Scope(ScopeError::Exceeds { .. })
            | Self::TenantNotReachable
            | Self::EnvironmentNotReachable
            | Self::RegionNotReachable
            | Self::FormatNotReachable => Rejection::Forbidden { scope: None },
            Self::Lifetime => {
                Rejection::BadRequest { field: "expiresInDays".into(), message: self.to_string() }
            }
            Self::Scope(e) => {
                Rejection::BadRequest { field: "scopes".into(), message: e.to_string() }
            }
            Self::ReservedMetadata { .. } => {
                Rejection::BadRequest { field: "metadata".into(), message: self.to_string() }
            }
            Self::UnknownPlan(_) => {
                Rejection::BadRequest { field: "plan".into(), message: self.to_string() }
            }
            Self::LimitReached { .. } | Self::Inactive | Self::AlreadyRolled => {
                Rejection::Conflict { message: self.to_string() }
            }
            Self::NotFound => Rejection::NotFound,
            // A record of a format this manager does not know: deployment.
            Self::UnknownFormat(_) => Rejection::Misconfigured,
            Self::Mint(MintError::Rng) | Self::Collision | Self::Backend(_) => {
                Rejection::Unavailable
            }
        }
    }
}

/// Creates, lists, revokes and rolls keys.
pub struct KeyManager<S, C = SystemClock> {
    store: S,
    hasher: Hasher,
    formats: FormatSet,
    registry: Arc<ScopeRegistry>,
    clock: C,
    max_active: Option<u32>,
    cache: Option<Arc<PrincipalCache>>,
    /// The plans keys may name, if told ([`plans`](KeyManager::plans)).
    plans: Option<Arc<[String]>>,
}

impl<S, C> fmt::Debug for KeyManager<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyManager")
            .field("hasher", &self.hasher)
            .field("max_active", &self.max_active)
            .finish_non_exhaustive()
    }
}

impl<S: KeyStore> KeyManager<S> {
    /// A manager over `store`: SHA-256 digests, preset formats, the default
    /// scope registry, the system clock, at most 10 active keys per project.
    #[must_use]
    pub fn new(store: S) -> Self {
        Self {
            store,
            hasher: Hasher::sha256(),
            formats: FormatSet::presets(),
            registry: Arc::new(ScopeRegistry::default()),
            clock: SystemClock::new(),
            max_active: Some(10),
            cache: None,
            plans: None,
        }
    }
}

impl<S: KeyStore + Clone, C: Clock + Clone> KeyManager<S, C> {
    /// A manager that creates what `auth` verifies and revokes what it
    /// caches: its store (a clone: the same records), hasher, formats,
    /// scope registry, clock and principal cache. Built apart, one
    /// mismatch goes unnoticed — a pepper on one side only, a store that is
    /// not a clone of the other, a cache not shared — and every new key
    /// then reads as unknown, like a guessed one, or a revoked key keeps
    /// working until its cache entry ages out; nothing errs. Otherwise as
    /// [`new`](KeyManager::new): at most 10 active keys per project, any
    /// plan name (see [`plans`](Self::plans)).
    #[must_use]
    pub fn for_authenticator(auth: &crate::auth::Authenticator<S, C>) -> Self {
        let (hasher, formats, registry, cache) = auth.parts();
        let manager = KeyManager::new(auth.store().clone())
            .hasher(hasher.clone())
            .formats(formats.clone())
            .registry(Arc::clone(registry))
            .clock(auth.clock_ref().clone());
        match cache {
            Some(cache) => manager.cache(Arc::clone(cache)),
            None => manager,
        }
    }
}

impl<S: KeyStore, C: Clock> KeyManager<S, C> {
    /// Uses `clock` for creation and expiry times.
    #[must_use]
    pub fn clock<C2: Clock>(self, clock: C2) -> KeyManager<S, C2> {
        KeyManager {
            store: self.store,
            hasher: self.hasher,
            formats: self.formats,
            registry: self.registry,
            clock,
            max_active: self.max_active,
            cache: self.cache,
            plans: self.plans,
        }
    }

    /// Digests new keys with `hasher` (share it with the authenticator).
    #[must_use]
    pub fn hasher(mut self, hasher: Hasher) -> Self {
        self.hasher = hasher;
        self
    }

    /// Formats that [`roll`](Self::roll) can re-mint (by name).
    #[must_use]
    pub fn formats(mut self, formats: FormatSet) -> Self {
        self.formats = formats;
        self
    }

    /// Validates scopes against `registry`.
    #[must_use]
    pub fn registry(mut self, registry: Arc<ScopeRegistry>) -> Self {
        self.registry = registry;
        self
    }

    /// Caps active keys per project (`None`: no cap). Default 10.
    #[must_use]
    pub fn max_active_per_project(mut self, max: Option<u32>) -> Self {
        self.max_active = max;
        self
    }

    /// Refuses to create a key naming a plan `plans` lacks
    /// ([`ManagerError::UnknownPlan`], a 400 naming `plan`): give it the
    /// gate's [`PlanSet`](crate::limit::PlanSet), whose `Gate` would
    /// otherwise answer every request of such a key with a 500 (its
    /// deployment's error, found only once the key is used). A key naming
    /// no plan is under the gate's default. Rolls keep the plan a key has.
    /// By default any name is taken, for hosts that check plans themselves.
    #[must_use]
    pub fn plans(mut self, plans: &crate::limit::PlanSet) -> Self {
        self.plans = Some(plans.iter().map(|p| p.name().to_owned()).collect());
        self
    }

    /// Drops revoked keys from `cache` at once.
    #[must_use]
    pub fn cache(mut self, cache: Arc<PrincipalCache>) -> Self {
        self.cache = Some(cache);
        self
    }

    /// The store.
    #[must_use]
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Mints a key, stores its record (digest only), and returns both.
    ///
    /// Whatever `new` asks for is granted — any tenant, any scopes (`*`
    /// included), any format (management tokens and portal access tokens
    /// included), any expiry: an operator's call. On behalf of a caller (an
    /// API request), use [`create_for`](Self::create_for), which holds the
    /// new key to what the caller reaches and holds.
    ///
    /// # Errors
    ///
    /// [`ManagerError::Scope`] for unknown scopes, [`ManagerError::Mint`]
    /// for an environment or region the format lacks,
    /// [`ManagerError::Lifetime`] for a lifetime the format does not offer,
    /// [`ManagerError::LimitReached`] when the project is full,
    /// [`ManagerError::UnknownPlan`] for a plan outside
    /// [`plans`](Self::plans) (once told) or an empty plan name,
    /// [`ManagerError::Collision`] when the minted key or id is taken, and
    /// [`ManagerError::Backend`] when the store fails (a key it may have
    /// stored before failing to answer is revoked: its secret is never
    /// shown).
    ///
    /// # Cancellation
    ///
    /// A creation whose future is dropped once the store has stored the
    /// key (a client gone, a timeout around the call) cannot revoke it: the
    /// key stays stored and active, its secret gone with the future, and it
    /// counts against its project's cap. List it (under the name asked
    /// for) and revoke it.
    pub async fn create(&self, new: NewKey) -> Result<CreatedKey, ManagerError> {
        // An empty name is no plan any set can hold: refused with or
        // without `plans` (else each request of the key is a 500).
        if let Some(plan) = &new.plan
            && (plan.is_empty() || self.plans.as_ref().is_some_and(|p| !p.contains(plan)))
        {
            return Err(ManagerError::UnknownPlan(plan.clone()));
        }
        self.insert_capped(new, self.max_active, None).await
    }

    /// [`create`](Self::create) on behalf of `parent`: the new key gets at
    /// most the parent's scopes, only a tenant the parent reaches, the
    /// parent's environment (when it has one; the new key's default), and
    /// expires no later than the parent. Its plan is whatever `new` says:
    /// the host's entitlement decision, never a caller's input passed
    /// through unchecked.
    ///
    /// # Errors
    ///
    /// As [`create`](Self::create); [`ScopeError::Exceeds`] when asking for
    /// more than the parent holds; [`ManagerError::TenantNotReachable`];
    /// [`ManagerError::EnvironmentNotReachable`] when asking for another
    /// environment than the parent's; [`ManagerError::FormatNotReachable`]
    /// for a management token asked by a key of another format, or a
    /// portal access token asked by any caller;
    /// [`ManagerError::RegionNotReachable`]
    /// when the parent has a region and the key would have another or none;
    /// [`ManagerError::ReservedMetadata`] for metadata under
    /// [`RESERVED_METADATA`]; [`ManagerError::Inactive`] when the parent
    /// has expired since it was authenticated.
    pub async fn create_for(
        &self,
        parent: &Principal,
        mut new: NewKey,
    ) -> Result<CreatedKey, ManagerError> {
        if !parent.tenant().reaches(&new.tenant) {
            return Err(ManagerError::TenantNotReachable);
        }
        may_hold(parent, new.format.name())?;
        if let Some(env) = parent.environment() {
            match new.environment {
                None => new.environment = Some(env),
                Some(e) if e == env => {}
                Some(_) => return Err(ManagerError::EnvironmentNotReachable),
            }
        }
        if let Some(region) = parent.region() {
            match new.region {
                _ if new.format.segment() != Segment::Region => {
                    return Err(ManagerError::RegionNotReachable);
                }
                None => new.region = Some(region),
                Some(r) if r == region => {}
                Some(_) => return Err(ManagerError::RegionNotReachable),
            }
        }
        if let Some(key) = new.metadata.keys().find(|k| is_reserved_metadata(k)) {
            return Err(ManagerError::ReservedMetadata { key: key.to_string() });
        }
        new.not_after = earliest(new.not_after, parent.expires_at());
        let requested = self.registry.compile(&new.scopes)?;
        let granted = self.registry.attenuate(requested, &parent.scopes_in(&self.registry))?;
        new.scopes = self.stored_scopes(&new.scopes, granted, &parent.record().scopes);
        self.create(new).await
    }

    /// The scopes to store for a child: a wildcard the parent holds as text
    /// (the same `resource:*`, or `*`) stays a wildcard, since it can only
    /// grow as far as the parent's does; any other wildcard becomes the
    /// concrete scopes checked here, or it would grow with the registry (a
    /// resource added later, a larger registry where it is compiled again)
    /// past the parent.
    fn stored_scopes(&self, asked: &[Scope], granted: ScopeSet, parent: &[Scope]) -> Arc<[Scope]> {
        if asked.iter().all(|s| textually_held(parent, s)) {
            return asked.into();
        }
        let mut out: Vec<Scope> =
            asked.iter().filter(|s| textually_held(parent, s)).cloned().collect();
        let kept = self.registry.compile_known(&out);
        out.extend(self.registry.scopes_of(&granted.difference(kept)));
        out.into()
    }

    /// A management token (`nhm_…`) for `workspace`.
    ///
    /// # Errors
    ///
    /// As [`create`](Self::create).
    pub async fn create_management_token(
        &self,
        workspace: WorkspaceId,
        name: impl Into<String>,
        expiry: TokenExpiry,
        scopes: Vec<Scope>,
    ) -> Result<CreatedKey, ManagerError> {
        let new = NewKey::new(name, NHM, Tenant::workspace(workspace))
            .with_scopes(scopes)
            .token_expiry(expiry);
        self.create(new).await
    }

    /// Mints and stores `new`, with at most `max` active keys in its project
    /// and, for a roll, the record `replacing` still active and not counted
    /// (both checked in the insert's atomic step).
    async fn insert_capped(
        &self,
        new: NewKey,
        max: Option<u32>,
        replacing: Option<RecordId>,
    ) -> Result<CreatedKey, ManagerError> {
        self.registry.compile(&new.scopes)?;
        let mut spec = MintSpec::new();
        let mut environment = new.environment;
        if let (Segment::Environments(_), Some(e)) = (new.format.segment(), new.environment) {
            spec = spec.environment(e);
        }
        if let Some(r) = new.region {
            spec = spec.region(r);
        }
        // One OS call for the key and its record id.
        let mut rng = OsBatch::new(new.format.random_bytes() + RecordId::RANDOM_BYTES);
        let key = new.format.mint_with_rng(spec, &mut rng)?;
        if key.environment().is_some() {
            environment = key.environment();
        }
        let now = self.clock.now();
        // Management tokens offer exactly the seed's choices.
        let token_choice = |d: Duration| {
            [TokenExpiry::Days30, TokenExpiry::Days90, TokenExpiry::Year1]
                .iter()
                .any(|e| e.duration() == Some(d))
        };
        let expires_at = match new.lifetime {
            Some(d) if d.is_zero() => return Err(ManagerError::Lifetime),
            Some(d) if new.format.name() == NHM.name() && !token_choice(d) => {
                return Err(ManagerError::Lifetime);
            }
            Some(_) if new.calendar_year => Some(a_year_after(now).ok_or(ManagerError::Lifetime)?),
            Some(d) => {
                let d = SignedDuration::try_from(d).map_err(|_| ManagerError::Lifetime)?;
                Some(now.checked_add(d).map_err(|_| ManagerError::Lifetime)?)
            }
            None => None,
        };
        let expires_at = earliest(expires_at, new.not_after);
        if expires_at.is_some_and(|e| e <= now) {
            // Capped by a parent or caller that has expired since it was
            // authenticated: the key would be dead on arrival (and a roll
            // would shorten the old key's life for it).
            return Err(ManagerError::Inactive);
        }
        let id = RecordId::generate_os(&mut rng)?;
        drop(rng);
        let record = Arc::new(KeyRecord {
            id,
            name: new.name.into(),
            hint: key.hint(),
            digest: self.hasher.digest(key.expose_secret().as_bytes()),
            format: SmolStr::new_static(key.format().name()),
            key_id: key.key_id(),
            environment,
            region: key.region(),
            tenant: new.tenant,
            scopes: new.scopes,
            plan: new.plan,
            created_at: now,
            expires_at,
            revoked_at: None,
            last_used_at: None,
            metadata: new.metadata,
        });
        let limit = (max.is_some() || replacing.is_some()).then(|| ActiveLimit {
            max: max.unwrap_or(u32::MAX),
            now,
            replacing,
        });
        let outcome = match self.store.insert(Arc::clone(&record), limit).await {
            Ok(outcome) => outcome,
            // The store may have stored it before failing to answer (a
            // timeout): its secret is never shown, so it must not be left
            // working, counting against the project's cap and, a roll's
            // replacement, refusing a retry as rolled already.
            Err(e) => return Err(self.discard(&record.id, now, e.into()).await),
        };
        match outcome {
            InsertOutcome::Inserted => Ok(CreatedKey { key, record }),
            InsertOutcome::LimitReached { max } => Err(ManagerError::LimitReached { max }),
            InsertOutcome::ReplacingInactive => Err(ManagerError::Inactive),
            InsertOutcome::AlreadyReplaced => Err(ManagerError::AlreadyRolled),
            _ => Err(ManagerError::Collision),
        }
    }

    /// Records of `workspace` (narrowed to `project`), oldest first. Metadata
    /// only: a record holds a digest, never a key.
    ///
    /// Every record of the workspace, whatever its project, environment or
    /// region: an operator's call. On behalf of a caller, use
    /// [`list_for`](Self::list_for).
    ///
    /// # Errors
    ///
    /// The store's [`BackendError`].
    pub async fn list(
        &self,
        workspace: &WorkspaceId,
        project: Option<&ProjectId>,
    ) -> Result<Vec<Arc<KeyRecord>>, ManagerError> {
        Ok(self.store.list(workspace, project).await?)
    }

    /// [`list`](Self::list) on behalf of `caller`: the records of its
    /// workspace that it [reaches](Self::revoke_for) — its project's (or
    /// `project`'s, for a workspace-wide caller; none for a project-scoped
    /// caller asking for another project), its environment's and its
    /// region's.
    ///
    /// # Errors
    ///
    /// The store's [`BackendError`].
    pub async fn list_for(
        &self,
        caller: &Principal,
        project: Option<&ProjectId>,
    ) -> Result<Vec<Arc<KeyRecord>>, ManagerError> {
        let tenant = caller.tenant();
        let project = match (tenant.project.as_ref(), project) {
            // Another project than the caller's: nothing it reaches.
            (Some(own), Some(asked)) if own != asked => return Ok(Vec::new()),
            (Some(own), _) => Some(own),
            (None, asked) => asked,
        };
        let mut records = self.store.list(&tenant.workspace, project).await?;
        records.retain(|r| reaches(caller, r));
        Ok(records)
    }

    /// Revokes key `id`. It stops working at once in this process when this
    /// manager shares the authenticator's cache ([`cache`](Self::cache):
    /// the entry is dropped), and within the cache bound everywhere else.
    /// `Ok(false)` if it was already revoked — within the store's retention:
    /// once a revoked record is forgotten, it is `NotFound`.
    ///
    /// Revoking a management token also revokes the portal access tokens of
    /// the sessions it minted, where they are in this manager's store
    /// (found by listing the token's workspace: a cost in proportion to its
    /// records), and its links not opened yet stop opening
    /// ([`Portal::redeem`] checks the minter; see
    /// [`Portal::minters_elsewhere`]). They are ended before the token and
    /// again after it (a redemption may store one meanwhile). If revoking
    /// them fails, the error is returned, the token itself revoked all the
    /// same, and calling again finishes the job.
    ///
    /// [`Portal::redeem`]: crate::portal::Portal::redeem
    /// [`Portal::minters_elsewhere`]: crate::portal::Portal::minters_elsewhere
    ///
    /// This looks the record up by id alone: an operator's call. On behalf
    /// of a caller (an API request), use [`revoke_for`](Self::revoke_for).
    ///
    /// # Errors
    ///
    /// [`ManagerError::NotFound`] when there is no such record.
    ///
    /// # Cancellation
    ///
    /// A revocation whose future is dropped while the store revokes (the
    /// store may have done it) still drops the key from this manager's
    /// cache. For a management token, one dropped once the token is
    /// revoked leaves working at most the access tokens redeemed between
    /// the first ending of them and the token's revocation; calling again
    /// ends them.
    pub async fn revoke(&self, id: &RecordId) -> Result<bool, ManagerError> {
        let record = self.store.get(id).await?.ok_or(ManagerError::NotFound)?;
        self.revoke_found(&record).await
    }

    /// [`revoke`](Self::revoke) on behalf of `caller`: only a record it
    /// reaches — a tenant it [reaches](Tenant::reaches), its environment and
    /// its region, when it has them. Any other record is
    /// [`ManagerError::NotFound`], as if it did not exist: ids are not
    /// secret, so knowing one must not let a caller revoke another
    /// tenant's key.
    ///
    /// This checks reach, not permission: whether the caller may revoke
    /// keys at all is the route's scope (`api_keys:delete`, say), which the
    /// host requires before calling.
    ///
    /// # Errors
    ///
    /// As [`revoke`](Self::revoke).
    pub async fn revoke_for(
        &self,
        caller: &Principal,
        id: &RecordId,
    ) -> Result<bool, ManagerError> {
        match self.store.get(id).await? {
            Some(r) if reaches(caller, &r) => self.revoke_found(&r).await,
            _ => Err(ManagerError::NotFound),
        }
    }

    async fn revoke_found(&self, record: &KeyRecord) -> Result<bool, ManagerError> {
        let now = self.clock.now();
        let minter = record.format == NHM.name();
        // A management token's access tokens end before it does, too: a
        // revocation whose future is dropped once the store revoked the
        // token (a client gone, a timeout) leaves none of them working but
        // those redeemed in between.
        if minter && let Err(e) = self.end_minted(record, now, None).await {
            // The token is revoked all the same: a listing that fails for
            // good (one record of the workspace the store cannot decode)
            // kept it working however often the host called again.
            self.revoke_id(&record.id, now).await?;
            return Err(e);
        }
        let revoked = self.revoke_id(&record.id, now).await?;
        // And after: tokens redeemed while it ran (a redemption that read
        // the minter before the revocation). Also when it was revoked
        // already: a retry after a failure here finishes the job.
        if minter {
            self.end_minted(record, now, None).await?;
        }
        Ok(revoked)
    }

    /// Ends the portal access tokens of the sessions `minter` minted
    /// (their records name it under
    /// [`MINTER_METADATA_KEY`](crate::portal::MINTER_METADATA_KEY)):
    /// revoked, or with `until` (a rolled minter's grace end), ending no
    /// later than that. Links not redeemed yet need nothing: redeeming
    /// checks the minter, and caps the token at the minter's expiry.
    async fn end_minted(
        &self,
        minter: &KeyRecord,
        now: Timestamp,
        until: Option<Timestamp>,
    ) -> Result<(), ManagerError> {
        let its_token = |r: &KeyRecord| {
            r.format == crate::portal::ACCESS_TOKEN.name()
                && r.is_active(now)
                && r.metadata
                    .get(crate::portal::MINTER_METADATA_KEY)
                    .is_some_and(|m| m == minter.id.as_str())
        };
        for r in self.store.list(&minter.tenant.workspace, None).await? {
            if !its_token(&r) {
                continue;
            }
            match until {
                None => {
                    self.revoke_id(&r.id, now).await?;
                }
                Some(end) if r.expires_at.is_none_or(|e| e > end) => {
                    self.shorten_id(&r.id, end).await?;
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Revokes record `id` in the store and drops it from the cache.
    async fn revoke_id(&self, id: &RecordId, now: Timestamp) -> Result<bool, ManagerError> {
        // Also when the store failed to answer, or this future is dropped
        // while it runs: it may have revoked, and invalidating too often is
        // harmless.
        let invalidate = self.invalidate_after(id);
        let revoked = self.store.revoke(id, now).await;
        drop(invalidate);
        Ok(revoked?)
    }

    /// Shortens record `id`'s expiry to `end` (never extends) in the store
    /// and drops it from the cache, as [`revoke_id`](Self::revoke_id) does.
    async fn shorten_id(&self, id: &RecordId, end: Timestamp) -> Result<bool, BackendError> {
        let invalidate = self.invalidate_after(id);
        let shortened = self.store.shorten_expiry(id, end).await;
        drop(invalidate);
        shortened
    }

    /// Drops record `id` from the cache when dropped: after the store call
    /// it is held across, whether that answered, failed or had its future
    /// dropped (the store may have applied it all the same).
    fn invalidate_after<'a>(&'a self, id: &'a RecordId) -> InvalidateOnDrop<'a> {
        InvalidateOnDrop { cache: self.cache.as_deref(), id }
    }

    /// Replaces key `id` with a new key of the same format, grants and
    /// expiry. The old key keeps working for `grace` — but never past its
    /// own expiry — and then stops (a grace past the last time there is,
    /// `Duration::MAX`, leaves it as it was). While both work the project may hold
    /// one key over its cap (the one being replaced), and no more: rolling
    /// a second key while one roll's grace runs in a full project is
    /// [`ManagerError::LimitReached`]. Rolling a key again while its
    /// replacement is active — or, the replacement rolled in turn, the
    /// replacement's replacement — is [`ManagerError::AlreadyRolled`] (roll
    /// the latest replacement). The replacement's metadata names the key
    /// it replaced under [`ROLLED_FROM`]. Rolling a management token ends
    /// the portal access tokens it minted with its grace (best effort: the
    /// replacement's secret is returned even if that fails; a link opened
    /// later is capped at the minter's end when redeemed).
    ///
    /// This looks the record up by id alone and hands back a working
    /// secret with its grants: an operator's call. On behalf of a caller
    /// (an API request), use [`roll_for`](Self::roll_for).
    ///
    /// # Errors
    ///
    /// [`ManagerError::NotFound`], [`ManagerError::Inactive`] for a revoked
    /// or expired key, [`ManagerError::AlreadyRolled`],
    /// [`ManagerError::UnknownFormat`], [`ManagerError::LimitReached`], or
    /// the store's error (if storing the new key, listing the key's line
    /// again or shortening the old key's expiry fails, the new key is
    /// revoked: its secret was never shown; a shortening the store made
    /// before failing to answer, as a read of the key then shows, is a
    /// roll done).
    ///
    /// # Cancellation
    ///
    /// A roll whose future is dropped once the replacement is stored (a
    /// client gone, a timeout) cannot revoke it: the replacement stays
    /// stored, its secret gone with the future, and the old key is cut to
    /// its grace or not yet. A retry is then [`ManagerError::AlreadyRolled`]:
    /// revoke the replacement (listed, naming the key under
    /// [`ROLLED_FROM`]) and roll again; the new replacement keeps the key's
    /// own expiry, not the grace's. The old key's cut, if the store made
    /// it, holds in this manager's cache all the same.
    pub async fn roll(&self, id: &RecordId, grace: Duration) -> Result<CreatedKey, ManagerError> {
        let old = self.store.get(id).await?.ok_or(ManagerError::NotFound)?;
        self.roll_found(old, grace, None).await
    }

    /// [`roll`](Self::roll) on behalf of `caller`: only a record it reaches
    /// (as [`revoke_for`](Self::revoke_for); any other is
    /// [`ManagerError::NotFound`]), only when it holds every scope of the
    /// key, each wildcard of the key as text too (the replacement's secret
    /// goes to the caller, with the key's scopes as stored: rolling must not
    /// hand it more than it could [create](Self::create_for), now or once
    /// the registry grows), and the replacement expires no later than the
    /// caller.
    ///
    /// # Errors
    ///
    /// As [`roll`](Self::roll) ([`ManagerError::Inactive`] also when the
    /// caller has expired since it was authenticated);
    /// [`ManagerError::Scope`] —
    /// [`ScopeError::Exceeds`] when the key holds scopes the caller does
    /// not, `Unknown` when its stored scopes do not compile under the
    /// manager's registry.
    pub async fn roll_for(
        &self,
        caller: &Principal,
        id: &RecordId,
        grace: Duration,
    ) -> Result<CreatedKey, ManagerError> {
        let old = match self.store.get(id).await? {
            Some(r) if reaches(caller, &r) => r,
            _ => return Err(ManagerError::NotFound),
        };
        may_hold(caller, &old.format)?;
        let held = self.registry.compile(&old.scopes)?;
        self.registry.attenuate(held, &caller.scopes_in(&self.registry))?;
        // The replacement keeps the old key's scopes as text: a wildcard the
        // caller does not hold as text would grow with the registry past it.
        if let Some(w) = old.scopes.iter().find(|s| !textually_held(&caller.record().scopes, s)) {
            return Err(ScopeError::Exceeds { scope: w.as_str().to_owned() }.into());
        }
        self.roll_found(old, grace, Some(caller)).await
    }

    async fn roll_found(
        &self,
        old: Arc<KeyRecord>,
        grace: Duration,
        caller: Option<&Principal>,
    ) -> Result<CreatedKey, ManagerError> {
        let id = &old.id;
        let now = self.clock.now();
        if !old.is_active(now) {
            return Err(ManagerError::Inactive);
        }
        let format = *self
            .formats
            .get(&old.format)
            .ok_or_else(|| ManagerError::UnknownFormat(old.format.to_string()))?;
        // Rolled already (a retry that lost the first answer, say): the
        // first replacement is active, and a second would inherit the
        // grace's end as its expiry. Two rolls racing can both pass this
        // check; the store's insert refuses the second
        // (`InsertOutcome::AlreadyReplaced`). Checked here too for
        // replacements stored before stores tracked them. Its replacements'
        // replacements count too: a replacement that was rolled itself stops
        // when its grace ends, but the key's line goes on in the next one
        // (which the store, tracking one step, does not see; a roll of a
        // replacement racing this one is caught by listing again once the
        // new key is stored).
        let siblings = self.store.list(&old.tenant.workspace, old.tenant.project.as_ref()).await?;
        let earlier = descendants(&siblings, id);
        if earlier.iter().any(|r| r.is_active(now)) {
            return Err(ManagerError::AlreadyRolled);
        }
        // Rolled before, its replacement since revoked: the old key's expiry
        // is now that roll's grace end. Its own expiry is at least what the
        // earlier replacements (and theirs) were given and at least what it
        // holds now (the latest of them; `None` is never): each is capped by
        // the key's own, but a replacement rolled for a caller also by the
        // caller's (which may have passed since), and the stored expiry by
        // the grace. Once the store has forgotten them, the grace end it
        // is: never later than the key's own, only shorter.
        let own_expiry = earlier.iter().map(|r| r.expires_at).fold(old.expires_at, latest);
        let mut metadata = old.metadata.clone();
        metadata.insert(SmolStr::new_static(ROLLED_FROM), id.into());
        let mut new = NewKey::new(old.name.clone(), format, old.tenant.clone())
            .with_scopes(old.scopes.clone())
            .with_metadata(metadata);
        new.environment = old.environment;
        new.region = old.region;
        new.plan.clone_from(&old.plan);
        // Same expiry as the key it replaces (no later than the caller's),
        // set in the insert itself.
        new.not_after = earliest(own_expiry, caller.and_then(Principal::expires_at));
        // The old key, checked active again in the insert itself (a
        // revocation may have come since), is not counted: one over the
        // cap during the grace, no more.
        let created = self.insert_capped(new, self.max_active, Some(id.clone())).await?;
        // Listed again once stored: a listing that is not a snapshot (Redis
        // reads the ids, then their records) may have shown a replacement
        // ended by its own roll, racing this one, without that roll's
        // replacement, stored in between: the key's line goes on there.
        // Stored before the first listing read the ended one, it shows now.
        let new_id = &created.record().id;
        let other_line =
            match self.store.list(&old.tenant.workspace, old.tenant.project.as_ref()).await {
                Ok(again) => {
                    descendants(&again, id).iter().any(|r| r.id != *new_id && r.is_active(now))
                }
                Err(e) => return Err(self.discard(new_id, now, e.into()).await),
            };
        if other_line {
            return Err(self.discard(new_id, now, ManagerError::AlreadyRolled).await);
        }
        let grace = crate::clock::signed_duration(grace);
        // A grace past the last time there is (`Duration::MAX`) keeps the
        // old key as it is: nothing to cut, and no `Timestamp::MAX` written
        // to a store that keeps fewer years (nanoseconds in a `BIGINT` end
        // in 2262).
        let Ok(end) = now.checked_add(grace) else { return Ok(created) };
        // `shorten_expiry` never extends: the grace cannot outlive the old
        // key's own expiry.
        if let Err(e) = self.shorten_id(id, end).await
            && !self.ends_by(id, end).await
        {
            return Err(self.discard(new_id, now, e.into()).await);
        }
        if old.format == NHM.name() {
            // The portal access tokens it minted end with it (best effort:
            // the replacement is stored and its secret must be shown).
            let _ = self.end_minted(&old, now, Some(end)).await;
        }
        Ok(created)
    }

    /// Whether record `id` is stored ending by `end`, read after a cut to
    /// `end` failed: the store may have made it before failing to answer (a
    /// timeout), and the roll is then done. Revoking the replacement would
    /// leave the key's holder an error, the old key ending with the grace
    /// and no key after it. A read that fails too says no.
    async fn ends_by(&self, id: &RecordId, end: Timestamp) -> bool {
        let stored = self.store.get(id).await.ok().flatten();
        stored.and_then(|r| r.expires_at).is_some_and(|e| e <= end)
    }

    /// Revokes the new key `id` (a roll's replacement, say) of a creation
    /// that fails with `e` (best effort): its secret is never shown, and an
    /// orphan would count against the cap. `e`.
    async fn discard(&self, id: &RecordId, now: Timestamp, e: ManagerError) -> ManagerError {
        let _ = self.store.revoke(id, now).await;
        e
    }
}

/// Invalidates a record's cache entries when dropped (see
/// [`KeyManager::invalidate_after`]).
struct InvalidateOnDrop<'a> {
    cache: Option<&'a PrincipalCache>,
    id: &'a RecordId,
}

impl Drop for InvalidateOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(cache) = self.cache {
            cache.invalidate(self.id);
        }
    }
}

/// Metadata key on a rolled key's replacement: the id it replaced.
pub const ROLLED_FROM: &str = "keygate.rolled_from";

/// Metadata prefixes a caller's key ([`KeyManager::create_for`]) and a
/// portal session's request may not carry: those the library keeps for
/// itself (`keygate.`, `portal.`), and `serde_json`'s private token prefix.
/// With `serde_json`'s `raw_value` feature, which keygate turns on (and
/// Cargo then turns on for every crate of the build), a `serde_json::Value`
/// reads an object whose first key is `$serde_json::private::RawValue` as
/// the JSON text in its value: a host reading a record's metadata back
/// through `Value` would get other metadata, reserved keys included.
pub const RESERVED_METADATA: &[&str] =
    &["keygate.", crate::portal::RESERVED_METADATA_PREFIX, "$serde_json::private::"];

/// Whether `caller` may obtain a key of `format` (create one, or roll one
/// for its new secret): a management token only for a management token,
/// since that format alone mints portal sessions; a portal access token
/// for no caller: only redeeming a session mints one (with the role's
/// scopes and its minter recorded, so revoking the minter reaches it).
fn may_hold(caller: &Principal, format: &str) -> Result<(), ManagerError> {
    if format == crate::portal::ACCESS_TOKEN.name()
        || (format == NHM.name() && caller.format() != NHM.name())
    {
        return Err(ManagerError::FormatNotReachable);
    }
    Ok(())
}

/// Whether metadata `key` is under one of [`RESERVED_METADATA`].
pub(crate) fn is_reserved_metadata(key: &str) -> bool {
    RESERVED_METADATA.iter().any(|p| key.starts_with(p))
}

/// Whether `scope` can grow no further than `parent`'s scopes do: a
/// concrete scope (checked against the compiled grants elsewhere), or a
/// wildcard `parent` holds as text (the same `resource:*`, or `*`).
fn textually_held(parent: &[Scope], scope: &Scope) -> bool {
    !scope.is_wildcard() || parent.iter().any(|p| p == scope || p.as_str() == "*")
}

/// Whether `caller` may act on `record`: a tenant it reaches, and its
/// environment and region when it has them.
fn reaches(caller: &Principal, record: &KeyRecord) -> bool {
    caller.tenant().reaches(&record.tenant)
        && caller.environment().is_none_or(|e| record.environment == Some(e))
        && caller.region().is_none_or(|r| record.region == Some(r))
}

/// The records in `records` that replaced `id`, directly or through a
/// chain of rolls (each names the key it replaced under [`ROLLED_FROM`]).
/// One pass over `records` (a workspace's, for a key without a project).
fn descendants<'a>(records: &'a [Arc<KeyRecord>], id: &RecordId) -> Vec<&'a Arc<KeyRecord>> {
    let mut children: std::collections::HashMap<&str, Vec<&Arc<KeyRecord>>> =
        std::collections::HashMap::new();
    for r in records {
        if let Some(from) = r.metadata.get(ROLLED_FROM) {
            children.entry(from.as_str()).or_default().push(r);
        }
    }
    let mut out: Vec<&Arc<KeyRecord>> = Vec::new();
    // Metadata an operator set could make a cycle: each record once.
    let mut seen = std::collections::HashSet::from([id.as_str()]);
    let mut next = vec![id.as_str()];
    while let Some(parent) = next.pop() {
        for &r in children.get(parent).into_iter().flatten() {
            if seen.insert(r.id.as_str()) {
                out.push(r);
                next.push(r.id.as_str());
            }
        }
    }
    out
}

/// The same date and time a year after `now`, in UTC (29 February goes to
/// the 28th); `None` past the end of time.
fn a_year_after(now: Timestamp) -> Option<Timestamp> {
    let utc = jiff::tz::Offset::UTC;
    let then = utc.to_datetime(now).checked_add(jiff::Span::new().years(1)).ok()?;
    utc.to_timestamp(then).ok()
}

/// The later of two optional deadlines (`None` is "never").
fn latest(a: Option<Timestamp>, b: Option<Timestamp>) -> Option<Timestamp> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        _ => None,
    }
}

/// The earlier of two optional deadlines (`None` is "never").
fn earliest(a: Option<Timestamp>, b: Option<Timestamp>) -> Option<Timestamp> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
