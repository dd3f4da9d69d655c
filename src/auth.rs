//! Request headers → [`Principal`] or a typed [`AuthError`]: the caller sees
//! one uniform rejection, the host's logs see exactly why.

mod cache;
mod credentials;

use std::borrow::Cow;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use jiff::Timestamp;

pub use cache::PrincipalCache;
#[cfg(feature = "tower")]
pub(crate) use credentials::visible_ascii;
pub use credentials::{CredentialError, HeaderRules, Source};

use cache::{InFlight, LastUse};

use crate::backend::BackendError;
use crate::clock::{Clock, SystemClock, duration_nanos};
use crate::format::{Environment, FormatSet, ParseError, Region};
use crate::hash::Hasher;
use crate::http::{AuthScheme, Rejection};
use crate::scope::{Layout, Required, ScopeError, ScopeRegistry, ScopeSet};
use crate::store::{KeyRecord, KeyStore, Metadata, RecordId, Tenant};

/// Who a request is: what authentication yields. Cheap to clone.
#[derive(Clone)]
pub struct Principal(Arc<PrincipalInner>);

#[cfg(feature = "tower")]
impl Principal {
    /// A handle naming exactly this value, for marks that vouch for it. It
    /// keeps the value's allocation (not the value) alive, so no other
    /// principal can take its address while the handle is held.
    pub(crate) fn handle(&self) -> PrincipalHandle {
        PrincipalHandle(Arc::downgrade(&self.0))
    }

    /// Whether `handle` names this very value.
    pub(crate) fn is(&self, handle: &PrincipalHandle) -> bool {
        std::ptr::eq(Arc::as_ptr(&self.0), handle.0.as_ptr())
    }
}

/// See [`Principal::handle`].
#[cfg(feature = "tower")]
#[derive(Clone)]
pub(crate) struct PrincipalHandle(std::sync::Weak<PrincipalInner>);

#[cfg(feature = "tower")]
impl fmt::Debug for PrincipalHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrincipalHandle")
    }
}

struct PrincipalInner {
    record: Arc<KeyRecord>,
    scopes: ScopeSet,
    /// The bit layout `scopes` was compiled under.
    layout: Layout,
    /// The authenticator that verified it against its store
    /// ([`Authenticator`]'s `source`; 0 for one built by hand): a cache
    /// shared by authenticators of different stores serves each only its
    /// own principals.
    source: u64,
    /// Monotonic time at which a use of this principal was last noted, so
    /// cached principals skip last-use bookkeeping within an interval.
    use_noted: AtomicU64,
}

impl Principal {
    /// Builds the principal of `record`, compiling its scopes against
    /// `registry`.
    ///
    /// # Errors
    ///
    /// [`ScopeError::Unknown`] if the record holds a scope the registry does
    /// not know (a record written under a different registry).
    pub fn from_record(
        record: Arc<KeyRecord>,
        registry: &ScopeRegistry,
    ) -> Result<Self, ScopeError> {
        Self::verified_by(record, registry, 0)
    }

    /// [`from_record`](Self::from_record), as verified by the
    /// authenticator `source`.
    fn verified_by(
        record: Arc<KeyRecord>,
        registry: &ScopeRegistry,
        source: u64,
    ) -> Result<Self, ScopeError> {
        let scopes = registry.compile(&record.scopes)?;
        let layout = registry.layout();
        let use_noted = AtomicU64::new(0);
        Ok(Self(Arc::new(PrincipalInner { record, scopes, layout, source, use_noted })))
    }

    /// The key record the principal was built from (metadata only).
    #[must_use]
    pub fn record(&self) -> &KeyRecord {
        &self.0.record
    }

    /// The key record's public id.
    #[must_use]
    pub fn record_id(&self) -> &RecordId {
        &self.0.record.id
    }

