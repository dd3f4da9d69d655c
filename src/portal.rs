//! Portal sessions: short-lived, single-use links into an embedded developer
//! portal, and the access tokens they turn into.
//!
//! A management-token holder mints a session for one application
//! ([`Portal::create_session`]); the one-time code travels in a URL; the
//! first open redeems it ([`Portal::redeem`]) for a portal access token,
//! which is an ordinary key record of its own format, so the
//! [`Authenticator`](crate::auth::Authenticator) accepts it and yields a
//! [`Principal`] scoped to that application with the role's permissions.

mod request;
mod store;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use jiff::{RoundMode, SignedDuration, Timestamp, TimestampRound, Unit};
use serde_json::json;
use smol_str::SmolStr;

pub use request::{
    MAX_EXPIRES_IN_MINUTES, MAX_METADATA_KEY_LEN, MAX_METADATA_KEYS, MAX_METADATA_VALUE_LEN,
    MIN_EXPIRES_IN_MINUTES, RESERVED_METADATA_PREFIX, RequestError, SessionRequest,
};
pub use store::{MemoryPortalStore, PortalSession, PortalStore, Redeem, TOMBSTONE_RETENTION};

use crate::auth::Principal;
use crate::backend::BackendError;
use crate::clock::{Clock, SystemClock};
use crate::format::{Alphabet, ApiKey, FormatSet, KeyFormat, MintSpec, NH, NHK, NHM, NK, SK};
use crate::hash::Hasher;
use crate::http::Rejection;
use crate::scope::{Role, Scope, ScopeError, ScopeRegistry, ScopeSet};
use crate::secret::{Digest, OsBatch, SecretString};
use crate::store::{
    ApplicationId, InsertOutcome, KeyRecord, KeyStore, RecordId, Tenant, WorkspaceId,
};

/// The portal code: `kgpc_` + 32 base62 (190 bits) + a 6-character CRC32, so
/// a mangled or forged code is refused before any store lookup. URL-safe.
pub const CODE: KeyFormat =
    KeyFormat::builder("kgpc").secret(&Alphabet::BASE62, 32).crc32().hint_chars(4).build_unwrap();

/// The portal access token a redeemed code turns into: `kgpt_` + 43 base62
/// (256 bits) + CRC32.
pub const ACCESS_TOKEN: KeyFormat =
    KeyFormat::builder("kgpt").secret(&Alphabet::BASE62, 43).crc32().hint_chars(4).build_unwrap();

/// Random bytes a redemption draws: the access token's secret and its
/// record id, both base62.
const REDEEM_RANDOM_BYTES: usize =
    Alphabet::BASE62.bytes_for(ACCESS_TOKEN.secret_len() + RecordId::RANDOM_CHARS);

/// The preset formats plus [`ACCESS_TOKEN`]: give this to the
/// authenticator that serves the portal's API.
///
/// # Panics
///
/// Never: the names are distinct.
#[must_use]
pub fn formats() -> FormatSet {
    FormatSet::new([NHK, NHM, NK, SK, NH, ACCESS_TOKEN]).expect("distinct format names")
}

/// The metadata key of an access token's record that names the session's
/// role (`admin`, `editor`, `viewer`), beside the session's own metadata.
pub const ROLE_METADATA_KEY: &str = "portal.role";

/// The metadata key of an access token's record that names the record id
/// of the management token that minted its session:
/// [`KeyManager::revoke`](crate::manager::KeyManager::revoke) of that token
/// revokes the access tokens naming it.
pub const MINTER_METADATA_KEY: &str = "portal.minter";

/// The resources a portal role covers by default: `endpoints`,
/// `subscriptions` and `deliveries` (the value, which rustdoc does not
/// show). A host with a [`ScopeRegistry`] of its own lists them among its
/// resources, or minting a session fails ([`PortalError::Scope`]:
/// ``unknown scope `endpoints:*` ``); give that one registry to the
/// `Portal`, the `Authenticator` and the `KeyManager` alike.
///
/// ```
/// use keygate::portal::PORTAL_RESOURCES;
/// use keygate::scope::ScopeRegistry;
///
/// assert_eq!(PORTAL_RESOURCES, ["endpoints", "subscriptions", "deliveries"]);
/// let mut resources = vec!["orders"];
/// resources.extend_from_slice(PORTAL_RESOURCES);
/// let registry = ScopeRegistry::new(&resources, &["read", "create", "update", "delete", "write"])?;
/// assert!(registry.required("endpoints:read").is_ok());
/// # Ok::<(), keygate::scope::ScopeError>(())
/// ```
pub const PORTAL_RESOURCES: &[&str] = &["endpoints", "subscriptions", "deliveries"];