    /// The key's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.0.record.name
    }

    /// The key's non-secret hint.
    #[must_use]
    pub fn hint(&self) -> &str {
        &self.0.record.hint
    }

    /// The key's format name.
    #[must_use]
    pub fn format(&self) -> &str {
        &self.0.record.format
    }

    /// The tenant.
    #[must_use]
    pub fn tenant(&self) -> &Tenant {
        &self.0.record.tenant
    }

    /// The environment, if the key has one.
    #[must_use]
    pub fn environment(&self) -> Option<Environment> {
        self.0.record.environment
    }

    /// The region, if the key has one.
    #[must_use]
    pub fn region(&self) -> Option<Region> {
        self.0.record.region
    }

    /// The granted scopes.
    #[must_use]
    pub fn scopes(&self) -> &ScopeSet {
        &self.0.scopes
    }

    /// The rate-limit plan name, if assigned.
    #[must_use]
    pub fn plan(&self) -> Option<&str> {
        self.0.record.plan.as_deref()
    }

    /// Whose units a request of this key spends under `plan`, as the
    /// [`LimitStore`](crate::limit::LimitStore) key — the tower layer's,
    /// for a host that limits requests itself (or beside a gate, on one
    /// store). Under the key's own plan, or `default_plan` (the
    /// deployment's, for keys that name none), the record id: one state,
    /// kept when the key is given a plan or changes it. Under another plan
    /// (a route's, for keys that name none or for every key),
    /// `{record id}#{plan}`, so that routes of different plans neither
    /// share nor mix one state, as their policies' names (`default` in
    /// every preset) would otherwise make them.
    #[must_use]
    pub fn limit_key(&self, plan: &crate::limit::Plan, default_plan: Option<&str>) -> Cow<'_, str> {
        let id = self.record_id().as_str();
        // The key's own plan, or the default for a key naming none: not any
        // plan of a key that names one (a route's plan for every key).
        if self.plan().or(default_plan) == Some(plan.name()) {
            Cow::Borrowed(id)
        } else {
            Cow::Owned(format!("{id}#{}", plan.name()))
        }
    }

    /// The [`QuotaStore`](crate::quota::QuotaStore) account of this key's
    /// monthly quotas under `plan`, as the tower layer counts them: the
    /// key's workspace and plan, `{workspace}/{plan}`, and for a key of an
    /// environment that too, `{workspace}.{environment}/{plan}`. Every key
    /// of a workspace on one plan in one environment draws on one monthly
    /// allowance, keys on another plan (or after a plan change) or of
    /// another environment on another, so a free key's use never eats a
    /// paid key's quota, a `test` key's never eats `live`'s, and making
    /// more keys on one plan buys nothing.
    #[must_use]
    pub fn quota_account(&self, plan: &crate::limit::Plan) -> String {
        // Unambiguous: workspace ids hold neither `.` nor `/`, environments
        // only lowercase letters and digits.
        let workspace = &self.tenant().workspace;
        match self.environment() {
            None => format!("{workspace}/{}", plan.name()),
            Some(env) => format!("{workspace}.{env}/{}", plan.name()),
        }
    }

    /// When the credential expires, if it does.
    #[must_use]
    pub fn expires_at(&self) -> Option<Timestamp> {
        self.0.record.expires_at
    }

    /// The record's metadata: the host's (plus
    /// [`ROLLED_FROM`](crate::manager::ROLLED_FROM) on a rolled key's
    /// replacement), or for a portal access token the
    /// session's metadata plus keys under the reserved `portal.` prefix
    /// that the library adds ([`ROLE_METADATA_KEY`](crate::portal::ROLE_METADATA_KEY)).
    #[must_use]
    pub fn metadata(&self) -> &Metadata {
        &self.0.record.metadata
    }

    /// The metadata without the keys under the reserved `portal.` prefix:
    /// for a portal access token, exactly the metadata its session was
    /// created with (what a host attaches to resources made during the
    /// session).
    pub fn session_metadata(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0
            .record
            .metadata
            .iter()
            .filter(|(k, _)| !k.starts_with(crate::portal::RESERVED_METADATA_PREFIX))
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The principal's grants as `registry` sees them: its own set when it
    /// was compiled under the same layout, else its scopes compiled again
    /// (skipping those `registry` does not know), as when an authenticator
    /// and a manager or portal hold different registries.
    pub(crate) fn scopes_in(&self, registry: &ScopeRegistry) -> ScopeSet {
        if self.0.layout == registry.layout() {
            self.0.scopes
        } else {
            registry.compile_known(&self.0.record.scopes)
        }
    }

    /// Whether the principal holds `scope`. Never, for a requirement
    /// compiled against a registry with another bit layout than the one the
    /// principal's scopes were compiled against: there a bit would name a
    /// different scope.
    #[must_use]
    pub fn allows(&self, scope: &Required) -> bool {
        self.0.layout == scope.layout() && self.0.scopes.allows(scope)
    }

    /// `Ok` if the principal holds `scope`.
    ///
    /// # Errors
    ///
    /// [`MissingScope`] naming the scope, which becomes a 403 with
    /// `WWW-Authenticate: Bearer error="insufficient_scope", scope="…"`.
    pub fn require(&self, scope: &Required) -> Result<(), MissingScope> {
        if self.allows(scope) {
            Ok(())
        } else {
            Err(MissingScope { scope: scope.scope().to_string() })
        }
    }
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.0.record;
        f.debug_struct("Principal")
            .field("record_id", &r.id)
            .field("hint", &r.hint)
            .field("tenant", &r.tenant)
            .field("environment", &r.environment)
            .field("region", &r.region)
            .field("scopes", &self.0.scopes)
            .field("plan", &r.plan)
            .field("expires_at", &r.expires_at)
            .finish_non_exhaustive()
    }
}

/// A principal lacks the scope a request needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("missing scope `{scope}`")]
#[non_exhaustive]
pub struct MissingScope {
    /// The required scope.
    pub scope: String,
}

impl MissingScope {
    /// The 403 the caller sees.
    #[must_use]
    pub fn rejection(&self) -> Rejection {
        Rejection::Forbidden { scope: Some(self.scope.clone()) }
    }
}

/// What a request is trying to reach; authentication checks the key
/// against it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Target {
    pub(crate) tenant: Option<Tenant>,
    pub(crate) environment: Option<Environment>,
    pub(crate) region: Option<Region>,
    pub(crate) formats: Option<Arc<[Cow<'static, str>]>>,
    /// Leave the deployment environment and account checks to the caller
    /// ([`Target::defer_standing`]).
    pub(crate) defer_standing: bool,
}

impl Target {
    /// No tenant, environment or region restriction.
    #[must_use]
    pub const fn any() -> Self {
        Self { tenant: None, environment: None, region: None, formats: None, defer_standing: false }
    }

    /// The request addresses `tenant`; the key must reach it (same
    /// workspace; a project or application key only its own).
    #[must_use]
    pub fn tenant(mut self, tenant: Tenant) -> Self {
        self.tenant = Some(tenant);
        self
    }

    /// The request runs in `env`; a key of another environment, or with
    /// none, is refused (a `test` key never reaches `live`, a `staging` key
    /// only `staging`).
    #[must_use]
    pub fn environment(mut self, env: Environment) -> Self {
        self.environment = Some(env);
        self
    }

    /// This deployment serves `region`; keys of other regions are invalid here.
    #[must_use]
    pub fn region(mut self, region: Region) -> Self {
        self.region = Some(region);
        self
    }

    /// Only keys of these formats (by name, e.g. `["sk"]`) are accepted; a
    /// key of another format is refused right after parsing, before any
    /// store lookup, as invalid.
    #[must_use]
    pub fn formats<I, F>(mut self, formats: I) -> Self
    where
        I: IntoIterator<Item = F>,
        F: Into<Cow<'static, str>>,
    {
        self.formats = Some(formats.into_iter().map(Into::into).collect());
        self
    }

    /// Authentication leaves the key's standing — the deployment's
    /// environment ([`Authenticator::environment`]) and the account's status
    /// ([`Authenticator::account_status`]) — to the caller, who must then
    /// call [`Authenticator::check_standing`]: after its rate limit, so
    /// that those 403s carry the limit's headers as a tenant's or scope's
    /// 403 does (the tower layer's order). A caller that skips that call
    /// lets keys of inactive accounts and other environments through.
    #[must_use]
    pub const fn defer_standing(mut self) -> Self {
        self.defer_standing = true;
        self
    }

    /// Checks an authenticated `principal` against this target's region,
    /// environment and tenant, as authentication does (not the
    /// authenticator's deployment region, which authentication always
    /// checks, nor its environment or account status:
    /// [`Authenticator::check_standing`]).
    ///
    /// # Errors
    ///
    /// [`AuthError::WrongRegion`], [`AuthError::WrongEnvironment`] or
    /// [`AuthError::WrongTenant`].
    pub fn check(&self, principal: &Principal) -> Result<(), AuthError> {
        let r = principal.record();
        check_target(&r.id, &r.tenant, r.environment, r.region, self)
    }

    fn accepts_format(&self, format: &str) -> bool {
        self.formats.as_ref().is_none_or(|f| f.iter().any(|a| a == format))
    }
}