/// A freshly minted session: what the API returns, once.
pub struct MintedSession {
    url: SecretString,
    code: SecretString,
    expires_at: Timestamp,
}

impl MintedSession {
    /// The one-time URL. It embeds the code, so it is as secret: shown
    /// once, in the response, never logged.
    #[must_use]
    pub fn url(&self) -> &SecretString {
        &self.url
    }

    /// The code. Shown once, in the response.
    #[must_use]
    pub fn code(&self) -> &SecretString {
        &self.code
    }

    /// When the code expires.
    #[must_use]
    pub const fn expires_at(&self) -> Timestamp {
        self.expires_at
    }

    /// The response body: `{"url", "code", "expiresAt"}` with an RFC 3339
    /// UTC timestamp such as `2024-01-15T12:30:00Z`.
    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        // Whole seconds already (see `create_session`).
        json!({
            "url": self.url.expose_secret(),
            "code": self.code.expose_secret(),
            "expiresAt": self.expires_at.to_string(),
        })
    }
}

impl fmt::Debug for MintedSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MintedSession")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Why a portal operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PortalError {
    /// The request body breaks a rule.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The minting credential is not a management token of that workspace.
    #[error("only a management token of the workspace can mint portal sessions")]
    NotManagementToken,
    /// The role asks for more than the management token may do.
    #[error(transparent)]
    Scope(#[from] ScopeError),
    /// The code is malformed or its checksum is wrong (no store was asked).
    #[error("malformed portal code")]
    MalformedCode,
    /// No session has this code.
    #[error("unknown portal code")]
    UnknownCode,
    /// The code was already redeemed.
    #[error("portal code already used")]
    AlreadyUsed,
    /// The code expired.
    #[error("portal code expired")]
    Expired,
    /// The minting token ends within the second: a session would end
    /// before it starts. Mint with a longer-lived token.
    #[error("the management token expires too soon to mint a portal session")]
    MinterExpiring,
    /// The management token that minted the link was revoked, or has
    /// expired, since, or the portal's key store does not hold it (the
    /// code is spent; the wire answer is that of an unknown link). Every
    /// link failing so, right after minting, is a wiring mistake: a portal
    /// built over another key store than the one holding the management
    /// tokens, without [`minters_elsewhere`](Portal::minters_elsewhere).
    // The message names that mistake: it is the only trace a host gets of
    // it (minting succeeds), and "no longer active" alone sends the host
    // looking for a revocation that never happened.
    #[error(
        "the management token that minted this portal link is no longer active, or not in the portal's key store (see Portal::minters_elsewhere)"
    )]
    MinterInactive,
    /// A generated code or token collided (vanishingly unlikely; retry).
    #[error("generated code collided; retry")]
    Collision,
    /// The portal's [URL template](Portal::url_template) is unset, has no
    /// `{code}` (its links could never be redeemed), or is not `https://`
    /// (a link is a bearer credential: over plain `http://` anyone on the
    /// path reads it; `http://` is accepted to a loopback host only). No
    /// link is minted.
    #[error(
        "the portal URL template is unset, has no {{code}}, or is not https (http only to a loopback host)"
    )]
    UrlTemplate,
    /// A store failed.
    #[error("store failed: {0}")]
    Backend(#[from] BackendError),
}

impl PortalError {
    /// The rejection the caller sees.
    #[must_use]
    pub fn rejection(&self) -> Rejection {
        match self {
            Self::Request(e) => e.rejection(),
            Self::MinterExpiring => Rejection::InvalidCredentials,
            Self::NotManagementToken | Self::Scope(ScopeError::Exceeds { .. }) => {
                Rejection::Forbidden { scope: None }
            }
            // The portal's role scopes do not compile under the registry.
            Self::Scope(_) | Self::UrlTemplate => Rejection::Misconfigured,
            Self::MalformedCode | Self::UnknownCode | Self::Expired | Self::MinterInactive => {
                Rejection::InvalidLink
            }
            Self::AlreadyUsed => Rejection::Gone,
            Self::Collision | Self::Backend(_) => Rejection::Unavailable,
        }
    }
}

/// A redeemed code: the access token (shown once) and its stored record.
pub struct AccessToken {
    token: crate::format::ApiKey,
    record: Arc<KeyRecord>,
}

impl AccessToken {
    /// The token; hand it to the portal (e.g. in an `HttpOnly` cookie).
    #[must_use]
    pub fn token(&self) -> &crate::format::ApiKey {
        &self.token
    }

    /// The stored record.
    #[must_use]
    pub fn record(&self) -> &KeyRecord {
        &self.record
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken").field("record", &self.record).finish_non_exhaustive()
    }
}

/// Mints and redeems portal sessions.
pub struct Portal<P, S, C = SystemClock> {
    sessions: P,
    keys: S,
    hasher: Hasher,
    registry: Arc<ScopeRegistry>,
    clock: C,
    url_template: String,
    resources: Vec<&'static str>,
    roles: RoleGrants,
    /// Whether `keys` holds the minting tokens (see
    /// [`minters_elsewhere`](Portal::minters_elsewhere)).
    minters_here: bool,
}

/// Each role's grants, and their scopes as stored on an access token, under
/// one registry: fixed until the registry changes, so computed once rather
/// than on every redemption.
type RoleTable = [(ScopeSet, Arc<[Scope]>); 3];
type RoleGrants = Result<Arc<RoleTable>, ScopeError>;

fn role_grants(registry: &ScopeRegistry, resources: &[&str]) -> RoleGrants {
    let one = |role| -> Result<(ScopeSet, Arc<[Scope]>), ScopeError> {
        let grants = registry.role(role, resources)?;
        Ok((grants, registry.scopes_of(&grants).into()))
    };
    Ok(Arc::new([one(Role::Admin)?, one(Role::Editor)?, one(Role::Viewer)?]))
}

const fn role_slot(role: Role) -> usize {
    match role {
        Role::Admin => 0,
        Role::Editor => 1,
        Role::Viewer => 2,
    }
}

impl<P, S, C> fmt::Debug for Portal<P, S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Portal").field("url_template", &self.url_template).finish_non_exhaustive()
    }
}

impl<P: PortalStore, S: KeyStore> Portal<P, S> {
    /// A portal over `sessions` (codes) and `keys` (access tokens). It
    /// mints nothing ([`PortalError::UrlTemplate`]) until
    /// [`url_template`](Self::url_template) says where links point: a
    /// placeholder host would hand working codes to a third party's domain.
    ///
    /// `keys` must be the store the [`Authenticator`](crate::auth::Authenticator)
    /// reads (else it never finds the access tokens: a 401 each) and, by
    /// default, the one holding the management tokens that mint: over any
    /// other, minting succeeds and every redemption fails
    /// ([`PortalError::MinterInactive`]) unless
    /// [`minters_elsewhere`](Self::minters_elsewhere) says so.
    #[must_use]
    pub fn new(sessions: P, keys: S) -> Self {
        let registry = Arc::new(ScopeRegistry::default());
        Self {
            sessions,
            keys,
            hasher: Hasher::sha256(),
            roles: role_grants(&registry, PORTAL_RESOURCES),
            registry,
            clock: SystemClock::new(),
            url_template: String::new(),
            resources: PORTAL_RESOURCES.to_vec(),
            minters_here: true,
        }
    }
}

impl<P: PortalStore, S: KeyStore + Clone, C: Clock + Clone> Portal<P, S, C> {
    /// A portal over `sessions` whose access tokens `auth` verifies: it
    /// stores them in `auth`'s store (a clone: the same records, and the
    /// management tokens that mint), hashed with its hasher, with role
    /// scopes under its registry, on its clock. Built apart, a pepper or a
    /// store not shared makes every access token a 401 (and every link a
    /// [`PortalError::MinterInactive`]) with nothing else to say why.
    /// Otherwise as [`new`](Portal::new): no links until
    /// [`url_template`](Self::url_template). `auth` must also accept the
    /// portal's formats ([`formats`]).
    #[must_use]
    pub fn for_authenticator(sessions: P, auth: &crate::auth::Authenticator<S, C>) -> Self {
        let (hasher, _, registry, _) = auth.parts();
        Portal::new(sessions, auth.store().clone())
            .hasher(hasher.clone())
            .registry(Arc::clone(registry))
            .clock(auth.clock_ref().clone())
    }
}