/// Why authentication failed — for the host's logs. The caller sees only
/// [`AuthError::rejection`]: a 401 that is the same for every reason a key
/// is invalid, a 403 for a valid key aimed at the wrong tenant or
/// environment or of an inactive account, a 503 when the store is down, a
/// 500 when the key's stored scopes do not compile (a deployment error).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No credential header was present.
    #[error("no credential presented")]
    Missing,
    /// The credential headers were refused before parsing.
    #[error("credential refused: {0}")]
    Credential(#[from] CredentialError),
    /// The credential is not a key of any accepted format.
    #[error("malformed key: {0}")]
    Malformed(#[from] ParseError),
    /// No record matches the key, or the record found names another
    /// format, environment or region than the key itself.
    #[error("unknown key")]
    Unknown,
    /// A record with the key's public id exists but the secret is wrong.
    #[error("wrong secret for key id")]
    WrongSecret,
    /// A record with the key's public id exists, but its digest was made
    /// with an algorithm this authenticator's [`Hasher`] does not hold (a
    /// pepper it lacks, or plain SHA-256 without
    /// [`accept_legacy_sha256`](Hasher::accept_legacy_sha256)): a deployment
    /// whose key manager and authenticator hash differently. The secret
    /// cannot be checked, so this says nothing of it: a wrong guess at a
    /// known key id reads the same (count these apart from
    /// [`WrongSecret`](Self::WrongSecret) when watching for guessing, and
    /// treat a run of them as a deployment error). The caller sees the same
    /// 401.
    #[error("record {id} has a {algorithm:?} digest this authenticator's hasher cannot check")]
    UnverifiableDigest {
        /// The record.
        id: RecordId,
        /// The algorithm the record's digest names.
        algorithm: crate::hash::Algorithm,
    },
    /// The key is of a format the target does not accept.
    #[error("`{format}` keys are not accepted here")]
    FormatNotAccepted {
        /// The key's format.
        format: &'static str,
    },
    /// The key was revoked.
    #[error("key {id} is revoked")]
    Revoked {
        /// The record.
        id: RecordId,
    },
    /// The key has expired.
    #[error("key {id} expired")]
    Expired {
        /// The record.
        id: RecordId,
    },
    /// The key belongs to another region.
    #[error("key {id} belongs to another region")]
    WrongRegion {
        /// The record.
        id: RecordId,
    },
    /// The key belongs to another environment than the request's target
    /// or the deployment's ([`Authenticator::environment`]).
    #[error("key {id} is for another environment")]
    WrongEnvironment {
        /// The record.
        id: RecordId,
    },
    /// The key belongs to another tenant than the request's.
    #[error("key {id} does not reach this tenant")]
    WrongTenant {
        /// The record.
        id: RecordId,
    },
    /// The stored record holds scopes this deployment's registry does not know.
    #[error("record {id} has scopes the registry does not know: {source}")]
    Scopes {
        /// The record.
        id: RecordId,
        /// The compile error.
        source: ScopeError,
    },
    /// The key is valid but its account is inactive or deleted (the
    /// host's [`AccountStatus`] said so).
    #[error("the account of key {id} is inactive")]
    AccountInactive {
        /// The record.
        id: RecordId,
    },
    /// The key store failed.
    #[error("key store failed: {0}")]
    Backend(#[from] BackendError),
}

/// The host's answer to "may this account use its keys now?", asked on
/// every authentication — cache hits included, so deactivating an account
/// refuses its keys at once — after the key itself has been verified (or,
/// where the target [defers it](Target::defer_standing), by
/// [`Authenticator::check_standing`] after the rate limit). A
/// refused account is a 403 ([`Rejection::AccountInactive`]), not a 401:
/// the key is valid.
///
/// Any `Fn(&Tenant) -> bool` is one. It runs on the request path, so it
/// should answer from memory (a set the host keeps current), not a query.
///
/// ```
/// use keygate::auth::Authenticator;
/// use keygate::store::{MemoryKeyStore, WorkspaceId};
/// use std::collections::HashSet;
/// use std::sync::{Arc, RwLock};
///
/// let inactive: Arc<RwLock<HashSet<WorkspaceId>>> = Arc::default();
/// let seen = Arc::clone(&inactive);
/// let auth = Authenticator::new(MemoryKeyStore::new())
///     .account_status(move |t: &keygate::store::Tenant| !seen.read().unwrap().contains(&t.workspace));
/// ```
pub trait AccountStatus: Send + Sync {
    /// Whether the account `tenant` belongs to is active.
    fn is_active(&self, tenant: &Tenant) -> bool;
}

impl<F: Fn(&Tenant) -> bool + Send + Sync> AccountStatus for F {
    fn is_active(&self, tenant: &Tenant) -> bool {
        self(tenant)
    }
}

impl AuthError {
    /// The rejection the caller sees. Every reason a key is invalid maps to
    /// the same [`Rejection::InvalidCredentials`]. An `Authorization` header
    /// of another scheme ([`CredentialError::NotBearer`], e.g. `Basic`)
    /// holds no key: [`Rejection::MissingCredentials`], whose challenge has
    /// no error code (RFC 6750 §3.1: a request "attempted using an
    /// unsupported authentication method" lacks authentication information).
    #[must_use]
    pub fn rejection(&self) -> Rejection {
        match self {
            Self::Missing | Self::Credential(CredentialError::NotBearer) => {
                Rejection::MissingCredentials
            }
            Self::Credential(_)
            | Self::Malformed(_)
            | Self::Unknown
            | Self::WrongSecret
            | Self::UnverifiableDigest { .. }
            | Self::FormatNotAccepted { .. }
            | Self::Revoked { .. }
            | Self::Expired { .. }
            | Self::WrongRegion { .. } => Rejection::InvalidCredentials,
            // SPEC §7: a valid key without access to the resource (project,
            // environment) is 403, not 401.
            Self::WrongEnvironment { .. } | Self::WrongTenant { .. } => {
                Rejection::Forbidden { scope: None }
            }
            Self::AccountInactive { .. } => Rejection::AccountInactive,
            Self::Scopes { .. } => Rejection::Misconfigured,
            Self::Backend(_) => Rejection::Unavailable,
        }
    }
}

/// Verifies keys from request headers against a [`KeyStore`].
///
/// Clones (where the store and the clock are `Clone`) are one
/// authenticator, for a host that puts it behind two gates (one failing
/// open, say) or several services: they share the [`PrincipalCache`] and
/// their identity in it (a principal one verified is a hit for the others,
/// and a revocation's invalidation reaches them all), the last-use batch
/// (one write per interval between them; a flush through any writes what
/// all noted), the scope registry and the [`AccountStatus`] check. The
/// store's clone must reach the same keys, as the stores of this crate do
/// (handles on shared data): a clone is served the principals another
/// verified. A clone given another [`hasher`](Self::hasher) is another
/// authenticator (its own identity), and one given a
/// [`last_use_interval`](Self::last_use_interval) keeps its own batch.
///
/// ```
/// # tokio_test_block_on(async {
/// use keygate::auth::{Authenticator, Target};
/// use keygate::manager::{KeyManager, NewKey};
/// use keygate::store::{MemoryKeyStore, Tenant};
///
/// let store = MemoryKeyStore::new();
/// let manager = KeyManager::new(store.clone());
/// let tenant = Tenant::workspace("ws_abc".parse()?);
/// let created = manager
///     .create(NewKey::new("CI", keygate::format::SK, tenant.clone()).scopes(&["applications:read"])?)
///     .await?;
///
/// let auth = Authenticator::new(store);
/// let header = format!("Bearer {}", created.key().expose_secret());
/// let headers = [("authorization", header.as_bytes())];
/// let principal = auth.authenticate(headers, &Target::any().tenant(tenant)).await?;
/// assert_eq!(principal.record_id(), &created.record().id);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     let mut f = std::pin::pin!(f);
/// #     let waker = std::task::Waker::noop();
/// #     match f.as_mut().poll(&mut std::task::Context::from_waker(&waker)) {
/// #         std::task::Poll::Ready(v) => v,
/// #         std::task::Poll::Pending => unreachable!("in-memory stores are always ready"),
/// #     }
/// # }
/// ```
pub struct Authenticator<S, C = SystemClock> {
    store: S,
    hasher: Hasher,
    formats: FormatSet,
    rules: HeaderRules,
    registry: Arc<ScopeRegistry>,
    clock: C,
    cache: Option<Arc<PrincipalCache>>,
    /// Asserted unwind-safe: the host's check holds no state of ours.
    accounts: Option<AssertUnwindSafe<Arc<dyn AccountStatus>>>,
    environment: Option<Environment>,
    region: Option<Region>,
    /// Shared by clones: one batch, one write per interval between them.
    last_use: Arc<LastUse>,
    last_use_interval: u64,
    /// Requests write last use (else the host's flushes alone do).
    last_use_in_requests: bool,
    /// This authenticator's identity (and its clones'), set at
    /// [`new`](Authenticator::new): a shared [`PrincipalCache`] hit counts
    /// only if this authenticator verified the principal against its own
    /// store.
    source: u64,
}

/// One authenticator more, sharing what must be shared (see the type's
/// doc). Written out rather than derived, so a field added later is
/// decided here too.
impl<S: Clone, C: Clone> Clone for Authenticator<S, C> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            hasher: self.hasher.clone(),
            formats: self.formats.clone(),
            rules: self.rules.clone(),
            registry: Arc::clone(&self.registry),
            clock: self.clock.clone(),
            cache: self.cache.clone(),
            accounts: self.accounts.as_ref().map(|a| AssertUnwindSafe(Arc::clone(&a.0))),
            environment: self.environment,
            region: self.region,
            // One batch: a batch each would write each key once per clone
            // per interval, and a flush through one would miss the others'.
            last_use: Arc::clone(&self.last_use),
            last_use_interval: self.last_use_interval,
            last_use_in_requests: self.last_use_in_requests,
            // One identity: the cache's entries are the clones' alike.
            source: self.source,
        }
    }
}