impl<P: PortalStore, S: KeyStore, C: Clock> Portal<P, S, C> {
    /// Uses `clock`.
    #[must_use]
    pub fn clock<C2: Clock>(self, clock: C2) -> Portal<P, S, C2> {
        Portal {
            sessions: self.sessions,
            keys: self.keys,
            hasher: self.hasher,
            registry: self.registry,
            clock,
            url_template: self.url_template,
            resources: self.resources,
            roles: self.roles,
            minters_here: self.minters_here,
        }
    }

    /// For a portal whose key store (where access tokens go) is not the
    /// one holding the management tokens that mint its sessions. By
    /// default the store is taken to hold them, and a redemption whose
    /// minter it holds revoked, expired — or no longer at all (forgotten
    /// after the store's retention) — is refused
    /// ([`PortalError::MinterInactive`]). With this, a minter the store
    /// does not hold is not judged, and revoking one through a
    /// `KeyManager` of the other store reaches neither its unopened links
    /// nor the access tokens they led to: those end with their sessions.
    #[must_use]
    pub fn minters_elsewhere(mut self) -> Self {
        self.minters_here = false;
        self
    }

    /// The URL template; `{code}` is replaced by the code (codes are
    /// URL-safe), e.g. `https://portal.acme.com/?code={code}`. Without one
    /// (there is no default), with one lacking `{code}` (links that
    /// cannot be redeemed), or with one neither `https://` nor `http://`
    /// to a loopback host (`localhost`, `127.0.0.0/8`, `[::1]`: a demo's),
    /// minting fails with [`PortalError::UrlTemplate`] (a 500).
    #[must_use]
    pub fn url_template(mut self, template: impl Into<String>) -> Self {
        self.url_template = template.into();
        self
    }

    /// Hashes access tokens with `hasher` (the authenticator's).
    #[must_use]
    pub fn hasher(mut self, hasher: Hasher) -> Self {
        self.hasher = hasher;
        self
    }

    /// Each role's grants and scopes, in [`role_slot`] order.
    fn roles(&self) -> Result<&RoleTable, ScopeError> {
        self.roles.as_deref().map_err(Clone::clone)
    }

    /// Compiles role scopes against `registry`.
    #[must_use]
    pub fn registry(mut self, registry: Arc<ScopeRegistry>) -> Self {
        self.roles = role_grants(&registry, &self.resources);
        self.registry = registry;
        self
    }

    /// Mints a session for `application` in `workspace` on behalf of
    /// `minter`, a management token of that workspace. The role's grants
    /// must be within the token's.
    ///
    /// # Errors
    ///
    /// [`PortalError::Request`] for a request that breaks a rule of
    /// [`SessionRequest::validate`], [`PortalError::NotManagementToken`],
    /// [`PortalError::MinterExpiring`] when the token ends within the
    /// second, [`PortalError::Scope`] when the role exceeds the token,
    /// [`PortalError::UrlTemplate`] when the template is unset, has no
    /// `{code}`, or is neither `https://` nor `http://` to a loopback host,
    /// [`PortalError::Collision`] when the minted code is taken, or a
    /// backend failure (the OS generator's included).
    ///
    /// A session never outlives its minter: it expires when the
    /// management token does, if that is sooner than `expiresInMinutes`
    /// (as a key [created for](crate::manager::KeyManager::create_for) a
    /// principal does), and so does the access token it is redeemed for.
    pub async fn create_session(
        &self,
        minter: &Principal,
        workspace: &WorkspaceId,
        application: &ApplicationId,
        request: SessionRequest,
    ) -> Result<MintedSession, PortalError> {
        let target = Tenant::workspace(workspace.clone()).with_application(application.clone());
        if minter.format() != NHM.name() || !minter.tenant().reaches(&target) {
            return Err(PortalError::NotManagementToken);
        }
        // The fields are public: a request built in code meets the same
        // rules as one parsed from JSON (and 1..=60 minutes cannot overflow).
        request.validate()?;
        check_url_template(&self.url_template)?;
        let (grants, _) = &self.roles()?[role_slot(request.role)];
        self.registry.attenuate(*grants, &minter.scopes_in(&self.registry))?;
        let now = self.clock.now();
        // 1..=60 minutes (validated): exact, and no timestamp overflows.
        #[allow(clippy::cast_possible_wrap)]
        let minutes = SignedDuration::from_mins(request.expires_in_minutes as i64);
        let asked = now.saturating_add(minutes).map_err(|_| PortalError::Collision)?;
        // Whole seconds, rounded down: the response's `expiresAt` (RFC 3339
        // without fractions) is then the exact instant the code stops
        // working, never a moment before it does.
        let exact = minter.expires_at().map_or(asked, |end| asked.min(end));
        let whole = TimestampRound::new().smallest(Unit::Second).mode(RoundMode::Floor);
        let expires_at = exact.round(whole).unwrap_or(exact);
        if expires_at <= now {
            // A minter ending within the second: its link would be dead on
            // arrival (a success the first redemption calls expired).
            return Err(PortalError::MinterExpiring);
        }
        let code = CODE.mint_default().map_err(BackendError::unavailable)?;
        let session = PortalSession {
            workspace: workspace.clone(),
            application: application.clone(),
            role: request.role,
            metadata: request.metadata,
            created_at: now,
            expires_at,
            environment: minter.environment(),
            region: minter.region(),
            minter: Some(minter.record_id().clone()),
        };
        let digest = *self.hasher.digest(code.expose_secret().as_bytes()).digest();
        if !self.sessions.insert(digest, session).await? {
            return Err(PortalError::Collision);
        }
        Ok(MintedSession {
            url: SecretString::from(fill_template(&self.url_template, code.expose_secret())),
            code: SecretString::from(code.expose_secret().to_owned()),
            expires_at,
        })
    }

    /// Redeems `code` once: returns a portal access token expiring with the
    /// session, scoped to its application with the role's permissions and
    /// carrying its metadata.
    ///
    /// # Errors
    ///
    /// [`PortalError::MalformedCode`] (no store asked),
    /// [`PortalError::AlreadyUsed`], [`PortalError::Expired`],
    /// [`PortalError::UnknownCode`], [`PortalError::MinterInactive`] when
    /// the minting token was revoked or has expired (see
    /// [`minters_elsewhere`](Self::minters_elsewhere)),
    /// [`PortalError::Scope`] when the portal's role scopes do not compile,
    /// [`PortalError::Collision`] when the minted token is taken, or a
    /// backend failure.
    ///
    /// Role scopes and randomness are settled before the code is spent, so
    /// those failures leave the link usable. Storing the access token comes
    /// after (the token's expiry is the session's): if that store call
    /// fails, the link is used up and the host mints a new one.
    ///
    /// Call it for a person's request, not for every fetch of the link:
    /// mail security gateways and chat link previews fetch a link before
    /// its recipient does, and a fetch that redeems spends the code. Where
    /// links travel by mail or chat, answer the link's `GET` with a page
    /// that redeems on a `POST` (a button, or a script: such fetchers send
    /// no `POST`), and `HEAD` without redeeming.
    ///
    /// # Cancellation
    ///
    /// A redemption whose future is dropped once the store has spent the
    /// code (a client gone, a timeout around the call) hands out nothing:
    /// the token's secret goes with the future, and the code stays spent
    /// ([`PortalError::AlreadyUsed`] on the next open), as after a failure
    /// to store the token. The host mints a new link. The token may be left
    /// stored, held by no one, until its session's end (or its minter's
    /// revocation). The token cannot be stored before the code is spent:
    /// what it grants is the session's, which only spending the code reads.
    pub async fn redeem(&self, code: &str) -> Result<AccessToken, PortalError> {
        // Validate (grammar and checksum) without copying the code.
        CODE.parse_bytes(code.as_bytes()).map_err(|_| PortalError::MalformedCode)?;
        let digest: Digest = *self.hasher.digest(code.as_bytes()).digest();
        // Everything that can fail without the store is done before the
        // code is spent: a failure here leaves the link usable.
        let roles = self.roles()?;
        // One OS call for the token and its record id: their characters are
        // all base62, so one rejection margin covers both (64 bytes).
        // Its bytes are wiped at the block's end, and the block keeps their
        // room out of the future across the store's awaits (as the values
        // below are moved, never borrowed, for the same reason).
        let (token, id) = {
            let mut rng = OsBatch::new(REDEEM_RANDOM_BYTES);
            let token = ACCESS_TOKEN
                .mint_with_rng(MintSpec::new(), &mut rng)
                .map_err(BackendError::unavailable)?;
            (token, RecordId::generate_os(&mut rng)?)
        };
        let now = self.clock.now();
        let outcome = match self.sessions.redeem(&digest, now).await? {
            // Minted before a pepper rotation: stored under an older one.
            // Boxed: rare, and it would otherwise enlarge every redemption.
            Redeem::Unknown if self.hasher.has_older_peppers() => {
                Box::pin(self.redeem_older(code, now)).await?
            }
            outcome => outcome,
        };
        let (record, minter) = self.token_record(session_of(outcome)?, id, &token, roles, now);
        match self.keys.insert(Arc::clone(&record), None).await {
            Ok(InsertOutcome::Inserted) => {}
            Ok(_) => return Err(PortalError::Collision),
            // The store may have stored it before failing to answer.
            Err(e) => return Err(self.unshown(&record.id, now, e.into()).await),
        }
        let record = match self.bound_by_minter(record, minter.as_ref(), now).await {
            Ok(record) => record,
            Err((id, e)) => return Err(self.unshown(&id, now, e).await),
        };
        Ok(AccessToken { token, record })
    }