/// The next [`Authenticator`] identity (0 is a principal built by hand).
static NEXT_SOURCE: AtomicU64 = AtomicU64::new(1);

impl<S, C> fmt::Debug for Authenticator<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("hasher", &self.hasher)
            .field("rules", &self.rules)
            .field("cache", &self.cache)
            .field("account_status", &self.accounts.is_some())
            .finish_non_exhaustive()
    }
}

impl<S: KeyStore> Authenticator<S> {
    /// An authenticator over `store` with the defaults: SHA-256 digests, the
    /// preset formats, default header rules and scope registry, the system
    /// clock, no principal cache, last use written at most once a minute,
    /// and no deployment [`environment`](Self::environment) or
    /// [`region`](Self::region): a `test` key, or another region's, is
    /// accepted wherever a route's target does not say otherwise.
    #[must_use]
    pub fn new(store: S) -> Self {
        Self {
            store,
            hasher: Hasher::sha256(),
            formats: FormatSet::presets(),
            rules: HeaderRules::default(),
            registry: Arc::new(ScopeRegistry::default()),
            clock: SystemClock::new(),
            cache: None,
            accounts: None,
            environment: None,
            region: None,
            last_use: Arc::new(LastUse::new(Duration::from_secs(60))),
            last_use_interval: duration_nanos(Duration::from_secs(60)),
            last_use_in_requests: true,
            source: NEXT_SOURCE.fetch_add(1, Ordering::Relaxed),
        }
    }
}

impl<S: KeyStore, C: Clock> Authenticator<S, C> {
    /// Uses `clock` for expiry, cache age and last use.
    #[must_use]
    pub fn clock<C2: Clock>(self, clock: C2) -> Authenticator<S, C2> {
        Authenticator {
            store: self.store,
            hasher: self.hasher,
            formats: self.formats,
            rules: self.rules,
            registry: self.registry,
            clock,
            cache: self.cache,
            accounts: self.accounts,
            environment: self.environment,
            region: self.region,
            last_use: self.last_use,
            last_use_interval: self.last_use_interval,
            last_use_in_requests: self.last_use_in_requests,
            source: self.source,
        }
    }

    /// The `WWW-Authenticate` scheme of a 401 on a route taking every
    /// format of this authenticator (pass it to
    /// [`Rejection::to_response_in`](crate::http::Rejection::to_response_in);
    /// `to_response` always challenges Bearer):
    /// Bearer when the header rules take one of them as a Bearer token,
    /// else `X-API-Key` when they take one there. The tower layer answers
    /// with the same.
    #[must_use]
    pub fn auth_scheme(&self) -> AuthScheme {
        self.scheme_of(None::<&[&str]>)
    }

    /// [`auth_scheme`](Self::auth_scheme) of a route taking keys of
    /// `formats` (by name) only: an `X-API-Key` route of `nh` keys
    /// challenges with `ApiKey header="X-API-Key"`, not Bearer.
    ///
    /// ```
    /// use keygate::auth::Authenticator;
    /// use keygate::http::{BodyStyle, Rejection};
    /// use keygate::store::MemoryKeyStore;
    ///
    /// let auth = Authenticator::new(MemoryKeyStore::new());
    /// let scheme = auth.auth_scheme_for(&["nh"]);
    /// let now = keygate::jiff::Timestamp::now();
    /// let res = Rejection::MissingCredentials.to_response_in(BodyStyle::Nested, scheme, now);
    /// assert_eq!(res.header("WWW-Authenticate"), Some(r#"ApiKey header="X-API-Key""#));
    /// ```
    #[must_use]
    pub fn auth_scheme_for(&self, formats: &[&str]) -> AuthScheme {
        self.scheme_of(Some(formats))
    }

    /// The challenge of a route taking keys of `formats` (every format
    /// of the set when `None`).
    pub(crate) fn scheme_of<N: AsRef<str>>(&self, formats: Option<&[N]>) -> AuthScheme {
        let takes = |source: Source| match formats {
            Some(names) => names.iter().any(|n| self.rules.accepts(n.as_ref(), source)),
            None => self.formats.formats().iter().any(|f| self.rules.accepts(f.name(), source)),
        };
        if !takes(Source::Bearer) && takes(Source::ApiKeyHeader) {
            AuthScheme::ApiKeyHeader
        } else {
            AuthScheme::Bearer
        }
    }

    /// Whether the authenticator's format set has a format named `name`.
    #[cfg(feature = "tower")]
    pub(crate) fn knows_format(&self, name: &str) -> bool {
        self.formats.get(name).is_some()
    }

    /// The clock this authenticator reads (for callers that stamp
    /// responses or count quotas on the same time line).
    #[must_use]
    pub fn clock_ref(&self) -> &C {
        &self.clock
    }

    /// Where this authenticator keeps the principal of a key with
    /// `digest` in a shared cache: the digest with its first eight bytes
    /// mixed with the authenticator's identity, so that authenticators
    /// sharing a cache keep entries of their own instead of replacing each
    /// other's (a hit is also checked against the identity).
    fn cache_key(&self, digest: &crate::Digest) -> crate::Digest {
        let mut bytes = *digest.as_bytes();
        for (b, s) in bytes.iter_mut().zip(self.source.to_le_bytes()) {
            *b ^= s;
        }
        crate::Digest::from_bytes(bytes)
    }

    /// Uses `hasher` (must match the one keys were stored with).
    #[must_use]
    pub fn hasher(mut self, hasher: Hasher) -> Self {
        self.hasher = hasher;
        // Principals cached before were verified under the old peppers (one
        // of which may be gone now): not this authenticator's any more.
        self.source = NEXT_SOURCE.fetch_add(1, Ordering::Relaxed);
        self
    }