    /// The record of access token `token` (record id `id`), minted now for
    /// `session`: the session's tenant, environment, region, end and
    /// metadata (with `portal.role` and `portal.minter`), the role's scopes.
    /// Also the session's minter, which bounds the token once stored.
    ///
    /// A function, not steps in [`redeem`](Self::redeem): the session moves
    /// in whole, so its room is not kept in the redemption's future across
    /// the stores' awaits.
    #[inline]
    fn token_record(
        &self,
        session: PortalSession,
        id: RecordId,
        token: &ApiKey,
        roles: &RoleTable,
        now: Timestamp,
    ) -> (Arc<KeyRecord>, Option<RecordId>) {
        let (_, scopes) = &roles[role_slot(session.role)];
        let mut metadata = session.metadata;
        // The request's rules keep `portal.` keys out of session metadata.
        metadata.insert(
            SmolStr::new_static(ROLE_METADATA_KEY),
            SmolStr::new_static(session.role.as_str()),
        );
        if let Some(minter) = &session.minter {
            metadata.insert(SmolStr::new_static(MINTER_METADATA_KEY), minter.into());
        }
        let record = Arc::new(KeyRecord {
            id,
            name: SmolStr::new_static(match session.role {
                Role::Admin => "portal session (admin)",
                Role::Editor => "portal session (editor)",
                Role::Viewer => "portal session (viewer)",
            }),
            hint: token.hint(),
            digest: self.hasher.digest(token.expose_secret().as_bytes()),
            format: SmolStr::new_static(ACCESS_TOKEN.name()),
            key_id: None,
            environment: session.environment,
            region: session.region,
            tenant: Tenant::workspace(session.workspace).with_application(session.application),
            scopes: Arc::clone(scopes),
            plan: None,
            created_at: now,
            expires_at: Some(session.expires_at),
            revoked_at: None,
            last_used_at: None,
            metadata,
        });
        (record, session.minter)
    }

    /// The stored access token `record`, checked against its session's
    /// `minter` once stored: a revocation through the `KeyManager` either
    /// comes before this read (and the token is refused here) or lists the
    /// token and revokes it there. A minter the store no longer holds was
    /// forgotten after it ended (unless the minters are kept elsewhere).
    /// The minter's end may have moved earlier since the session was
    /// minted (a roll's grace): the token is shortened to end no later.
    ///
    /// On an error, the token's id with it: the caller will not get it.
    async fn bound_by_minter(
        &self,
        record: Arc<KeyRecord>,
        minter: Option<&RecordId>,
        now: Timestamp,
    ) -> Result<Arc<KeyRecord>, (RecordId, PortalError)> {
        let Some(minter) = minter else { return Ok(record) };
        let fail = |e: PortalError| (record.id.clone(), e);
        let found = self.keys.get(minter).await.map_err(|e| fail(e.into()))?;
        let active = match &found {
            Some(m) => m.is_active(now),
            None => !self.minters_here,
        };
        if !active {
            return Err(fail(PortalError::MinterInactive));
        }
        match found.and_then(|m| m.expires_at) {
            Some(end) if record.expires_at.is_none_or(|e| end < e) => {
                self.keys.shorten_expiry(&record.id, end).await.map_err(|e| fail(e.into()))?;
                let mut shortened = KeyRecord::clone(&record);
                shortened.expires_at = Some(end);
                Ok(Arc::new(shortened))
            }
            _ => Ok(record),
        }
    }

    /// Revokes the stored access token `id`, which the caller will not get
    /// for `e`: no working token nobody holds is left behind (best effort,
    /// the store may be what failed). `e`, or the revocation's failure when
    /// `e` is only the minter's refusal.
    async fn unshown(&self, id: &RecordId, now: Timestamp, e: PortalError) -> PortalError {
        match self.keys.revoke(id, now).await {
            Err(revoke) if matches!(e, PortalError::MinterInactive) => revoke.into(),
            _ => e,
        }
    }
}

impl<P: PortalStore, S: KeyStore, C: Clock> Portal<P, S, C> {
    /// Redeems `code` under the hasher's older peppers, newest first.
    async fn redeem_older(&self, code: &str, now: Timestamp) -> Result<Redeem, PortalError> {
        for d in self.hasher.older_candidates(code.as_bytes()) {
            match self.sessions.redeem(d.digest(), now).await? {
                Redeem::Unknown => {}
                found => return Ok(found),
            }
        }
        Ok(Redeem::Unknown)
    }
}

/// The session a store's redemption answered, or the refusal it stands
/// for. A function, so the answer moves in whole (see
/// [`Portal::token_record`]).
#[inline]
fn session_of(outcome: Redeem) -> Result<PortalSession, PortalError> {
    match outcome {
        Redeem::Session(s) => Ok(s),
        Redeem::AlreadyUsed => Err(PortalError::AlreadyUsed),
        Redeem::Expired => Err(PortalError::Expired),
        Redeem::Unknown => Err(PortalError::UnknownCode),
    }
}

/// `template` with every `{code}` replaced by `code`, built in a buffer of
/// the exact final size, which [`SecretString`] then takes as it is:
/// `str::replace` grows its result as it goes, and a reallocation after
/// the code was copied in frees a block still holding it, unwiped.
fn fill_template(template: &str, code: &str) -> String {
    let n = slots(template).count();
    let mut url = String::with_capacity(template.len() - n * SLOT.len() + n * code.len());
    let mut from = 0;
    for i in slots(template) {
        // `{` starts a slot, so `i` is a char boundary.
        url.push_str(&template[from..i]);
        url.push_str(code);
        from = i + SLOT.len();
    }
    url.push_str(&template[from..]);
    url
}

/// Where the code goes in a URL template.
const SLOT: &str = "{code}";

/// The offsets of the [`SLOT`]s in `template`: each `{` that starts one (a
/// slot holds no other `{`, so slots never overlap). `str::contains`,
/// `matches` and `find` build a two-way searcher per call, costing more
/// than the rest of a link; every mint reads the template three times.
fn slots(template: &str) -> impl Iterator<Item = usize> + '_ {
    let bytes = template.as_bytes();
    memchr::memchr_iter(b'{', bytes).filter(|&i| bytes[i..].starts_with(SLOT.as_bytes()))
}

/// Checks a [URL template](Portal::url_template) as minting does, for a
/// host that reads it from its configuration and wants to refuse a bad one
/// at start-up rather than at the first mint: it must hold `{code}` and be
/// `https://`, or `http://` to a loopback host (`localhost`, `127.0.0.0/8`,
/// `[::1]`, as written: not a normalised form such as `127.1`).
///
/// # Errors
///
/// [`PortalError::UrlTemplate`] when minting from `template` would fail.
pub fn check_url_template(template: &str) -> Result<(), PortalError> {
    if template_ok(template) { Ok(()) } else { Err(PortalError::UrlTemplate) }
}