    /// Accepts keys of `formats`.
    #[must_use]
    pub fn formats(mut self, formats: FormatSet) -> Self {
        self.formats = formats;
        self
    }

    /// Uses `rules` to find the credential.
    #[must_use]
    pub fn header_rules(mut self, rules: HeaderRules) -> Self {
        self.rules = rules;
        self
    }

    /// Compiles scopes against `registry`.
    #[must_use]
    pub fn registry(mut self, registry: Arc<ScopeRegistry>) -> Self {
        self.registry = registry;
        self
    }

    /// Caches verified principals in `cache` (share it with the
    /// [`KeyManager`](crate::manager::KeyManager) so revocations through it
    /// apply at once). One cache may serve several authenticators: each is
    /// served only the principals it (or a clone of it) verified against
    /// its own store, so an
    /// authenticator of another store (a sandbox, another tenant's) never
    /// takes a key its store does not hold.
    #[must_use]
    pub fn cache(mut self, cache: Arc<PrincipalCache>) -> Self {
        self.cache = Some(cache);
        self
    }

    /// This deployment's environment: keys whose record carries another
    /// one (an `sk_test_` key on a `live` deployment, or a key created for
    /// a `test` parent) are refused on every request (403), whatever the
    /// route's [`Target`] (one that [defers](Target::defer_standing) the
    /// check leaves it to [`check_standing`](Self::check_standing)).
    /// Records without an environment are not
    /// affected; a route that must refuse them names its environment in
    /// its target.
    #[must_use]
    pub fn environment(mut self, environment: Environment) -> Self {
        self.environment = Some(environment);
        self
    }

    /// This deployment's region: keys whose record carries another one are
    /// refused on every request (401, as a key of another region is unknown
    /// here). Records without a region are not affected.
    #[must_use]
    pub fn region(mut self, region: Region) -> Self {
        self.region = Some(region);
        self
    }

    /// Refuses keys of accounts `status` says are inactive (403), after
    /// the key itself is verified, on every authentication (deferred:
    /// in [`check_standing`](Self::check_standing)). Only these ask it: a
    /// portal link of an inactive account still redeems, and its access
    /// token is then refused here.
    #[must_use]
    pub fn account_status(mut self, status: impl AccountStatus + 'static) -> Self {
        self.accounts = Some(AssertUnwindSafe(Arc::new(status)));
        self
    }

    /// Whether requests write last use (the default): the first request
    /// of each interval writes the batch of times noted since the last
    /// write, before it returns, so it waits for the store (at most its
    /// timeout; a batch whose write is cancelled waits for the next one).
    /// With `false`, requests only note their use, and the host writes the
    /// batch with [`flush_last_use`](Self::flush_last_use) on a timer of its
    /// own (and at shutdown): no request ever waits for it. Up to 100,000
    /// keys' times wait between two flushes; the uses of more keys are not
    /// noted (a host that never flushes loses last use, not memory).
    #[must_use]
    pub const fn last_use_in_requests(mut self, write: bool) -> Self {
        self.last_use_in_requests = write;
        self
    }

    /// Writes last use at most once per `interval` per key (batched). On a
    /// clone, a batch of its own from then on.
    #[must_use]
    pub fn last_use_interval(mut self, interval: Duration) -> Self {
        self.last_use = Arc::new(LastUse::new(interval));
        self.last_use_interval = duration_nanos(interval);
        self
    }

    /// The scope registry.
    #[must_use]
    pub fn scope_registry(&self) -> &ScopeRegistry {
        &self.registry
    }

    /// The store.
    #[must_use]
    pub fn store(&self) -> &S {
        &self.store
    }

    /// What a [`KeyManager`](crate::manager::KeyManager) or a
    /// [`Portal`](crate::portal::Portal) built
    /// [for this authenticator](crate::manager::KeyManager::for_authenticator)
    /// shares with it.
    pub(crate) fn parts(
        &self,
    ) -> (&Hasher, &FormatSet, &Arc<ScopeRegistry>, Option<&Arc<PrincipalCache>>) {
        (&self.hasher, &self.formats, &self.registry, self.cache.as_ref())
    }