/// Whether links from `template` can be redeemed and travel encrypted: it
/// has `{code}`, and is `https://`, or `http://` to a loopback host (where
/// the link never crosses a network).
fn template_ok(template: &str) -> bool {
    let scheme = |s: &str| template.get(..s.len()).is_some_and(|p| p.eq_ignore_ascii_case(s));
    if slots(template).next().is_none() {
        return false;
    }
    if scheme("https://") {
        return true;
    }
    if !scheme("http://") {
        return false;
    }
    let rest = &template["http://".len()..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    if authority.contains('@') {
        // User info: the host is after it, and a link handing out
        // credentials is wrong anyway.
        return false;
    }
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split_once(']').map_or("", |(h, _)| h),
        None => authority.split_once(':').map_or(authority, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Session lifetime bounds as durations.
pub const MAX_SESSION: Duration = Duration::from_secs(MAX_EXPIRES_IN_MINUTES * 60);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_is_built_in_one_exact_buffer() {
        // Exactly full, so no reallocation ever freed a copy of the code
        // (a long tail after `{code}` made `str::replace` grow its buffer
        // after copying the code in), and the wrapper takes it as it is.
        let code = "kgpc_bGTqz4A4pYVr6tbo4JOr8AzsfvWvlL7U0UEvJJ";
        for template in [
            "https://p.example.com/?code={code}",
            "https://p.example.com/?code={code}&return_to=https%3A%2F%2Fdashboard.example.com%2Fw",
            "{code}",
            "https://p.example.com/{code}/again/{code}?x=y",
            "https://p.example.com/{{code}{code}}/{cod{code}e}/{",
            "https://p.example.com/é/{code}",
        ] {
            let url = fill_template(template, code);
            assert_eq!(url, template.replace("{code}", code));
            assert_eq!(url.capacity(), url.len(), "{template}");
        }
    }

    #[test]
    fn links_go_out_over_https_or_to_a_loopback_host() {
        for ok in [
            "https://portal.acme.com/p?code={code}",
            "HTTPS://portal.acme.com/{code}",
            "http://localhost/p?code={code}",
            "http://LOCALHOST:8080/portal?code={code}",
            "http://127.0.0.1:8080/portal?code={code}",
            "http://127.8.9.10/portal?code={code}",
            "http://[::1]:8080/portal?code={code}",
            "http://127.0.0.1?code={code}",
        ] {
            assert!(template_ok(ok), "{ok}");
        }
        for bad in [
            "",
            "https://portal.acme.com/open",
            "http://portal.acme.com/p?code={code}",
            "http://0.0.0.0:8080/portal?code={code}",
            "http://192.168.1.2/portal?code={code}",
            "http://localhost.evil.com/p?code={code}",
            "http://127.0.0.1.evil.com/p?code={code}",
            "http://user@localhost/p?code={code}",
            "http://[::2]/p?code={code}",
            "http://[::1/p?code={code}",
            "ftp://localhost/{code}",
            "/portal?code={code}",
            "httpx://localhost/{code}",
        ] {
            assert!(!template_ok(bad), "{bad}");
        }
    }

    #[test]
    fn formats_are_distinct_checksummed_and_strong() {
        assert!(CODE.secret_bits() >= 128.0 && ACCESS_TOKEN.secret_bits() >= 128.0);
        let c = CODE.mint_default().unwrap();
        assert!(c.expose_secret().starts_with("kgpc_"));
        assert!(c.expose_secret().bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
        let mut forged = c.expose_secret().to_owned();
        let last = forged.pop().unwrap();
        forged.push(if last == 'A' { 'B' } else { 'A' });
        assert!(CODE.parse(&forged).is_err());
        assert_eq!(formats().formats().len(), 6);
    }

    #[test]
    fn a_redemption_fits_one_64_byte_fetch() {
        // Both parts are base62, which is what lets them share one margin.
        assert_eq!(ACCESS_TOKEN.random_bytes(), Alphabet::BASE62.bytes_for(43));
        assert_eq!(REDEEM_RANDOM_BYTES, 64);
    }
}