    /// Authenticates the credential in `headers` for a request to `target`.
    ///
    /// # Errors
    ///
    /// An [`AuthError`] saying exactly why; show the caller only
    /// [`AuthError::rejection`].
    pub fn authenticate<'h, I>(
        &self,
        headers: I,
        target: &Target,
    ) -> impl Future<Output = Result<Principal, AuthError>> + Send
    where
        I: IntoIterator<Item = (&'h str, &'h [u8])>,
    {
        // The credential is found before the future is built, so the future
        // holds a borrowed token, not the header iterator.
        let extracted = self.rules.extract(headers);
        async move {
            let (source, token) = extracted?.ok_or(AuthError::Missing)?;
            self.authenticate_token(token, source, target).await
        }
    }

    /// Authenticates a key already taken from `source`.
    ///
    /// # Errors
    ///
    /// As [`authenticate`](Self::authenticate).
    pub async fn authenticate_token(
        &self,
        token: &str,
        source: Source,
        target: &Target,
    ) -> Result<Principal, AuthError> {
        // Parse without copying the key: the only copy of the secret stays
        // in the caller's header buffer.
        let (key_format, parts) = self.formats.parse_parts(token.as_bytes())?;
        let format = key_format.name();
        if !self.rules.accepts(format, source) {
            return Err(CredentialError::WrongHeader { format, header: source }.into());
        }
        if !target.accepts_format(format) {
            return Err(AuthError::FormatNotAccepted { format });
        }
        let bytes = token.as_bytes();
        let current = self.hasher.digest(bytes);
        let (now, mono) = self.clock.read();
        if let Some(cache) = &self.cache
            && let Some(p) = cache.get(&self.cache_key(current.digest()), mono)
            // A cache shared with an authenticator of another registry may
            // hold principals compiled under another layout, or of another
            // store (a key only that store holds): a miss here.
            && p.0.layout == self.registry.layout()
            && p.0.source == self.source
        {
            if p.expires_at().is_some_and(|e| now >= e) {
                return Err(AuthError::Expired { id: p.record_id().clone() });
            }
            self.check_record(p.record(), target)?;
            if let Some(batch) = self.note_use(&p, now, mono) {
                self.write_last_use(batch).await;
            }
            return Ok(p);
        }
        // Read before the store lookup (on a miss only): a revocation in
        // between keeps the record read here out of the cache.
        let generation = self.cache.as_ref().map_or(0, |c| c.generation());
        let record = match parts.key_id {
            // The public id is the lookup handle; the secret is then checked
            // by comparing digests in constant time.
            Some(kid) => {
                let r = self.store.find_by_key_id(format, &kid).await?.ok_or(AuthError::Unknown)?;
                let ok = if r.digest.algorithm() == current.algorithm() {
                    r.digest == current
                } else {
                    let algorithm = r.digest.algorithm();
                    let Some(d) = self.hasher.digest_with(bytes, algorithm) else {
                        return Err(AuthError::UnverifiableDigest { id: r.id.clone(), algorithm });
                    };
                    d == *r.digest.digest()
                };
                if !ok {
                    return Err(AuthError::WrongSecret);
                }
                r
            }
            // The store's answer is held to the digest asked for (in
            // constant time): a store that matched loosely (a truncated
            // column, a case-insensitive collation) finds nothing.
            None => {
                match self.store.find_by_digest(&current).await?.filter(|r| r.digest == current) {
                    Some(r) => r,
                    // Boxed: a miss under pepper rotation is rare, and its loop
                    // state would otherwise enlarge every authentication future.
                    None if self.hasher.has_older_peppers() => {
                        Box::pin(self.find_by_older_digest(bytes))
                            .await?
                            .ok_or(AuthError::Unknown)?
                    }
                    None => return Err(AuthError::Unknown),
                }
            }
        };
        // A record that names another format, environment or region than
        // the key's own text is not this key's record (a host's import
        // gone wrong): an `sk_test_` key recorded as `live`, or with no
        // environment, is a test key all the same and must not pass the
        // environment checks as a live one (SPEC §2).
        if record.format != format
            || !key_format.segment_agrees(bytes, record.environment, record.region)
        {
            return Err(AuthError::Unknown);
        }
        if record.revoked_at.is_some() {
            return Err(AuthError::Revoked { id: record.id.clone() });
        }
        if record.expires_at.is_some_and(|e| now >= e) {
            return Err(AuthError::Expired { id: record.id.clone() });
        }
        self.check_record(&record, target)?;
        let p = Principal::verified_by(Arc::clone(&record), &self.registry, self.source)
            .map_err(|source| AuthError::Scopes { id: record.id.clone(), source })?;
        if let Some(cache) = &self.cache {
            cache.insert_unless_invalidated(
                generation,
                self.cache_key(current.digest()),
                p.clone(),
                mono,
            );
        }
        if let Some(batch) = self.note_use(&p, now, mono) {
            self.write_last_use(batch).await;
        }
        Ok(p)
    }

    /// The checks authentication makes of `target` (formats, region, and
    /// the rest of [`check_record`](Self::check_record)) for a principal
    /// authenticated earlier, against another target: a second layer of a
    /// tower gate with narrower needs.
    #[cfg(feature = "tower")]
    pub(crate) fn recheck(&self, p: &Principal, target: &Target) -> Result<(), AuthError> {
        let r = p.record();
        let format =
            self.formats.get(&r.format).map(crate::KeyFormat::name).ok_or(AuthError::Unknown)?;
        if !target.accepts_format(format) {
            return Err(AuthError::FormatNotAccepted { format });
        }
        self.check_record(r, target)
    }

    /// The checks of a verified, live record (fresh from the store or
    /// cached), in the order their answers rank: this deployment's region
    /// (a key of another region is unknown here, 401), the request's
    /// target, then the record's [standing](Self::check_standing) (403s).
    fn check_record(&self, r: &KeyRecord, target: &Target) -> Result<(), AuthError> {
        if let (Some(want), Some(have)) = (self.region, r.region)
            && want != have
        {
            return Err(AuthError::WrongRegion { id: r.id.clone() });
        }
        check_target(&r.id, &r.tenant, r.environment, r.region, target)?;
        if target.defer_standing { Ok(()) } else { self.check_record_standing(r) }
    }

    /// Whether an authenticated key may act here at all: its record's
    /// environment is this deployment's (when both have one), and the
    /// host's [`AccountStatus`] says its account is active. Authentication
    /// runs this itself, unless its target [defers
    /// it](Target::defer_standing): then the caller runs it after the rate
    /// limit (as the tower layer does), so its 403s carry the limit's
    /// headers.
    ///
    /// # Errors
    ///
    /// [`AuthError::WrongEnvironment`] or [`AuthError::AccountInactive`]
    /// (403s).
    pub fn check_standing(&self, principal: &Principal) -> Result<(), AuthError> {
        self.check_record_standing(principal.record())
    }

    /// [`check_standing`](Self::check_standing) of a record.
    fn check_record_standing(&self, r: &KeyRecord) -> Result<(), AuthError> {
        if let (Some(want), Some(have)) = (self.environment, r.environment)
            && want != have
        {
            return Err(AuthError::WrongEnvironment { id: r.id.clone() });
        }
        match &self.accounts {
            Some(a) if !a.0.is_active(&r.tenant) => {
                Err(AuthError::AccountInactive { id: r.id.clone() })
            }
            _ => Ok(()),
        }
    }

    /// Looks `key` up under digests made with older peppers, newest first.
    async fn find_by_older_digest(
        &self,
        key: &[u8],
    ) -> Result<Option<Arc<KeyRecord>>, BackendError> {
        for d in self.hasher.older_candidates(key) {
            if let Some(r) = self.store.find_by_digest(&d).await?.filter(|r| r.digest == d) {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }

    /// Records a use; at most once per interval per cached principal, and
    /// one batched store write per interval overall: the batch to write,
    /// when this call is the one that flushes.
    fn note_use(
        &self,
        p: &Principal,
        now: Timestamp,
        mono: crate::clock::Nanos,
    ) -> Option<Vec<(RecordId, Timestamp)>> {
        let noted = p.0.use_noted.load(Ordering::Relaxed);
        if noted != 0 && mono.as_u64().saturating_sub(noted) < self.last_use_interval {
            return None;
        }
        // The store already says the key was used within the interval: a
        // new write would only move it by less than the interval (the
        // precision last use has anyway). Saves the batch's lock on
        // principals that were not cached.
        if p.record().last_used_at.is_some_and(|t| {
            let since = now.duration_since(t);
            !since.is_negative() && since.as_nanos() < i128::from(self.last_use_interval)
        }) {
            return None;
        }
        p.0.use_noted.store(mono.as_u64().max(1), Ordering::Relaxed);
        if self.last_use_in_requests {
            self.last_use.note(p.record_id(), now, mono)
        } else {
            self.last_use.record(p.record_id(), now);
            None
        }
    }

    /// Writes a last-use batch. A failed write never fails the request:
    /// last use is advisory. It happens once per interval, so its future is
    /// boxed rather than enlarging every authentication's future.
    fn write_last_use(
        &self,
        batch: Vec<(RecordId, Timestamp)>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        // Advisory, so the request goes on either way.
        Box::pin(async move {
            let _ = self.write_batch(batch).await;
        })
    }

    /// Writes `batch`; after a transient failure its times wait for the
    /// next flush.
    async fn write_batch(&self, batch: Vec<(RecordId, Timestamp)>) -> Result<(), BackendError> {
        let in_flight = InFlight::new(&self.last_use, batch);
        let written = self.store.record_last_used(in_flight.batch()).await;
        let batch = in_flight.done();
        if let Err(e) = &written {
            self.last_use.restore_after(e, batch);
        }
        written
    }

    /// Writes every pending last-use time now (e.g. at shutdown).
    ///
    /// # Errors
    ///
    /// The store's [`BackendError`].
    pub async fn flush_last_use(&self) -> Result<(), BackendError> {
        let batch = self.last_use.drain();
        if batch.is_empty() { Ok(()) } else { self.write_batch(batch).await }
    }
}

fn check_target(
    id: &RecordId,
    tenant: &Tenant,
    environment: Option<Environment>,
    region: Option<Region>,
    target: &Target,
) -> Result<(), AuthError> {
    if let (Some(want), Some(have)) = (target.region, region)
        && want != have
    {
        return Err(AuthError::WrongRegion { id: id.clone() });
    }
    if let Some(want) = target.environment
        && environment != Some(want)
    {
        return Err(AuthError::WrongEnvironment { id: id.clone() });
    }
    if let Some(want) = &target.tenant
        && !tenant.reaches(want)
    {
        return Err(AuthError::WrongTenant { id: id.clone() });
    }
    Ok(())
}

/// The `X-API-Key` header name, parsed once at compile time.
#[cfg(feature = "http")]
pub(crate) const X_API_KEY: http::HeaderName = http::HeaderName::from_static("x-api-key");

#[cfg(feature = "http")]
impl<S: KeyStore, C: Clock> Authenticator<S, C> {
    /// [`authenticate`](Self::authenticate) over an `http::HeaderMap`.
    ///
    /// # Errors
    ///
    /// As [`authenticate`](Self::authenticate).
    pub fn authenticate_http(
        &self,
        headers: &http::HeaderMap,
        target: &Target,
    ) -> impl Future<Output = Result<Principal, AuthError>> + Send {
        self.authenticate(credential_headers(headers), target)
    }

    /// Whether `headers` carry a credential header that is not blank (a
    /// key, or a refusal such as a non-Bearer scheme): such a request is
    /// judged by its header, not by a cookie. Only the tower layer reads
    /// cookies, so only it asks (with `http` alone this would be dead code).
    #[cfg(feature = "tower")]
    pub(crate) fn has_credential_header(&self, headers: &http::HeaderMap) -> bool {
        !matches!(self.rules.extract(credential_headers(headers)), Ok(None))
    }
}

/// The credential headers of `headers`, as (name, value) pairs: two hash
/// lookups instead of a walk over every header; `get_all` keeps repeated
/// credential headers visible to the conflict check.
#[cfg(feature = "http")]
fn credential_headers(headers: &http::HeaderMap) -> impl Iterator<Item = (&str, &[u8])> + Send {
    headers
        .get_all(http::header::AUTHORIZATION)
        .iter()
        .map(|v| ("authorization", v.as_bytes()))
        .chain(headers.get_all(&X_API_KEY).iter().map(|v| ("x-api-key", v.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryKeyStore;

    /// Authenticators sharing a cache keep a key's entries apart, whatever
    /// the digest's bytes (none set, every one set): one never takes the
    /// other's place.
    #[test]
    fn authenticators_of_one_cache_keep_a_digest_under_keys_of_their_own() {
        let mut a = Authenticator::new(MemoryKeyStore::new());
        let mut b = a.clone();
        (a.source, b.source) = (1, 2);
        for byte in [0x00, 0xff] {
            let digest = crate::Digest::from_bytes([byte; crate::Digest::LEN]);
            assert_ne!(a.cache_key(&digest), b.cache_key(&digest), "{byte:#04x}");
        }
    }
}
