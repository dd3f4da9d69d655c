//! A [`tower`](https://docs.rs/tower) layer that puts keygate in front of
//! tower-based HTTP stacks: axum, and plain hyper services, whose response
//! bodies can be made from a `String` (the layer's refusals are JSON bodies,
//! not gRPC statuses).
//!
//! One [`Gate`] holds what every route shares — the [`Authenticator`], the
//! [`LimitStore`], the [`PlanSet`], optionally a [`QuotaStore`] — and hands
//! out a [`GateLayer`] per route that adds what the route needs: a scope,
//! the key formats it accepts, a quota category, a body style, the tenant
//! taken from the path. [`GateLayer::checked`] refuses, at start-up, a
//! layer naming a format, plan or quota category that resolves to nothing.
//!
//! For each request the layer
//!
//! 1. authenticates the credential headers (the authenticator's
//!    [`HeaderRules`](crate::auth::HeaderRules), or the route's cookie):
//!    a key of a format the route does not accept is refused right after
//!    parsing, an unknown, revoked, expired or other-region key is a 401,
//! 2. applies the principal's plan rate limit (the key's plan, else the
//!    route's, else the gate's default; no plan, no limit) and refuses with
//!    429 when it is exhausted,
//! 3. checks that the key reaches the route's [`Target`] (tenant,
//!    environment; 403), or answers with the target function's refusal
//!    (which it runs first but applies only here, so a caller without a
//!    valid key gets its 401), that it carries the deployment's
//!    environment and its account is active (the authenticator's
//!    `environment` and `account_status`; 403), and that the key holds the
//!    route's scope (403),
//! 4. counts the route's quota category, when it has one (429 with the
//!    monthly message),
//! 5. inserts the [`Principal`], the limiter's [`Decision`] (with a
//!    [`Refund`] of what it charged) and the [`QuotaDecision`] (with a
//!    [`QuotaRefund`] of what it counted) into the request extensions and
//!    calls the inner service,
//! 6. adds the rate-limit headers to the response — success, 403 and 429
//!    alike (the limit is checked before tenant and scope for that reason).
//!
//! Refusals are answered by the layer itself in the route's
//! [`BodyStyle`], and carry a [`Refused`] in their response extensions so a
//! logging layer further out can record the typed reason (which the client
//! never sees). A store failure is a 503 unless the host chose
//! [`FailMode::Open`] for the limiter or the quota store, for the gate
//! ([`GateBuilder::limiter_fail_mode`]) or for one route
//! ([`GateLayer::limiter_fail_mode`]; under nested layers, the mode of the
//! layer that makes the check). Nothing blocks: every store call is
//! awaited.
//!
//! Units are consumed when the limiter admits a request, before the
//! tenant, scope and quota checks and before the handler runs: a 403, a
//! quota 429 or a handler's 5xx still costs its units. So does a 401 from
//! an inner layer (a route taking other formats or regions) for a key the
//! outer layer admitted: that key is known and was charged there, as for
//! a 403; the 401 itself carries no rate-limit headers, as an unknown
//! key's does not. Nothing is refunded for you: a handler gives its
//! request's units back through the [`Refund`] in the request's
//! extensions, which knows the limiter key and the plan the layer charged
//! (a [`LimitStore::refund`] of the handler's own would need both, and
//! under another key gives nothing back). Likewise a quota count, through
//! the [`QuotaRefund`] beside the [`QuotaDecision`] (the innermost counting
//! layer's, under nested layers). [`Gate::admit`], the layer's core for a
//! host without tower, hands out both in its [`Admitted`].
//!
//! Layers of one gate nest: a layer on a whole router authenticates and charges
//! each request once, and a layer of the same gate on a route inside it adds
//! that route's checks (formats, region, target, scope, quota) without
//! authenticating again. A key that names no plan is under the nearest layer's
//! `.plan(…)` (the route's, else the router's, else the gate's default). Where
//! the plan that applies on the inner route differs, or the route has a cost of
//! its own, the inner layer gives the outer layer's charge back and charges the
//! request itself: a request costs what its route says, once: its own `.cost`,
//! or 1 (an outer layer's `.cost` is not inherited the way its plan is). A
//! route's plan draws on units of its own for keys that name none (the limiter
//! key `{record id}#{plan}`; else the record id alone), so routes under
//! different plans never share one state. A host that also limits keys of its
//! own (a login name, an IP) should give them a limiter of their own: keys a
//! client can invent fill the gate's limiter to its cap, and then every new
//! API key is refused ([`CapacityError`](crate::limit::CapacityError), a 503
//! where the limiter fails closed). On the gate's limiter, such keys must at
//! least be tagged (`login:{name}`: record ids hold no `:`), so none can
//! equal a record id and share its key's state. The outer
//! layer checks first, though, and knows nothing of the routes inside: a
//! request must also have a unit left under the router's plan as it passes
//! (lent, and given back), so a route's plan cannot let a key past a router
//! plan it has used up. Give such routes a layer of their own, outside the
//! router's (or no router-wide layer). If giving back fails, the request stays
//! charged under both ([`FailedOpen::refund`]). The charge to give back rides
//! in the request's extensions (its [`Refund`], which copies of the request
//! share): a middleware between two layers of one gate that sends copies of
//! a request (a retry layer) has it given back once, and each copy the inner
//! layer takes over is charged the route's cost. A credential the outer layer
//! took from a cookie reaches only inner routes that take that cookie too. Each
//! response carries one set of rate-limit headers (a handler's own values
//! stand), none on an inner layer's 401. Each layer's [`FailedOpen`] trace is
//! kept beside the others'. A router-wide `.quota(…)` counts every request the
//! router's layer admits, before the inner layers' checks: put quotas on the
//! routes whose refusals should not count. A layer of another gate in between
//! starts over: the inner layer of the first gate authenticates and charges
//! again. The request holds one [`Decision`], the innermost layer's that
//! charged, and its [`Refund`]: where an inner layer takes its gate's charge
//! over and its own check then fails open, the handler sees neither, even
//! where a layer of another gate outside charged too (its decision was
//! replaced, not kept; its headers are on the response all the same). A
//! take-over whose own check fails closed (a 503) no longer reports the
//! outer layer's failure it replaced: the request was refused. An outer
//! layer with `.cost(0)` charges nothing, and inner routes under the same
//! plan without a cost of their own are then not charged either.
//!
//! Put the layer on a route's method router (`get(h).route_layer(…)`, as
//! below), so that another method is the router's plain 405. axum's
//! `route_layer` wraps every method added to that method router before it:
//! `get(list).route_layer(read).post(create).route_layer(write)` nests the
//! `write` layer around `GET` too, so a read-only key gets a 403 there.
//! Where a path's methods need different scopes, give each its own
//! `.route(path, …)` (axum merges the methods of one path) or its handler
//! its own layer (`get(list.layer(…))`), as in the second example. On a
//! `Router`, it also runs for the 405s and 404s it answers (and consumes
//! units for them). The layer demands a credential on every request,
//! CORS preflight `OPTIONS` included: put a CORS layer outside it, exposing
//! `X-RateLimit-*`, `RateLimit*` and `Retry-After` to browser code.
//!
//! ```
//! use axum::{Extension, Router, routing::get};
//! use keygate::auth::{Authenticator, Principal};
//! use keygate::limit::{MemoryLimiter, PlanSet};
//! use keygate::store::MemoryKeyStore;
//! use keygate::tower::Gate;
//!
//! # fn main() -> Result<(), keygate::scope::ScopeError> {
//! let keys = MemoryKeyStore::new();
//! let gate = Gate::builder(Authenticator::new(keys), MemoryLimiter::new(100_000))
//!     .plans(PlanSet::presets())
//!     .default_plan("hobby")
//!     .build();
//!
//! let app: Router = Router::new().route(
//!     "/v1/applications",
//!     get(list_applications).route_layer(gate.layer().require("applications:read")?),
//! );
//!
//! async fn list_applications(Extension(who): Extension<Principal>) -> String {
//!     format!("hello, {}", who.name())
//! }
//! # Ok(())
//! # }
//! ```
//!
//! One path, a scope per method (a key holding `applications:read` only):
//!
//! ```
//! use axum::{Router, body::Body, handler::Handler, http::Request, routing::{get, post}};
//! use keygate::auth::Authenticator;
//! use keygate::limit::{MemoryLimiter, PlanSet};
//! use keygate::manager::{KeyManager, NewKey};
//! use keygate::store::{MemoryKeyStore, Tenant};
//! use keygate::tower::Gate;
//! use tower::ServiceExt;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
//! let keys = MemoryKeyStore::new();
//! let reader = KeyManager::new(keys.clone())
//!     .create(NewKey::new("r", keygate::format::SK, Tenant::workspace("ws_a".parse()?))
//!         .scopes(&["applications:read"])?)
//!     .await?;
//! let gate = Gate::builder(Authenticator::new(keys), MemoryLimiter::new(1_000))
//!     .plans(PlanSet::presets())
//!     .build();
//! let (read, write) = (
//!     gate.layer().require("applications:read")?,
//!     gate.layer().require("applications:write")?,
//! );
//! async fn list() -> &'static str { "[]" }
//! async fn create() -> &'static str { "created" }
//!
//! // Each method its own route, or each handler its own layer.
//! let per_method: Router = Router::new()
//!     .route("/v1/applications", get(list).route_layer(read.clone()))
//!     .route("/v1/applications", post(create).route_layer(write.clone()));
//! let per_handler: Router = Router::new().route(
//!     "/v1/applications",
//!     get(list.layer(read.clone())).post(create.layer(write.clone())),
//! );
//! // Not this: the second `route_layer` wraps `GET` as well.
//! let chained: Router = Router::new().route(
//!     "/v1/applications",
//!     get(list).route_layer(read.clone()).post(create).route_layer(write.clone()),
//! );
//!
//! let bearer = format!("Bearer {}", reader.key().expose_secret());
//! let get_as_reader = || {
//!     Request::get("/v1/applications").header("authorization", &bearer).body(Body::empty())
//! };
//! assert_eq!(per_method.oneshot(get_as_reader()?).await?.status(), 200);
//! assert_eq!(per_handler.oneshot(get_as_reader()?).await?.status(), 200);
//! assert_eq!(chained.oneshot(get_as_reader()?).await?.status(), 403);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })
//! # }
//! ```

use std::any::Any;
use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use ::http::request::Parts;
use ::http::{Extensions, HeaderMap, Request, Response};
use smallvec::SmallVec;
use tower_layer::Layer;
use tower_service::Service;

use crate::auth::{
    AuthError, Authenticator, CredentialError, MissingScope, Principal, Source, Target,
};
use crate::backend::{BackendError, FailMode};
use crate::clock::{Clock, SystemClock};
use crate::http::{AuthScheme, BodyStyle, Rejection};
use crate::limit::{CheckMode, Decision, HeaderSet, LimitStore, Plan, PlanSet, RenderedHeaders};
use crate::quota::{MemoryQuotaStore, QuotaDecision, QuotaStore};
use crate::scope::{Required, ScopeError};
use crate::store::KeyStore;

/// What every route shares. Cheap to clone (one `Arc`).
pub struct Gate<S, L, Q = MemoryQuotaStore, C = SystemClock>(Arc<Inner<S, L, Q, C>>);

struct Inner<S, L, Q, C> {
    auth: Authenticator<S, C>,
    limiter: L,
    quotas: Option<Q>,
    plans: PlanSet,
    default_plan: Option<String>,
    style: BodyStyle,
    headers: HeaderSet,
    limit_fail: FailMode,
    quota_fail: FailMode,
}

impl<S, L, Q, C> Clone for Gate<S, L, Q, C> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<S, L, Q, C> fmt::Debug for Gate<S, L, Q, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gate")
            .field("auth", &self.0.auth)
            .field("plans", &self.0.plans.iter().map(Plan::name).collect::<Vec<_>>())
            .field("default_plan", &self.0.default_plan)
            .field("quotas", &self.0.quotas.is_some())
            .field("style", &self.0.style)
            .field("limit_fail", &self.0.limit_fail)
            .field("quota_fail", &self.0.quota_fail)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Gate`]; see [`Gate::builder`].
#[must_use]
pub struct GateBuilder<S, L, Q = MemoryQuotaStore, C = SystemClock> {
    inner: Inner<S, L, Q, C>,
}

impl<S, L, Q, C> fmt::Debug for GateBuilder<S, L, Q, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GateBuilder").finish_non_exhaustive()
    }
}

impl<S: KeyStore, L: LimitStore, C: Clock> Gate<S, L, MemoryQuotaStore, C> {
    /// Starts a gate over `auth` and `limiter`: no plans (so no limits)
    /// until [`plans`](GateBuilder::plans) is set, no quota store, nested
    /// error bodies, `X-RateLimit-*` headers, every store failure a 503.
    pub fn builder(
        auth: Authenticator<S, C>,
        limiter: L,
    ) -> GateBuilder<S, L, MemoryQuotaStore, C> {
        GateBuilder {
            inner: Inner {
                auth,
                limiter,
                quotas: None,
                plans: PlanSet::default(),
                default_plan: None,
                style: BodyStyle::default(),
                headers: HeaderSet::default(),
                limit_fail: FailMode::Closed,
                quota_fail: FailMode::Closed,
            },
        }
    }
}

impl<S, L, Q, C> GateBuilder<S, L, Q, C> {
    /// The plans keys may name. Replaces any set before. A key that names
    /// no plan, on a route that names none, gets the
    /// [`default_plan`](Self::default_plan) — and without one, no limit at
    /// all.
    pub fn plans(mut self, plans: PlanSet) -> Self {
        self.inner.plans = plans;
        self
    }

    /// The plan of a key that names none, on routes that name none. A name
    /// not in [`plans`](Self::plans) is a deployment error every request
    /// answers (500, [`Rejection::Misconfigured`]).
    pub fn default_plan(mut self, plan: impl Into<String>) -> Self {
        self.inner.default_plan = Some(plan.into());
        self
    }

    /// Counts monthly quotas in `quotas` on routes that name a category.
    pub fn quotas<Q2: QuotaStore>(self, quotas: Q2) -> GateBuilder<S, L, Q2, C> {
        let i = self.inner;
        GateBuilder {
            inner: Inner {
                auth: i.auth,
                limiter: i.limiter,
                quotas: Some(quotas),
                plans: i.plans,
                default_plan: i.default_plan,
                style: i.style,
                headers: i.headers,
                limit_fail: i.limit_fail,
                quota_fail: i.quota_fail,
            },
        }
    }

    /// The error body style of routes that set none.
    pub fn body_style(mut self, style: BodyStyle) -> Self {
        self.inner.style = style;
        self
    }

    /// Which rate-limit headers responses carry.
    pub fn rate_limit_headers(mut self, set: HeaderSet) -> Self {
        self.inner.headers = set;
        self
    }

    /// What a request gets when the limiter's store fails (default
    /// [`FailMode::Closed`]: 503). Under [`FailMode::Open`] the request
    /// passes unlimited, with a [`FailedOpen`] in its extensions. A full
    /// `MemoryLimiter` (no room to track a new key) is such a failure too:
    /// size it for the keys a window sees, or new keys pass unlimited. A
    /// route can choose otherwise ([`GateLayer::limiter_fail_mode`]).
    pub fn limiter_fail_mode(mut self, mode: FailMode) -> Self {
        self.inner.limit_fail = mode;
        self
    }

    /// What a request gets when the quota store fails (default
    /// [`FailMode::Closed`]: 503). Under [`FailMode::Open`] the request
    /// passes uncounted, with a [`FailedOpen`] in its extensions. A route
    /// can choose otherwise ([`GateLayer::quota_fail_mode`]).
    pub fn quota_fail_mode(mut self, mode: FailMode) -> Self {
        self.inner.quota_fail = mode;
        self
    }

    /// The gate. A [`default_plan`](Self::default_plan) that names no plan
    /// of the set shows only when requests come (a 500 each):
    /// [`try_build`](Self::try_build) refuses it at start-up instead.
    pub fn build(self) -> Gate<S, L, Q, C> {
        Gate(Arc::new(self.inner))
    }

    /// The gate, checked: the default plan, when set, is one of the plans.
    ///
    /// # Errors
    ///
    /// [`UnknownPlan`] naming the default plan when the set lacks it.
    pub fn try_build(self) -> Result<Gate<S, L, Q, C>, UnknownPlan> {
        match &self.inner.default_plan {
            Some(name) if self.inner.plans.get(name).is_none() => {
                Err(UnknownPlan { plan: name.clone() })
            }
            _ => Ok(self.build()),
        }
    }
}

/// A plan name the gate's plans lack ([`GateBuilder::try_build`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("plan `{plan}` is not among the gate's plans")]
#[non_exhaustive]
pub struct UnknownPlan {
    /// The name.
    pub plan: String,
}

/// A name in a route's requirements that its gate cannot resolve
/// ([`GateLayer::checked`]). Unchecked, each shows only when requests
/// come: an unknown format refuses every key (401), an unknown plan
/// answers 500, and a category no plan counts is never counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// [`GateLayer::formats`] names a format the authenticator lacks.
    #[error("format `{0}` is not among the authenticator's formats")]
    UnknownFormat(String),
    /// [`GateLayer::plan`] names a plan the gate's plans lack.
    #[error("plan `{0}` is not among the gate's plans")]
    UnknownPlan(String),
    /// [`GateLayer::quota`] names a category that no plan of the gate
    /// counts (a misspelling, say).
    #[error("no plan of the gate counts quota category `{0}`")]
    UncountedCategory(String),
    /// [`GateLayer::quota`] names a category, but the gate has no
    /// [`quotas`](GateBuilder::quotas) store to count it in.
    #[error("quota category `{0}` named, but the gate has no quota store")]
    NoQuotaStore(String),
}

/// Picks the request's [`Target`] (tenant, environment, region) from its
/// method, URI and headers — typically from path segments — or refuses the
/// request (e.g. a path segment that names no possible tenant).
pub type TargetFn = dyn Fn(&Parts) -> Result<Target, Rejection> + Send + Sync;

/// What one route requires beyond authentication. Built through
/// [`GateLayer`]'s methods.
#[derive(Clone, Default)]
pub struct Route {
    /// Every scope the route requires (all of them).
    required: SmallVec<[Required; 1]>,
    formats: Option<Arc<[Cow<'static, str>]>>,
    quota: Option<Cow<'static, str>>,
    style: Option<BodyStyle>,
    plan: Option<String>,
    target: Option<Arc<TargetFn>>,
    cost: Option<u32>,
    /// What a limiter failure on this route gets, in place of the gate's
    /// mode ([`GateLayer::limiter_fail_mode`]); `None` leaves the gate's.
    limit_fail: Option<FailMode>,
    /// Likewise for the quota store ([`GateLayer::quota_fail_mode`]).
    quota_fail: Option<FailMode>,
    /// The cookie's name and its [`cookie_id`], hashed once here rather
    /// than per request.
    cookie: Option<(Cow<'static, str>, u64)>,
    /// The challenge of the route's 401s, from its formats and the header
    /// rules, settled as the route is built.
    scheme: AuthScheme,
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route")
            .field(
                "required",
                &self.required.iter().map(|r| r.scope().as_str()).collect::<Vec<_>>(),
            )
            .field("formats", &self.formats)
            .field("quota", &self.quota)
            .field("style", &self.style)
            .field("plan", &self.plan)
            .field("target", &self.target.is_some())
            .field("cost", &self.cost)
            .field("limit_fail", &self.limit_fail)
            .field("quota_fail", &self.quota_fail)
            .field("cookie", &self.cookie.as_ref().map(|(name, _)| name))
            .field("scheme", &self.scheme)
            .finish()
    }
}

/// The typed reason a request was refused, for the host's logs. The client
/// sees only the [`Rejection`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Refusal {
    /// Authentication or a key check failed (missing, invalid, wrong tenant
    /// or environment, inactive account, store down).
    Auth(AuthError),
    /// The route's target function refused the request.
    Target,
    /// The plan that applies (the key's, the route's or the gate's default)
    /// is not among the gate's plans (a deployment error).
    UnknownPlan {
        /// The plan name.
        plan: String,
    },
    /// The rate limit is exhausted.
    RateLimited(Decision),
    /// The principal lacks the route's scope.
    Scope(MissingScope),
    /// The monthly quota is used up.
    Quota(QuotaDecision),
    /// The limiter's store failed and the gate fails closed.
    LimiterBackend(BackendError),
    /// The quota store failed and the gate fails closed.
    QuotaBackend(BackendError),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auth(e) => write!(f, "authentication failed: {e}"),
            Self::Target => f.write_str("request names no reachable target"),
            Self::UnknownPlan { plan } => write!(f, "key names unknown plan `{plan}`"),
            Self::RateLimited(d) => write!(f, "rate limit `{}` exhausted", d.binding().name),
            Self::Scope(e) => write!(f, "{e}"),
            Self::Quota(q) => {
                write!(f, "monthly quota `{}` used up", q.rule.as_deref().unwrap_or("?"))
            }
            Self::LimiterBackend(e) => write!(f, "rate limiter store failed: {e}"),
            Self::QuotaBackend(e) => write!(f, "quota store failed: {e}"),
        }
    }
}

/// An error, as [`AuthError`] is, so that a host can box it or log its
/// chain; the source is the cause a variant holds, as with `AuthError`'s
/// (none for [`Refusal::Scope`], whose text is the missing scope's own).
impl std::error::Error for Refusal {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Auth(e) => Some(e),
            Self::LimiterBackend(e) | Self::QuotaBackend(e) => Some(e),
            Self::Target
            | Self::UnknownPlan { .. }
            | Self::RateLimited(_)
            | Self::Scope(_)
            | Self::Quota(_) => None,
        }
    }
}

/// A refused request: the typed reason, what the client sees, and the
/// rate-limit headers its response carries. Found in the response
/// extensions of every response the layer answers itself.
#[derive(Debug, Clone)]
pub struct Refused {
    reason: Arc<Refusal>,
    rejection: Rejection,
    style: BodyStyle,
    /// The `WWW-Authenticate` challenge's scheme.
    scheme: AuthScheme,
    /// The decision whose headers (in that set) the response carries;
    /// boxed, to keep every `Result<_, Refused>` small.
    limit: Option<Box<(Decision, HeaderSet)>>,
    failed_open: Option<FailedOpen>,
    /// Refused after this layer took the charge over from an outer one
    /// (see `TookOver`).
    took_over: bool,
}

impl Refused {
    fn new(reason: Refusal, rejection: Rejection, style: BodyStyle) -> Self {
        Self {
            reason: Arc::new(reason),
            rejection,
            style,
            scheme: AuthScheme::Bearer,
            limit: None,
            failed_open: None,
            took_over: false,
        }
    }

    /// Checks let through under [`FailMode::Open`] before this refusal (the
    /// limiter down, then a scope refused, say), an outer layer's
    /// included: also in the response's extensions.
    #[must_use]
    pub fn failed_open(&self) -> Option<&FailedOpen> {
        self.failed_open.as_ref()
    }

    /// A refusal made after the limiter ran: with the decision's headers
    /// (in `set`), the fail-open trace so far (`limiter`, `refund`), and
    /// whether the layer had taken the charge over.
    fn after_limit(
        mut self,
        decision: Option<&Decision>,
        set: HeaderSet,
        (limiter, refund): (&Option<Arc<BackendError>>, &Option<Arc<BackendError>>),
        took_over: bool,
    ) -> Self {
        self.limit = decision.map(|d| Box::new((d.clone(), set)));
        let (limiter, refund) = (limiter.clone(), refund.clone());
        self.failed_open = (limiter.is_some() || refund.is_some()).then(|| FailedOpen {
            limiter,
            refund,
            quota: None,
        });
        self.took_over = took_over;
        self
    }

    /// This refusal with the outer layers' fail-open trace beside its own:
    /// all of it, but for `superseded`, the limiter failure of this gate's
    /// outer layer where this layer had taken the charge over and checked
    /// the limit again (another gate's failure stands).
    fn with_outer_trace(
        mut self,
        outer: Option<FailedOpen>,
        superseded: Option<&Arc<BackendError>>,
    ) -> Self {
        self.failed_open = FailedOpen::beside(self.failed_open.take(), outer, superseded);
        self
    }

    /// Why, for logs.
    #[must_use]
    pub fn reason(&self) -> &Refusal {
        &self.reason
    }

    /// What the client sees.
    #[must_use]
    pub fn rejection(&self) -> &Rejection {
        &self.rejection
    }

    /// Answers in `style` instead.
    #[must_use]
    pub fn with_style(mut self, style: BodyStyle) -> Self {
        self.style = style;
        self
    }

    /// Challenges in `scheme` (for `WWW-Authenticate`) instead.
    fn with_scheme(mut self, scheme: AuthScheme) -> Self {
        self.scheme = scheme;
        self
    }

    /// The response, stamped `now`, with the rate-limit headers and this
    /// value in its extensions.
    #[must_use]
    pub fn into_response<B: From<String>>(self, now: jiff::Timestamp) -> Response<B> {
        let mut out = self.rejection.to_response_in(self.style, self.scheme, now);
        // The rejection's own `Retry-After` wins over the limiter's.
        if let Some(limit) = &self.limit {
            let (decision, set) = &**limit;
            decision.fill_in(*set, &mut out.headers);
        }
        let mut res = out.into_http::<B>();
        if let Some(f) = &self.failed_open {
            res.extensions_mut().insert(f.clone());
        }
        res.extensions_mut().insert(self);
        res
    }
}

/// The reason's text: `Refused` is the error of [`Gate::admit`] and
/// [`Gate::charge`], so a handler returning `Box<dyn Error>` (or `anyhow`)
/// can `?` it.
impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.reason, f)
    }
}

/// The reason's source: the reason itself is this error's text, so the
/// chain does not repeat it.
impl std::error::Error for Refused {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.reason)
    }
}

/// What the gate learned about an admitted request. The layer inserts its
/// parts into the request extensions: the [`Principal`], the [`Decision`]
/// (when a plan applied, with its [`Refund`]) and the [`QuotaDecision`]
/// (when the route counts a category, with its [`QuotaRefund`]). A caller
/// of [`Gate::admit`] finds the same handles here:
/// [`refund`](Self::refund) and [`quota_refund`](Self::quota_refund).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Admitted {
    /// Who is calling.
    pub principal: Principal,
    /// The rate-limit decision, when a plan applied.
    pub decision: Option<Decision>,
    /// The quota decision, when the route counts a category.
    pub quota: Option<QuotaDecision>,
    /// Checks let through because their store failed under
    /// [`FailMode::Open`], when any were.
    pub failed_open: Option<FailedOpen>,
    /// What gives back `decision`'s charge: there exactly when `decision`
    /// is (private, so the two cannot part).
    refund: Option<Refund>,
    /// What gives back `quota`'s count: there exactly when `quota` is.
    quota_refund: Option<QuotaRefund>,
    /// The plan charged (its address; 0 for none) and the cookie the
    /// credential came from (its [`cookie_id`]; 0 for a header): for the
    /// mark layers of this gate nested inside read.
    plan: usize,
    cookie: u64,
    /// This layer charged the request itself, an outer layer's charge
    /// given back (see `TookOver`).
    took_over: bool,
}

impl Admitted {
    /// The handle that gives back what the limiter charged for this
    /// request (the [`Refund`] the layer puts beside the [`Decision`] in the
    /// request's extensions): a request that failed before doing its work,
    /// or one that should not count. `None` where no plan applied or the
    /// limiter failed open (no [`decision`](Self::decision)). Clones of
    /// it, and of this value, share one charge.
    ///
    /// ```
    /// use keygate::auth::{Authenticator, Target};
    /// use keygate::limit::{MemoryLimiter, PlanSet};
    /// use keygate::manager::{KeyManager, NewKey};
    /// use keygate::store::{MemoryKeyStore, Tenant};
    /// use keygate::tower::Gate;
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
    /// let keys = MemoryKeyStore::new();
    /// let tenant = Tenant::workspace("ws_a".parse()?);
    /// let key = KeyManager::new(keys.clone())
    ///     .create(NewKey::new("n", keygate::format::NH, tenant).plan("free")) // 5 a minute
    ///     .await?;
    /// let gate = Gate::builder(Authenticator::new(keys), MemoryLimiter::new(1_000))
    ///     .plans(PlanSet::presets())
    ///     .build();
    ///
    /// // A host without tower: its framework's headers, the route's needs.
    /// let mut headers = http::HeaderMap::new();
    /// headers.insert("x-api-key", key.key().expose_secret().parse()?);
    /// let route = gate.layer().route().clone();
    /// let admitted = gate.admit(&route, &headers, &Target::any()).await?;
    /// assert_eq!(admitted.decision.as_ref().map(|d| d.remaining()), Some(4));
    ///
    /// // The upstream is down: nothing was sent, so the request costs nothing.
    /// if let Some(refund) = admitted.refund() {
    ///     // An error giving back leaves the unit spent: nothing more to do.
    ///     let _ = refund.give_back(u32::MAX).await;
    /// }
    /// let next = gate.admit(&route, &headers, &Target::any()).await?;
    /// assert_eq!(next.decision.map(|d| d.remaining()), Some(4));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # })
    /// # }
    /// ```
    #[must_use]
    pub const fn refund(&self) -> Option<&Refund> {
        self.refund.as_ref()
    }

    /// The handle that gives back what the quota store counted for this
    /// request (the [`QuotaRefund`] the layer puts beside the
    /// [`QuotaDecision`] in the request's extensions). `None` where no
    /// [`quota`](Self::quota) was counted: the route names no category, the
    /// gate has no quota store or no plan applied, or the store failed
    /// open. Clones of it, and of this value, share one count.
    ///
    /// ```
    /// # use keygate::auth::{Authenticator, Target};
    /// # use keygate::limit::{MemoryLimiter, PlanSet};
    /// # use keygate::manager::{KeyManager, NewKey};
    /// # use keygate::quota::MemoryQuotaStore;
    /// # use keygate::store::{MemoryKeyStore, Tenant};
    /// # use keygate::tower::Gate;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
    /// # let keys = MemoryKeyStore::new();
    /// # let tenant = Tenant::workspace("ws_a".parse()?);
    /// # let key = KeyManager::new(keys.clone())
    /// #     .create(NewKey::new("n", keygate::format::NH, tenant).plan("indie"))
    /// #     .await?;
    /// # let mut headers = http::HeaderMap::new();
    /// # headers.insert("x-api-key", key.key().expose_secret().parse()?);
    /// // `indie`: 4,000 webhook notifications a month.
    /// let gate = Gate::builder(Authenticator::new(keys), MemoryLimiter::new(1_000))
    ///     .plans(PlanSet::presets())
    ///     .quotas(MemoryQuotaStore::new())
    ///     .build();
    /// let route = gate.layer().quota("webhook").route().clone();
    /// let admitted = gate.admit(&route, &headers, &Target::any()).await?;
    /// // The receiver is down: nothing was delivered, so nothing is billed.
    /// if let Some(refund) = admitted.quota_refund() {
    ///     refund.give_back(u64::MAX).await?;
    /// }
    /// let next = gate.admit(&route, &headers, &Target::any()).await?;
    /// assert_eq!(next.quota.map(|q| q.used), Some(1)); // the first was given back
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # })
    /// # }
    /// ```
    #[must_use]
    pub const fn quota_refund(&self) -> Option<&QuotaRefund> {
        self.quota_refund.as_ref()
    }
}

/// What the layer's limiter charged for this request, for the handler to
/// give back: a request that failed before doing its work (a 5xx of its
/// own, an upstream down), or one that should not count. The layer puts it
/// in the request's extensions beside the [`Decision`] whose charge it
/// holds (axum: `Extension<Refund>`; [`Gate::admit`] returns it as
/// [`Admitted::refund`]): none where no plan applied or the limiter failed
/// open, and one that gives nothing back where the route's cost is 0. It
/// gives back under the limiter key and the plan the layer charged (the
/// record id, or `{record id}#{plan}` under a route's plan), which the
/// handler need not know.
///
/// Under nested layers of one gate it is the charge that stands: the outer
/// layer's, or the inner layer's where that one charged the request itself
/// (under another plan, or for a cost of its own) and gave the outer
/// charge back. As for the [`Decision`], a layer of another gate inside
/// that charged too puts its own in its place.
///
/// Copies share one charge: together they give back at most what the
/// check charged. Use this handle rather than [`LimitStore::refund`] with
/// the [`Decision`] from the extensions (a copy, which does not know what
/// the handle gave back): both would give the units back twice.
///
/// The response's rate-limit headers report the check as the layer made
/// it, before any refund: the units given back show from the key's next
/// request on.
///
/// ```
/// use axum::{Extension, Router, body::Body, http::{Request, StatusCode}, routing::post};
/// use keygate::auth::Authenticator;
/// use keygate::limit::{MemoryLimiter, PlanSet};
/// use keygate::manager::{KeyManager, NewKey};
/// use keygate::store::{MemoryKeyStore, Tenant};
/// use keygate::tower::{Gate, Refund};
/// use tower::ServiceExt;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
/// let keys = MemoryKeyStore::new();
/// let tenant = Tenant::workspace("ws_a".parse()?);
/// let key = KeyManager::new(keys.clone())
///     .create(NewKey::new("n", keygate::format::NH, tenant).plan("free")) // 5 a minute
///     .await?;
/// let gate = Gate::builder(Authenticator::new(keys), MemoryLimiter::new(1_000))
///     .plans(PlanSet::presets())
///     .build();
///
/// // The upstream is down: nothing was sent, so the request costs nothing.
/// // (`Option`: a request without a `Decision` carries no `Refund`.)
/// async fn send(refund: Option<Extension<Refund>>) -> StatusCode {
///     if let Some(Extension(refund)) = refund {
///         // An error giving back leaves the unit spent: nothing more to do.
///         let _ = refund.give_back(u32::MAX).await;
///     }
///     StatusCode::SERVICE_UNAVAILABLE
/// }
/// let app: Router = Router::new().route("/v1/send", post(send).route_layer(gate.layer()));
///
/// let call = || Request::post("/v1/send").header("x-api-key", key.key().expose_secret());
/// for _ in 0..6 {
///     let res = app.clone().oneshot(call().body(Body::empty())?).await?;
///     assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE); // never a 429
///     // The check as the layer made it, before the handler's refund.
///     assert_eq!(res.headers()["x-ratelimit-remaining"], "4");
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # })
/// # }
/// ```
#[derive(Clone)]
pub struct Refund(Arc<dyn GiveBack>);

impl Refund {
    /// Gives back up to `cost` units of this request's charge (`u32::MAX`:
    /// all of it), no more than the check charged and earlier calls (on
    /// any copy) left: a second call gives back only what the first did
    /// not, and nothing once all is given back. What it gives back is
    /// taken off the charge when the returned future first runs, before
    /// the store is called, so a refund that fails (or whose future is
    /// dropped while the store works) is not made again; the units may
    /// then stay spent. A future dropped before it runs takes nothing off.
    /// Beyond that, the limiter's own rules hold
    /// ([`LimitStore::refund`]): nothing once the check's fixed window has
    /// ended, say.
    ///
    /// # Errors
    ///
    /// The limiter store's [`BackendError`]; the units stay spent.
    pub fn give_back(
        &self,
        cost: u32,
    ) -> impl Future<Output = Result<(), BackendError>> + Send + 'static {
        let charged = Arc::clone(&self.0);
        async move { charged.give_back_boxed(cost).await }
    }

    /// The units of the charge not yet given back (by any copy). What the
    /// limiter still holds of them may be less: see
    /// [`give_back`](Self::give_back).
    #[must_use]
    pub fn refundable(&self) -> u32 {
        self.0.refundable()
    }

    /// The handle for `decision`, a check of `gate` for `principal` under
    /// the plan at address `plan` (in the gate's set): it gives back under
    /// the limiter key those settle, from its own copy of the decision.
    fn charged<S, L, Q, C>(
        gate: &Gate<S, L, Q, C>,
        principal: &Principal,
        plan: usize,
        decision: &Decision,
    ) -> Self
    where
        S: KeyStore + 'static,
        L: LimitStore + 'static,
        Q: QuotaStore + 'static,
        C: Clock + 'static,
    {
        Self(Arc::new(Charged {
            gate: gate.clone(),
            principal: principal.clone(),
            plan,
            check: Mutex::new(decision.clone()),
        }))
    }

    /// The charge of `gate`, when the handle is one of its layers'.
    fn of<S, L, Q, C>(&self, gate: &Gate<S, L, Q, C>) -> Option<Arc<Charged<S, L, Q, C>>>
    where
        S: KeyStore + 'static,
        L: LimitStore + 'static,
        Q: QuotaStore + 'static,
        C: Clock + 'static,
    {
        let any: Arc<dyn Any + Send + Sync> = Arc::clone(&self.0) as _;
        any.downcast::<Charged<S, L, Q, C>>().ok().filter(|c| c.gate.id() == gate.id())
    }
}

impl fmt::Debug for Refund {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Refund").field("refundable", &self.refundable()).finish_non_exhaustive()
    }
}

/// A [`Refund`]'s charge, whatever the gate's types.
trait GiveBack: Any + Send + Sync {
    /// [`Charged::give_back`].
    fn give_back_boxed(
        &self,
        cost: u32,
    ) -> Pin<Box<dyn Future<Output = Result<(), BackendError>> + Send + '_>>;
    /// The units still to give back.
    fn refundable(&self) -> u32;
    /// The gate's identity ([`Gate::id`]).
    fn gate(&self) -> usize;
}

/// What one admitted check of a gate charged: the principal and the plan
/// (its address in the gate's set) it was charged under, which settle the
/// limiter key, and the check's decision, whose charge every copy of the
/// [`Refund`] takes its units off.
struct Charged<S, L, Q, C> {
    gate: Gate<S, L, Q, C>,
    principal: Principal,
    plan: usize,
    check: Mutex<Decision>,
}

impl<S: KeyStore, L: LimitStore, Q: QuotaStore, C: Clock> Charged<S, L, Q, C> {
    /// Gives back up to `cost` units: taken off the shared charge at once,
    /// under the lock (copies racing each other give back what is there
    /// once), then given back by the store from a copy of the decision as
    /// it was, so that it gives back exactly those units (none, once all
    /// are given back: the store then changes nothing).
    async fn give_back(&self, cost: u32) -> Result<(), BackendError> {
        let Some(plan) = self.gate.plan_at(self.plan) else { return Ok(()) };
        let (units, mut check) = {
            let mut shared = self.check.lock().unwrap_or_else(PoisonError::into_inner);
            // The units alone: no policy needed (nor receipts built).
            let units = shared.refund_receipts(&[], cost).0;
            let check = shared.clone();
            shared.refunded(units);
            (units, check)
        };
        let key = self.gate.limit_key(&self.principal, plan);
        self.gate.0.limiter.refund(&key, plan.rate(), units, &mut check).await
    }
}

impl<S, L, Q, C> GiveBack for Charged<S, L, Q, C>
where
    S: KeyStore + 'static,
    L: LimitStore + 'static,
    Q: QuotaStore + 'static,
    C: Clock + 'static,
{
    fn give_back_boxed(
        &self,
        cost: u32,
    ) -> Pin<Box<dyn Future<Output = Result<(), BackendError>> + Send + '_>> {
        Box::pin(self.give_back(cost))
    }

    fn refundable(&self) -> u32 {
        self.check.lock().unwrap_or_else(PoisonError::into_inner).refund_receipts(&[], u32::MAX).0
    }

    fn gate(&self) -> usize {
        self.gate.id()
    }
}

/// What the layer's quota store counted for this request, for the handler
/// to give back: a request that failed before doing its work (an upstream
/// down, nothing sent), where the host bills only delivered work. The
/// layer puts it in the request's extensions beside the [`QuotaDecision`]
/// whose count it holds (axum: `Extension<QuotaRefund>`; [`Gate::admit`]
/// returns it as [`Admitted::quota_refund`]): none where the route counts
/// no category, the gate has no quota store or no plan applied, or the
/// store failed open; one that gives nothing back where the plan does not
/// count the category. It gives back under the quota account the layer
/// counted ([`Principal::quota_account`] of the plan it applied) and the
/// route's category, which the handler need not know.
///
/// Copies share one count: together they give back at most what the
/// check counted. Use this handle rather than [`QuotaStore::refund`] with
/// the [`QuotaDecision`] from the extensions (a copy, which does not know
/// what the handle gave back): both would give the units back twice.
/// Under nested layers it is the innermost counting layer's, as the
/// [`QuotaDecision`] is: a router-wide `.quota(…)` that a route's own
/// counted again is not given back through it. It gives back quota units
/// only: the rate-limit units go back through the [`Refund`]. For a
/// category charged with [`Gate::charge`] (one the body names),
/// [`Gate::quota_refund`] makes the same handle.
///
/// ```
/// use axum::{Extension, Router, body::Body, http::{Request, StatusCode}, routing::post};
/// use keygate::auth::Authenticator;
/// use keygate::limit::{MemoryLimiter, PlanSet};
/// use keygate::manager::{KeyManager, NewKey};
/// use keygate::quota::MemoryQuotaStore;
/// use keygate::store::{MemoryKeyStore, Tenant};
/// use keygate::tower::{Gate, QuotaRefund};
/// use std::sync::Arc;
/// use tower::ServiceExt;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
/// let keys = MemoryKeyStore::new();
/// let tenant = Tenant::workspace("ws_a".parse()?);
/// let key = KeyManager::new(keys.clone())
///     .create(NewKey::new("n", keygate::format::NH, tenant).plan("indie")) // 4,000 webhooks a month
///     .await?;
/// let quotas = Arc::new(MemoryQuotaStore::new());
/// let gate = Gate::builder(Authenticator::new(keys), MemoryLimiter::new(1_000))
///     .plans(PlanSet::presets())
///     .quotas(Arc::clone(&quotas))
///     .build();
///
/// // The receiver is down: nothing was delivered, so the month's quota
/// // keeps the unit. (`Option`: a request counted nowhere carries none.)
/// async fn deliver(refund: Option<Extension<QuotaRefund>>) -> StatusCode {
///     if let Some(Extension(refund)) = refund {
///         // An error giving back leaves the unit counted: nothing more to do.
///         let _ = refund.give_back(u64::MAX).await;
///     }
///     StatusCode::BAD_GATEWAY
/// }
/// let app: Router =
///     Router::new().route("/v1/webhooks", post(deliver).route_layer(gate.layer().quota("webhook")));
///
/// let call = || Request::post("/v1/webhooks").header("x-api-key", key.key().expose_secret());
/// for _ in 0..3 {
///     let res = app.clone().oneshot(call().body(Body::empty())?).await?;
///     assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
/// }
/// // Nothing delivered, nothing counted (the account: the key's workspace
/// // and plan, `Principal::quota_account`).
/// use keygate::quota::QuotaStore;
/// assert_eq!(quotas.usage("ws_a/indie", "webhook", keygate::jiff::Timestamp::now()).await?, 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # })
/// # }
/// ```
#[derive(Clone)]
pub struct QuotaRefund(Arc<dyn GiveBackQuota>);

impl QuotaRefund {
    /// Gives back up to `cost` units of this request's count (`u64::MAX`:
    /// all of it), no more than the check counted and earlier calls (on
    /// any copy) left, and nothing once the month it counted in has ended
    /// (by the gate's clock). What it gives back is taken off the count
    /// when the returned future first runs, before the store is called,
    /// so a refund that fails (or whose future is dropped while the store
    /// works) is not made again; the units may then stay counted. A future
    /// dropped before it runs takes nothing off. See [`QuotaStore::refund`].
    ///
    /// # Errors
    ///
    /// The quota store's [`BackendError`]; the units stay counted.
    pub fn give_back(
        &self,
        cost: u64,
    ) -> impl Future<Output = Result<(), BackendError>> + Send + 'static {
        let counted = Arc::clone(&self.0);
        async move { counted.give_back_boxed(cost).await }
    }

    /// The units of the count not yet given back (by any copy); 0 once the
    /// month it counted in has ended, by the gate's clock.
    #[must_use]
    pub fn refundable(&self) -> u64 {
        self.0.refundable()
    }
}

impl QuotaRefund {
    /// The handle for `decision`, a count of `category` for `principal`
    /// under `plan` of `gate`: it gives back under the plan's quota
    /// account, on the gate's clock, from its own copy of the decision.
    fn of<S, L, Q, C>(
        gate: &Gate<S, L, Q, C>,
        principal: &Principal,
        plan: &Plan,
        category: Cow<'static, str>,
        decision: &QuotaDecision,
    ) -> Self
    where
        S: KeyStore + 'static,
        L: LimitStore + 'static,
        Q: QuotaStore + 'static,
        C: Clock + 'static,
    {
        Self(Arc::new(QuotaCharged {
            gate: gate.clone(),
            account: principal.quota_account(plan),
            category,
            check: Mutex::new(decision.clone()),
        }))
    }
}

impl fmt::Debug for QuotaRefund {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuotaRefund")
            .field("refundable", &self.refundable())
            .finish_non_exhaustive()
    }
}

/// A [`QuotaRefund`]'s count, whatever the gate's types.
trait GiveBackQuota: Send + Sync {
    /// [`QuotaCharged::give_back`].
    fn give_back_boxed(
        &self,
        cost: u64,
    ) -> Pin<Box<dyn Future<Output = Result<(), BackendError>> + Send + '_>>;
    /// The units still to give back.
    fn refundable(&self) -> u64;
}

/// What one admitted request's quota count took: the account and the
/// category it counted, and the check's decision, whose count every copy
/// of the [`QuotaRefund`] takes its units off.
struct QuotaCharged<S, L, Q, C> {
    gate: Gate<S, L, Q, C>,
    account: String,
    category: Cow<'static, str>,
    check: Mutex<QuotaDecision>,
}

impl<S: KeyStore, L: LimitStore, Q: QuotaStore, C: Clock> QuotaCharged<S, L, Q, C> {
    /// Gives back up to `cost` units: taken off the shared count at once,
    /// under the lock (copies racing each other give back what is there
    /// once), then given back by the store from a copy of the decision as
    /// it was, so that it gives back exactly those units.
    async fn give_back(&self, cost: u64) -> Result<(), BackendError> {
        let Some(quotas) = &self.gate.0.quotas else { return Ok(()) };
        let now = self.gate.0.auth.clock_ref().now();
        let (units, mut check) = {
            let mut shared = self.check.lock().unwrap_or_else(PoisonError::into_inner);
            let units = shared.refund_units(cost, now);
            let check = shared.clone();
            shared.refunded(units);
            (units, check)
        };
        quotas.refund(&self.account, &self.category, units, &mut check, now).await
    }
}

impl<S, L, Q, C> GiveBackQuota for QuotaCharged<S, L, Q, C>
where
    S: KeyStore + 'static,
    L: LimitStore + 'static,
    Q: QuotaStore + 'static,
    C: Clock + 'static,
{
    fn give_back_boxed(
        &self,
        cost: u64,
    ) -> Pin<Box<dyn Future<Output = Result<(), BackendError>> + Send + '_>> {
        Box::pin(self.give_back(cost))
    }

    fn refundable(&self) -> u64 {
        let now = self.gate.0.auth.clock_ref().now();
        self.check.lock().unwrap_or_else(PoisonError::into_inner).refund_units(u64::MAX, now)
    }
}

/// Checks the gate let through because their store failed and the host
/// chose [`FailMode::Open`]. The layer puts it in the request's and the
/// response's extensions, so an outage that lets requests through
/// unlimited or uncounted is still there for the host's logs and alerts.
///
/// One error per field: where layers nested in each other failed alike,
/// the outermost layer's error is the one kept (any one says the request
/// went through unchecked there); a failure a layer inside superseded by
/// checking the same gate's limit again is dropped.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct FailedOpen {
    /// The limiter's error: the request was not rate-limited.
    pub limiter: Option<Arc<BackendError>>,
    /// The limiter's error giving an outer layer's charge back, when a
    /// layer nested inside charged the request itself (under another plan
    /// or cost): the request stayed charged under both. Reported whatever
    /// the fail mode (nothing was let through: it is charged too much).
    pub refund: Option<Arc<BackendError>>,
    /// The quota store's error: the request was not counted.
    pub quota: Option<Arc<BackendError>>,
}

/// What [`Gate::charge`] did with a request it let through (a denial is
/// its `Err`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Charge {
    /// Counted: the quota store's decision (its `rule` is `None` where the
    /// plan does not count the category).
    Counted(QuotaDecision),
    /// Nothing to count against: the gate has no quota store, or neither
    /// the key nor the gate names a plan.
    Uncounted,
    /// The quota store failed and the gate fails open
    /// ([`FailMode::Open`]): let through uncounted. The trace's
    /// [`quota`](FailedOpen::quota) holds the store's error.
    FailedOpen(FailedOpen),
}

impl Charge {
    /// The quota store's decision, when it counted.
    #[must_use]
    pub const fn decision(&self) -> Option<&QuotaDecision> {
        match self {
            Self::Counted(q) => Some(q),
            Self::Uncounted | Self::FailedOpen(_) => None,
        }
    }

    /// The outage the charge was let through despite, when there was one.
    #[must_use]
    pub const fn failed_open(&self) -> Option<&FailedOpen> {
        match self {
            Self::FailedOpen(f) => Some(f),
            Self::Counted(_) | Self::Uncounted => None,
        }
    }

    /// Leaves a [`FailedOpen`] trace in a response's `extensions`, beside
    /// any already there, where the quota store failed: the layer around
    /// the handler keeps it beside its own trace, so the outage reaches the
    /// host's logging layer as a layer's own does. Does nothing otherwise.
    pub fn trace_into(&self, extensions: &mut Extensions) {
        if let Self::FailedOpen(f) = self {
            let there = extensions.remove::<FailedOpen>();
            if let Some(both) = FailedOpen::beside(Some(f.clone()), there, None) {
                extensions.insert(both);
            }
        }
    }
}

impl FailedOpen {
    /// One layer's trace beside an outer layer's: the inner one's failures,
    /// and the outer one's where it has none — but for the outer limiter
    /// failure `superseded`, which no longer holds where the inner layer
    /// took the charge over from the layer of its gate that failed (it
    /// checked the limit again). `None` when nothing failed.
    fn beside(
        inner: Option<Self>,
        outer: Option<Self>,
        superseded: Option<&Arc<BackendError>>,
    ) -> Option<Self> {
        let outer = outer.map(|o| match (&o.limiter, superseded) {
            (Some(l), Some(s)) if Arc::ptr_eq(l, s) => Self { limiter: None, ..o },
            _ => o,
        });
        let both = match (inner, outer) {
            (Some(i), Some(o)) => Self {
                // The outer failure where both failed: a take-over further
                // in supersedes the failure of the layer it vouched on, and
                // a layer that failed after another of its gate overwrote
                // that one's mark, so the outermost failure is never the
                // one superseded while an inner one stands.
                limiter: o.limiter.or(i.limiter),
                refund: i.refund.or(o.refund),
                quota: i.quota.or(o.quota),
            },
            (one, other) => one.or(other)?,
        };
        both.any().then_some(both)
    }

    /// Whether anything failed.
    fn any(&self) -> bool {
        self.limiter.is_some() || self.refund.is_some() || self.quota.is_some()
    }
}

impl<S: KeyStore, L: LimitStore, Q: QuotaStore, C: Clock> Gate<S, L, Q, C> {
    /// A layer for routes that need authentication only (plus the plan's
    /// rate limit). Narrow it with [`GateLayer`]'s methods. Without
    /// [`target`](GateLayer::target), the key's tenant is compared with
    /// nothing: on a route whose path names a workspace or project, set a
    /// target (or check `Principal::tenant()` in the handler), or any valid
    /// key reaches any tenant's data.
    #[must_use]
    pub fn layer(&self) -> GateLayer<S, L, Q, C> {
        let scheme = self.0.auth.auth_scheme();
        GateLayer { gate: self.clone(), route: Arc::new(Route { scheme, ..Route::default() }) }
    }

    /// This gate's identity in its marks on the requests it admitted.
    fn id(&self) -> usize {
        Arc::as_ptr(&self.0).addr()
    }

    /// The authenticator.
    #[must_use]
    pub fn authenticator(&self) -> &Authenticator<S, C> {
        &self.0.auth
    }

    /// The plans.
    #[must_use]
    pub fn plans(&self) -> &PlanSet {
        &self.0.plans
    }

    /// The plan that applies to `principal` on `route`: the key's, else the
    /// route's, else the gate's default.
    ///
    /// # Errors
    ///
    /// [`Refused`] (500, [`Rejection::Misconfigured`]) when that name is not
    /// in the gate's plans.
    pub fn plan_for(&self, principal: &Principal, route: &Route) -> Result<Option<&Plan>, Refused> {
        self.plan_within(principal, route, None)
    }

    /// [`plan_for`](Self::plan_for) on a route inside a layer of this gate
    /// that applied `outer`: the key's plan, else this route's, else the
    /// outer layer's, else the gate's default (the nearest wins).
    fn plan_within<'g>(
        &'g self,
        principal: &Principal,
        route: &Route,
        outer: Option<&'g Plan>,
    ) -> Result<Option<&'g Plan>, Refused> {
        if let (None, None, Some(outer)) = (principal.plan(), &route.plan, outer) {
            return Ok(Some(outer));
        }
        let name = principal.plan().or(route.plan.as_deref()).or(self.0.default_plan.as_deref());
        let Some(name) = name else { return Ok(None) };
        self.0.plans.get(name).map(Some).ok_or_else(|| {
            Refused::new(
                Refusal::UnknownPlan { plan: name.to_owned() },
                Rejection::Misconfigured,
                self.style(route),
            )
        })
    }

    /// Whose units a request under `plan` spends
    /// ([`Principal::limit_key`] under the gate's default plan).
    fn limit_key<'p>(&self, principal: &'p Principal, plan: &Plan) -> Cow<'p, str> {
        principal.limit_key(plan, self.0.default_plan.as_deref())
    }

    /// The gate's plan at address `addr` (a mark's record of it).
    fn plan_at(&self, addr: usize) -> Option<&Plan> {
        self.0.plans.iter().find(|p| std::ptr::from_ref(*p).addr() == addr)
    }

    /// The refund of what an outer layer's admitted check `taken` charged,
    /// if this layer charges (`charging`) instead: through the outer
    /// layer's [`Refund`], so a handle the request carries (a copy of the
    /// request, say) cannot give it back again. A refund that fails leaves
    /// the charge standing ([`FailedOpen::refund`]). Boxed: only nested
    /// layers under two plans (or a route's own cost) come here, and every
    /// request's future would otherwise hold room for it.
    fn give_back(
        taken: Option<Arc<Charged<S, L, Q, C>>>,
        charging: bool,
    ) -> Option<impl Future<Output = Result<(), BackendError>>> {
        let taken = taken.filter(|_| charging)?;
        Some(Box::pin(async move { taken.give_back(u32::MAX).await }))
    }

    /// A consuming check under a [`limit_key`](Self::limit_key) of its
    /// own; boxed, as [`give_back`](Self::give_back), since only keys
    /// under a route's plan come here.
    fn check_owned<'a>(
        &'a self,
        key: String,
        plan: &'a Plan,
        cost: u32,
    ) -> impl Future<Output = Result<Decision, BackendError>> + 'a {
        Box::pin(
            async move { self.0.limiter.check(&key, plan.rate(), cost, CheckMode::Consume).await },
        )
    }

    fn style(&self, route: &Route) -> BodyStyle {
        route.style.unwrap_or(self.0.style)
    }

    /// What a limiter failure on `route` gets: its own mode, else the gate's.
    fn limit_fail(&self, route: &Route) -> FailMode {
        route.limit_fail.unwrap_or(self.0.limit_fail)
    }

    /// What a quota store failure on `route` gets: its own mode, else the
    /// gate's.
    fn quota_fail(&self, route: &Route) -> FailMode {
        route.quota_fail.unwrap_or(self.0.quota_fail)
    }

    /// The challenge of `route` for a request whose target is `target`:
    /// the route's, unless the target narrows its formats.
    fn scheme(&self, route: &Route, target: Option<&Target>) -> AuthScheme {
        match target.and_then(|t| t.formats.as_ref()) {
            None => route.scheme,
            Some(t) => self.0.auth.scheme_of(narrowest(Some(t), route.formats.as_ref()).as_deref()),
        }
    }
}

/// Admission: the `Admitted`'s handles hold the gate behind a `dyn`, as
/// the layer's (and `quota_refund`'s) do, so the gate's parts are `'static`.
impl<S, L, Q, C> Gate<S, L, Q, C>
where
    S: KeyStore + 'static,
    L: LimitStore + 'static,
    Q: QuotaStore + 'static,
    C: Clock + 'static,
{
    /// Runs every check of `route` for a request with `headers`, aimed at
    /// `target`. The framework-free core of the layer: what the layer puts
    /// in the request's extensions, the [`Admitted`] holds, the handles
    /// that give back its charge and its count included
    /// ([`Admitted::refund`], [`Admitted::quota_refund`]).
    ///
    /// # Errors
    ///
    /// [`Refused`] with the reason, the rejection and the rate-limit headers
    /// the response must carry.
    pub async fn admit(
        &self,
        route: &Route,
        headers: &HeaderMap,
        target: &Target,
    ) -> Result<Admitted, Refused> {
        let admitted = self.admit_to(route, headers, Ok(target), None).await;
        admitted.map_err(|r| r.with_scheme(self.scheme(route, Some(target))))
    }

    /// [`admit`](Self::admit) for a request whose target function may have
    /// refused it: the caller is still authenticated and rate-limited first,
    /// so a missing or invalid key is a 401 and a refusal carries the limit
    /// headers, as for any other 403.
    ///
    /// A function returning an `async` block rather than an `async fn`: an
    /// `async fn`'s future keeps its arguments twice (as passed, and moved
    /// into the body), 56 bytes of every request's future.
    #[allow(clippy::manual_async_fn, reason = "see above: the future's size")]
    fn admit_to(
        &self,
        route: &Route,
        headers: &HeaderMap,
        target: Result<&Target, &Rejection>,
        // What an outer layer of this gate settled (see `Known`). One
        // function, not steps: the request's future holds one state.
        mut known: Option<Known<S, L, Q, C>>,
    ) -> impl Future<Output = Result<Admitted, Refused>> {
        async move {
            let style = self.style(route);
            let auth = &self.0.auth;
            let (outer, outer_charge) = known.as_mut().map(|k| (k.plan, k.charged.take())).unzip();
            let from_cookie = cookie_credential(auth, route, headers);
            let identity = identity(route, target);
            let cookie = match (&from_cookie, &route.cookie) {
                (Ok(Some(_)), Some((_, id))) if known.is_none() => *id,
                _ => 0,
            };
            let principal = if let Some(Known { principal, .. }) = known {
                auth.recheck(&principal, &identity).map(|()| principal)
            } else {
                match from_cookie {
                    Ok(Some(token)) => {
                        auth.authenticate_token(token, Source::Cookie, &identity).await
                    }
                    Ok(None) => auth.authenticate_http(headers, &identity).await,
                    Err(e) => Err(e.into()),
                }
            };
            let principal = principal.map_err(|e| {
                let rejection = e.rejection();
                Refused::new(Refusal::Auth(e), rejection, style)
            })?;

            let outer_plan = outer.and_then(|addr| self.plan_at(addr));
            let plan = self.plan_within(&principal, route, outer_plan)?;
            let plan_id = plan_addr(plan);
            let limit = outer.is_none_or(|o| route.cost.is_some() || o != plan_id);
            // Charged here instead of outside: what the outer layer took is
            // given back first, so the request costs what this route says, once.
            let mut failed = FailedOpen::default();
            let took_over = limit && outer.is_some(); // see `TookOver`
            if let Some(refund) = Self::give_back(outer_charge.flatten(), limit)
                && let Err(e) = refund.await
            {
                failed.refund = Some(Arc::new(e));
            }
            let decision = match plan.filter(|p| limit && !p.rate().is_empty()) {
                None => None,
                Some(plan) => {
                    let cost = route.cost.unwrap_or(1);
                    let checked = match self.limit_key(&principal, plan) {
                        Cow::Borrowed(key) => {
                            self.0.limiter.check(key, plan.rate(), cost, CheckMode::Consume).await
                        }
                        Cow::Owned(key) => self.check_owned(key, plan, cost).await,
                    };
                    match (checked, self.limit_fail(route)) {
                        (Ok(d), _) => Some(d),
                        (Err(e), FailMode::Open) => {
                            failed.limiter = Some(Arc::new(e));
                            None
                        }
                        (Err(e), FailMode::Closed) => {
                            let r = Refused::new(
                                Refusal::LimiterBackend(e),
                                Rejection::Unavailable,
                                style,
                            );
                            let so_far = (&None, &failed.refund);
                            return Err(r.after_limit(None, self.0.headers, so_far, took_over));
                        }
                    }
                }
            };
            // Refusals from here on carry the limit headers (built only then).
            // A refusal after the limiter failed open still reports it.
            let with_headers = |r: Refused| {
                let so_far = (&failed.limiter, &failed.refund);
                r.after_limit(decision.as_ref(), self.0.headers, so_far, took_over)
            };
            self.authorize(&principal, route, target, decision.as_ref(), style, &with_headers)?;
            let quota = match &route.quota {
                None => None,
                // Boxed, as `give_back`: only routes that count a quota come
                // here (and allocate for their refund handle anyway), and every
                // request's future would otherwise hold room for the store's
                // future and its decision.
                Some(category) => {
                    let mode = self.quota_fail(route);
                    Box::pin(self.charge_plan(
                        &principal,
                        plan,
                        category,
                        1,
                        mode,
                        &mut failed.quota,
                    ))
                    .await
                    .map_err(|r| with_headers(r.with_style(style)))?
                }
            };
            Ok(self.admitted(
                principal,
                route,
                plan,
                (decision, quota),
                failed,
                (cookie, took_over),
            ))
        }
    }

    /// The refusals that follow the limit check, in their order: the
    /// limit's own (a 429), the target function's, the target's and the
    /// key's standing, the route's scopes; each through `with_headers`, which
    /// adds the limit's headers.
    fn authorize(
        &self,
        principal: &Principal,
        route: &Route,
        target: Result<&Target, &Rejection>,
        decision: Option<&Decision>,
        style: BodyStyle,
        with_headers: &impl Fn(Refused) -> Refused,
    ) -> Result<(), Refused> {
        if let Some(d) = decision
            && let Some(rejection) = d.rejection()
        {
            let refused = Refused::new(Refusal::RateLimited(d.clone()), rejection, style);
            return Err(with_headers(refused));
        }
        let target = match target {
            Ok(t) => t,
            Err(rejection) => {
                let refused = Refused::new(Refusal::Target, rejection.clone(), style);
                return Err(with_headers(refused));
            }
        };
        target.check(principal).and_then(|()| self.0.auth.check_standing(principal)).map_err(
            |e| {
                let rejection = e.rejection();
                with_headers(Refused::new(Refusal::Auth(e), rejection, style))
            },
        )?;
        if let Some(missing) = route.required.iter().find_map(|r| principal.require(r).err()) {
            let rejection = missing.rejection();
            return Err(with_headers(Refused::new(Refusal::Scope(missing), rejection, style)));
        }
        Ok(())
    }

    /// What [`admit_to`](Self::admit_to) settled for `principal` on
    /// `route` under `plan`, with the handles that give back what it
    /// charged (`decision`) and counted (`quota`, of the route's category):
    /// made here once, for the layer and [`admit`](Self::admit)'s callers
    /// alike. Every decision gets one, a check of cost 0 too (it gives
    /// nothing back): a layer of the gate inside takes the charge over from
    /// the refund that goes with the decision it vouches for, so one must
    /// never stand beside another layer's decision. Likewise every quota
    /// decision, an uncounted one too.
    fn admitted(
        &self,
        principal: Principal,
        route: &Route,
        plan: Option<&Plan>,
        (decision, quota): (Option<Decision>, Option<QuotaDecision>),
        failed: FailedOpen,
        (cookie, took_over): (u64, bool),
    ) -> Admitted {
        let plan_id = plan_addr(plan);
        let refund = decision.as_ref().map(|d| Refund::charged(self, &principal, plan_id, d));
        let quota_refund = quota
            .as_ref()
            .zip(plan)
            .zip(route.quota.clone())
            .map(|((q, plan), category)| QuotaRefund::of(self, &principal, plan, category, q));
        let failed_open = failed.any().then_some(failed);
        Admitted {
            principal,
            decision,
            quota,
            failed_open,
            refund,
            quota_refund,
            plan: plan_id,
            cookie,
            took_over,
        }
    }
}

impl<S: KeyStore, L: LimitStore, Q: QuotaStore, C: Clock> Gate<S, L, Q, C> {
    /// Counts `cost` units of `category` against the monthly quotas of
    /// `principal`'s plan, else the gate's default plan, for handlers whose
    /// category comes from the body. A route's `.plan(…)` does not apply
    /// here: on such routes, give keys their plan, or count with the route's
    /// `.quota(…)`. [`Charge::Uncounted`] when there is no quota store or
    /// no plan; [`Charge::FailedOpen`] when the quota store failed under
    /// [`FailMode::Open`] (the gate's
    /// [`quota_fail_mode`](GateBuilder::quota_fail_mode): a route's does
    /// not apply here either): put that trace in the response's extensions
    /// ([`Charge::trace_into`]) and the layer keeps it beside its own, for
    /// the host's logs.
    ///
    /// The account is the key's workspace, environment and plan
    /// ([`Principal::quota_account`]: `{workspace}/{plan}`, or
    /// `{workspace}.{environment}/{plan}` for a key of an environment):
    /// every key of a workspace on one plan in one environment draws on one
    /// monthly allowance, and keys on another plan (or after a plan change)
    /// or of another environment on another, so a free key's use never eats
    /// a paid key's quota, a `test` key's never eats `live`'s, and making
    /// more keys on one plan buys nothing.
    ///
    /// A category that no rule of the plan counts is admitted and not
    /// counted ([`Charge::Counted`] with no `rule`), as the store's
    /// contract says. Where the client's body names the category, map it
    /// onto the categories your plans count (and refuse the rest) before
    /// calling: passed through, `"Email"` or `"emails"` is never counted
    /// where `"email"` is limited.
    ///
    /// ```
    /// use keygate::auth::{Authenticator, Target};
    /// use keygate::limit::{MemoryLimiter, PlanSet};
    /// use keygate::manager::{KeyManager, NewKey};
    /// use keygate::quota::MemoryQuotaStore;
    /// use keygate::store::{MemoryKeyStore, Tenant};
    /// use keygate::tower::{Charge, Gate};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
    /// let keys = MemoryKeyStore::new();
    /// let tenant = Tenant::workspace("ws_a".parse()?);
    /// // `free`: 100 notifications a month, `email` and `webhook` counted.
    /// let key = KeyManager::new(keys.clone())
    ///     .create(NewKey::new("n", keygate::format::NH, tenant).plan("free"))
    ///     .await?;
    /// let gate = Gate::builder(Authenticator::new(keys), MemoryLimiter::new(1_000))
    ///     .plans(PlanSet::presets())
    ///     .quotas(MemoryQuotaStore::new())
    ///     .build();
    /// let header = [("x-api-key", key.key().expose_secret().as_bytes())];
    /// let who = gate.authenticator().authenticate(header, &Target::any()).await?;
    ///
    /// let rule = |c: Charge| c.decision().and_then(|d| d.rule.clone());
    /// let counted = gate.charge(&who, "email", 1).await.map_err(|r| r.reason().to_string())?;
    /// assert_eq!(rule(counted).as_deref(), Some("notifications"));
    /// let free = gate.charge(&who, "Email", 1).await.map_err(|r| r.reason().to_string())?;
    /// assert_eq!(rule(free), None); // admitted, counted nowhere
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # })
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Refused`] in the gate's body style ([`Refused::with_style`] changes
    /// it): 429 with the monthly message (or, for a cost above a whole
    /// month's quota, without `Retry-After`), 500 when the plan is not the
    /// gate's, 503 when the quota store fails closed.
    pub async fn charge(
        &self,
        principal: &Principal,
        category: &str,
        cost: u64,
    ) -> Result<Charge, Refused> {
        let plan = self.plan_for(principal, &Route::default())?;
        let mut failed = None;
        let mode = self.0.quota_fail;
        let counted = self.charge_plan(principal, plan, category, cost, mode, &mut failed).await?;
        Ok(match (counted, failed) {
            (Some(q), _) => Charge::Counted(q),
            (None, None) => Charge::Uncounted,
            (None, quota @ Some(_)) => {
                Charge::FailedOpen(FailedOpen { quota, ..FailedOpen::default() })
            }
        })
    }

    /// A [`QuotaRefund`] for what [`charge`](Self::charge) counted: the
    /// handle the layer puts beside a route's [`QuotaDecision`], for
    /// categories that come from the request. Pass the principal and the
    /// category given to `charge` and the [`Charge::decision`] it returned:
    /// the handle gives back under the account that charge counted in (the
    /// principal's plan on this gate) on the gate's clock, and holds its
    /// own copy of the decision (give back through the handle, not also
    /// through [`QuotaStore::refund`], and make one handle per charge: two
    /// made from one decision each give its units back). `None` where the
    /// gate has no quota store or no plan applies (nothing was counted).
    ///
    /// ```
    /// # use keygate::auth::{Authenticator, Target};
    /// # use keygate::limit::{MemoryLimiter, PlanSet};
    /// # use keygate::manager::{KeyManager, NewKey};
    /// # use keygate::quota::MemoryQuotaStore;
    /// # use keygate::store::{MemoryKeyStore, Tenant};
    /// # use keygate::tower::Gate;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
    /// # let keys = MemoryKeyStore::new();
    /// # let tenant = Tenant::workspace("ws_a".parse()?);
    /// # let key = KeyManager::new(keys.clone())
    /// #     .create(NewKey::new("n", keygate::format::NH, tenant).plan("free"))
    /// #     .await?;
    /// # let gate = Gate::builder(Authenticator::new(keys), MemoryLimiter::new(1_000))
    /// #     .plans(PlanSet::presets())
    /// #     .quotas(MemoryQuotaStore::new())
    /// #     .build();
    /// # let header = [("x-api-key", key.key().expose_secret().as_bytes())];
    /// # let who = gate.authenticator().authenticate(header, &Target::any()).await?;
    /// // `free`: 100 notifications a month. The body named `email`.
    /// let charge = gate.charge(&who, "email", 1).await.map_err(|r| r.reason().to_string())?;
    /// let counted = charge.decision().and_then(|d| gate.quota_refund(&who, "email", d));
    /// // The send failed upstream: nothing was delivered, nothing is billed.
    /// if let Some(refund) = counted {
    ///     refund.give_back(u64::MAX).await?;
    ///     assert_eq!(refund.refundable(), 0);
    /// }
    /// let again = gate.charge(&who, "email", 1).await.map_err(|r| r.reason().to_string())?;
    /// assert_eq!(again.decision().map(|d| d.used), Some(1)); // the first was given back
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # })
    /// # }
    /// ```
    #[must_use]
    pub fn quota_refund(
        &self,
        principal: &Principal,
        category: impl Into<Cow<'static, str>>,
        decision: &QuotaDecision,
    ) -> Option<QuotaRefund>
    where
        S: 'static,
        L: 'static,
        Q: 'static,
        C: 'static,
    {
        self.0.quotas.as_ref()?;
        let plan = self.plan_for(principal, &Route::default()).ok()??;
        Some(QuotaRefund::of(self, principal, plan, category.into(), decision))
    }

    /// Counts under `plan`; a store error under `mode` [`FailMode::Open`]
    /// is `Ok(None)`, with the error left in `failed`.
    async fn charge_plan(
        &self,
        principal: &Principal,
        plan: Option<&Plan>,
        category: &str,
        cost: u64,
        mode: FailMode,
        failed: &mut Option<Arc<BackendError>>,
    ) -> Result<Option<QuotaDecision>, Refused> {
        let (Some(quotas), Some(plan)) = (&self.0.quotas, plan) else { return Ok(None) };
        let account = principal.quota_account(plan);
        let now = self.0.auth.clock_ref().now();
        match quotas.check_and_count(&account, plan.monthly(), category, cost, now).await {
            Ok(q) => match q.rejection() {
                None => Ok(Some(q)),
                Some(rejection) => Err(Refused::new(Refusal::Quota(q), rejection, self.0.style)),
            },
            Err(e) => match mode {
                FailMode::Open => {
                    *failed = Some(Arc::new(e));
                    Ok(None)
                }
                FailMode::Closed => Err(Refused::new(
                    Refusal::QuotaBackend(e),
                    Rejection::Unavailable,
                    self.0.style,
                )),
            },
        }
    }

    /// A layer's refusal as its response: with any outer layer's
    /// fail-open trace (from the request's `extensions`), and marked
    /// [`TookOver`] when the layer had taken the charge over. A 401 inside
    /// a layer that admitted the key answers in that layer's style: an
    /// unknown key's 401 comes from there, and the two must look alike.
    fn refused_response<B: From<String>>(
        &self,
        refused: Refused,
        scheme: AuthScheme,
        ext: &Extensions,
    ) -> Response<B> {
        let took_over = refused.took_over;
        let key_refused = matches!(refused.reason(), Refusal::Auth(_));
        let mark = ext.get::<AdmittedBy>();
        let mut refused = match mark {
            Some(m) if key_refused && refused.rejection().status() == 401 => {
                refused.with_style(m.style).with_scheme(m.scheme)
            }
            _ => refused.with_scheme(scheme),
        };
        if mark.is_some_and(|m| m.cookie != 0)
            && matches!(refused.reason(), Refusal::Auth(AuthError::Missing))
        {
            // An outer layer took a cookie this route does not: to the
            // client, a presented credential refused, as an unknown key in
            // that cookie is (a "missing" would tell the two apart).
            refused.rejection = Rejection::InvalidCredentials;
        }
        let superseded = mark
            .filter(|m| took_over && m.gate == self.id())
            .and_then(|m| m.limiter_failed.as_ref());
        let outer = ext.get::<FailedOpen>().cloned();
        let mut res = self.respond(refused.with_outer_trace(outer, superseded));
        if took_over {
            res.extensions_mut().insert(TookOver(self.id(), superseded.cloned()));
        }
        if key_refused && res.status() == ::http::StatusCode::UNAUTHORIZED {
            res.extensions_mut().insert(LayerRefusedKey);
        }
        res
    }

    /// `refused` as a response stamped with the gate's clock.
    #[must_use]
    pub fn respond<B: From<String>>(&self, refused: Refused) -> Response<B> {
        refused.into_response(self.0.auth.clock_ref().now())
    }
}

/// The [`Layer`] for one route (or a group of routes with the same needs).
pub struct GateLayer<S, L, Q = MemoryQuotaStore, C = SystemClock> {
    gate: Gate<S, L, Q, C>,
    route: Arc<Route>,
}

impl<S, L, Q, C> Clone for GateLayer<S, L, Q, C> {
    fn clone(&self) -> Self {
        Self { gate: self.gate.clone(), route: Arc::clone(&self.route) }
    }
}

impl<S, L, Q, C> fmt::Debug for GateLayer<S, L, Q, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GateLayer").field("route", &self.route).finish_non_exhaustive()
    }
}

impl<S: KeyStore, L: LimitStore, Q: QuotaStore, C: Clock> GateLayer<S, L, Q, C> {
    fn with(mut self, f: impl FnOnce(&mut Route)) -> Self {
        let route = Arc::make_mut(&mut self.route);
        f(route);
        route.scheme = self.gate.0.auth.scheme_of(route.formats.as_deref());
        self
    }

    /// Requires `scope` (e.g. `applications:read`), compiled against the
    /// authenticator's scope registry. Called again, requires that scope
    /// too: a key must hold every one.
    ///
    /// # Errors
    ///
    /// [`ScopeError`] when the registry does not know the scope.
    pub fn require(self, scope: &str) -> Result<Self, ScopeError> {
        let required = self.gate.0.auth.scope_registry().required(scope)?;
        Ok(self.with(|r| r.required.push(required)))
    }

    /// Accepts only keys of these formats (by name, e.g. `["sk"]`); a valid
    /// key of another format is a 401. [`checked`](Self::checked) refuses
    /// a name the authenticator lacks.
    #[must_use]
    pub fn formats<I, F>(self, formats: I) -> Self
    where
        I: IntoIterator<Item = F>,
        F: Into<Cow<'static, str>>,
    {
        let formats: Arc<[Cow<'static, str>]> = formats.into_iter().map(Into::into).collect();
        self.with(|r| r.formats = Some(formats))
    }

    /// Counts one unit of `category` against the plan's monthly quotas for
    /// every admitted request, before the handler runs: a request the
    /// handler then fails, or one the client abandons, still counts, unless
    /// the handler gives it back through the request's [`QuotaRefund`].
    /// Count in the handler with [`Gate::charge`] when only completed work
    /// should.
    /// It counts nothing without the gate's
    /// [`quotas`](GateBuilder::quotas) store, or for a category no rule of
    /// the plan counts (spelled otherwise, say: [`checked`](Self::checked)
    /// refuses a category no plan counts). Unlike the rate limit, a
    /// quota is not taken over by nested layers of one gate: each layer
    /// that names a category counts it, so name a category on one layer of
    /// a route (the router's, or the route's), not on both.
    #[must_use]
    pub fn quota(self, category: impl Into<Cow<'static, str>>) -> Self {
        let category = category.into();
        self.with(|r| r.quota = Some(category))
    }

    /// Answers refusals on this route in `style`, but for a 401 inside a
    /// layer that admitted the key (a router-wide layer, say): that one
    /// answers in the outer layer's style, as an unknown key's 401 from
    /// the outer layer does, so the body does not tell a valid key of a
    /// refused format or region from an invalid one.
    #[must_use]
    pub fn body_style(self, style: BodyStyle) -> Self {
        self.with(|r| r.style = Some(style))
    }

    /// The plan of keys that name none, on this route. An unknown plan
    /// answers 500; [`checked`](Self::checked) refuses it at start-up.
    #[must_use]
    pub fn plan(self, plan: impl Into<String>) -> Self {
        let plan = plan.into();
        self.with(|r| r.plan = Some(plan))
    }

    /// Also takes the credential from the cookie `name` when the request has no
    /// credential header (browser sessions such as the portal's; a blank
    /// header, `Bearer ` with nothing after it, is none); the cookie twice is
    /// two credentials, refused, and an empty one is none (nor a second one
    /// beside a live cookie of the name). The cookie takes the formats the
    /// header rules take as Bearer tokens (not `nh` by default), and its
    /// refusals name [`Source::Cookie`]. Set the cookie
    /// `HttpOnly; Secure; SameSite=Strict`, and mind that a cookie rides along
    /// on any request the browser makes to the site: `SameSite` stops other
    /// sites, not a sibling subdomain. For requests that change state, accept
    /// only what no HTML form can send (a JSON body; a cross-origin script then
    /// needs a CORS preflight, which is not to be granted) and refuse
    /// `Sec-Fetch-Site` other than `same-origin` (or `none`, a user's own
    /// navigation), as the reference server's portal API does.
    #[must_use]
    pub fn cookie(self, name: impl Into<Cow<'static, str>>) -> Self {
        let name = name.into();
        let id = cookie_id(&name);
        self.with(|r| r.cookie = Some((name, id)))
    }

    /// Units each request consumes from the rate limit (default 1). A cost
    /// of 0 consumes nothing: the check is a peek, admitted even when
    /// nothing is left (its headers show the remaining count).
    #[must_use]
    pub fn cost(self, cost: u32) -> Self {
        self.with(|r| r.cost = Some(cost))
    }

    /// What a request on this route gets when the limiter's store fails,
    /// in place of the gate's [`GateBuilder::limiter_fail_mode`]: one
    /// route that must stay up (an ingest path) failing open, say, and the
    /// gate's others closed, on one gate.
    ///
    /// Under nested layers of one gate, a check fails as the layer that
    /// makes it says: its route's mode, else the gate's (an outer layer's
    /// is not inherited, as its plan is). An inner layer checks the limit
    /// only where it takes the charge over (under another plan, or with a
    /// cost of its own); otherwise the outer layer's check stands, made
    /// under that layer's mode. The outer layer checks first: where it
    /// fails closed, an inner route's [`FailMode::Open`] is never reached.
    /// Give such a route a layer of its own, outside the router's (or no
    /// router-wide layer). [`Gate::charge`] knows no route: the gate's
    /// mode holds there.
    #[must_use]
    pub fn limiter_fail_mode(self, mode: FailMode) -> Self {
        self.with(|r| r.limit_fail = Some(mode))
    }

    /// What a request on this route gets when the quota store fails, in
    /// place of the gate's [`GateBuilder::quota_fail_mode`]. Each layer
    /// that names a [`quota`](Self::quota) category counts it under its
    /// own route's mode, else the gate's (not an outer layer's), as for
    /// [`limiter_fail_mode`](Self::limiter_fail_mode); [`Gate::charge`]
    /// counts under the gate's.
    #[must_use]
    pub fn quota_fail_mode(self, mode: FailMode) -> Self {
        self.with(|r| r.quota_fail = Some(mode))
    }

    /// Derives the request's [`Target`] (tenant, environment, region), e.g.
    /// the workspace from a path segment; a key that does not reach its tenant
    /// or environment is a 403, and a key of another region is invalid here: a
    /// 401, as an unknown key is. The function's own refusal (say, a malformed
    /// path segment) is answered after authentication and the rate limit, with
    /// their headers. Formats the target names narrow the route's, never widen
    /// them.
    ///
    /// The function reads the request as the layer sees it: under axum's
    /// `Router::nest` the path has the nest's prefix stripped (axum keeps
    /// the whole one in its `OriginalUri` extension), so count segments
    /// from the nested router's own routes. Decode a segment as the
    /// handler's extractor does (axum's `Path` percent-decodes), so the
    /// check and the handler read one value.
    ///
    /// ```
    /// use axum::{Router, body::Body, http::{Request, StatusCode, request::Parts}, routing::get};
    /// use keygate::auth::{Authenticator, Target};
    /// use keygate::http::Rejection;
    /// use keygate::manager::{KeyManager, NewKey};
    /// use keygate::store::{MemoryKeyStore, Tenant, WorkspaceId};
    /// use keygate::tower::Gate;
    /// use tower::ServiceExt;
    ///
    /// /// `/workspaces/{ws}/…`: the key must belong to workspace `{ws}`. A
    /// /// segment no workspace can have is a 404 (after authentication and
    /// /// the rate limit, with their headers).
    /// fn workspace_from_path(parts: &Parts) -> Result<Target, Rejection> {
    ///     let ws = parts.uri.path().split('/').nth(2).ok_or(Rejection::NotFound)?;
    ///     let ws: WorkspaceId = ws.parse().map_err(|_| Rejection::NotFound)?;
    ///     Ok(Target::any().tenant(Tenant::workspace(ws)))
    /// }
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
    /// let keys = MemoryKeyStore::new();
    /// let tenant = Tenant::workspace("ws_a".parse()?);
    /// let key = KeyManager::new(keys.clone()).create(NewKey::new("n", keygate::format::NH, tenant)).await?;
    /// let gate = Gate::builder(Authenticator::new(keys), keygate::limit::MemoryLimiter::new(1_000)).build();
    /// let layer = gate.layer().target(workspace_from_path);
    /// let app: Router = Router::new().route("/workspaces/{ws}/usage", get(|| async { "ok" }).route_layer(layer));
    ///
    /// let get = |path: &str| {
    ///     let req = Request::get(path).header("x-api-key", key.key().expose_secret());
    ///     app.clone().oneshot(req.body(Body::empty()).unwrap())
    /// };
    /// assert_eq!(get("/workspaces/ws_a/usage").await?.status(), StatusCode::OK);
    /// assert_eq!(get("/workspaces/ws_b/usage").await?.status(), StatusCode::FORBIDDEN);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # })
    /// # }
    /// ```
    #[must_use]
    pub fn target(
        self,
        f: impl Fn(&Parts) -> Result<Target, Rejection> + Send + Sync + 'static,
    ) -> Self {
        let f: Arc<TargetFn> = Arc::new(f);
        self.with(|r| r.target = Some(f))
    }

    /// This layer, once every name its route uses resolves: each format
    /// is one of the authenticator's, the plan one of the gate's, and the
    /// quota category counted by some plan of the gate (in its quota
    /// store). Call it last, at start-up, so a misspelled name stops the
    /// service there rather than showing only when requests come.
    ///
    /// # Errors
    ///
    /// The first name that does not resolve, as a [`RouteError`].
    pub fn checked(self) -> Result<Self, RouteError> {
        let (gate, route) = (&self.gate.0, &self.route);
        if let Some(unknown) =
            route.formats.iter().flat_map(|f| f.iter()).find(|f| !gate.auth.knows_format(f))
        {
            return Err(RouteError::UnknownFormat(unknown.to_string()));
        }
        if let Some(plan) = route.plan.as_ref().filter(|p| gate.plans.get(p).is_none()) {
            return Err(RouteError::UnknownPlan(plan.clone()));
        }
        if let Some(category) = &route.quota {
            if gate.quotas.is_none() {
                return Err(RouteError::NoQuotaStore(category.to_string()));
            }
            let counted =
                gate.plans.iter().flat_map(Plan::monthly).any(|rule| rule.counts(category));
            if !counted {
                return Err(RouteError::UncountedCategory(category.to_string()));
            }
        }
        Ok(self)
    }

    /// The route requirements this layer enforces.
    #[must_use]
    pub fn route(&self) -> &Route {
        &self.route
    }
}

impl<Svc, S, L, Q, C> Layer<Svc> for GateLayer<S, L, Q, C> {
    type Service = GateService<Svc, S, L, Q, C>;

    fn layer(&self, inner: Svc) -> Self::Service {
        GateService { inner, gate: self.gate.clone(), route: Arc::clone(&self.route) }
    }
}

/// The [`Service`] a [`GateLayer`] wraps around the route's handler.
pub struct GateService<Svc, S, L, Q = MemoryQuotaStore, C = SystemClock> {
    inner: Svc,
    gate: Gate<S, L, Q, C>,
    route: Arc<Route>,
}

impl<Svc: Clone, S, L, Q, C> Clone for GateService<Svc, S, L, Q, C> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), gate: self.gate.clone(), route: Arc::clone(&self.route) }
    }
}

impl<Svc, S, L, Q, C> fmt::Debug for GateService<Svc, S, L, Q, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GateService").field("route", &self.route).finish_non_exhaustive()
    }
}

/// The future of a [`GateService`]: one allocation per request, kept under
/// a kilobyte over an axum route on the in-memory stores (960 bytes), so it
/// comes from the allocator's per-thread cache of small blocks (glibc's
/// serves blocks up to 1,032 bytes there; a larger one takes its slow path
/// and, freed beside the heap's top, a consolidation: about 510
/// instructions per request more, counted with `scripts/icount.sh`).
/// `tests/allocations.rs` holds it there.
pub type GateFuture<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

impl<Svc, ReqB, ResB, S, L, Q, C> Service<Request<ReqB>> for GateService<Svc, S, L, Q, C>
where
    Svc: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    Svc::Future: Send,
    ReqB: Send + 'static,
    ResB: From<String> + Send + 'static,
    S: KeyStore + 'static,
    L: LimitStore + 'static,
    Q: QuotaStore + 'static,
    C: Clock + 'static,
{
    type Response = Response<ResB>;
    type Error = Svc::Error;
    type Future = GateFuture<Response<ResB>, Svc::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // The clone that was driven to readiness serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let gate = self.gate.clone();
        let route = Arc::clone(&self.route);
        // The target function is synchronous and sees the request head only:
        // run it now, so the future holds its result, not the steps. Its
        // refusal waits until the caller is authenticated and limited.
        // Boxed: most routes have no target function, and the future should
        // not carry an empty `Target` or a `Rejection` for them.
        let (mut req, target) = match route.target.as_ref() {
            None => (req, None),
            Some(f) => {
                let (parts, body) = req.into_parts();
                let target = Box::new(f(&parts));
                (Request::from_parts(parts, body), Some(target))
            }
        };
        // Kept small (one allocation from the allocator's fast path): the
        // request moves in once; only `admit`'s future and then the inner
        // service's (with the rendered headers) are held.
        Box::pin(async move {
            let target = match target.as_deref() {
                None => Ok(&ANY),
                Some(Ok(t)) => Ok(t),
                Some(Err(rejection)) => Err(rejection),
            };
            // Inside another layer of this gate (authentication for the
            // whole router, scopes per route): its admission stands.
            // A cookie credential reaches only routes that take it.
            let (known, outer) = req
                .extensions()
                .get::<AdmittedBy>()
                .and_then(|m| {
                    let p = req.extensions().get::<Principal>()?;
                    let charged = || req.extensions().get::<Refund>().and_then(|r| r.of(&gate));
                    let known = || Known {
                        principal: p.clone(),
                        plan: m.plan,
                        charged: if m.decided { charged() } else { None },
                    };
                    m.vouches(gate.id(), p, &route).then(|| (known(), (m.cookie, m.decided)))
                })
                .unzip();
            let (outer_cookie, outer_decided) = outer.unzip();
            // This route's challenge for this target, settled before the
            // admission: the target itself is not held across it.
            let scheme = gate.scheme(&route, target.ok());
            let admitted = match gate.admit_to(&route, req.headers(), target, known).await {
                Ok(a) => a,
                Err(refused) => {
                    return Ok(gate.refused_response(refused, scheme, req.extensions()));
                }
            };
            // Moved into a function, not borrowed here: the admission keeps
            // no room in this future beside the inner service's (see
            // `GateFuture`).
            let (took_over, failed_open, superseded, headers) =
                admitted.hand_on(&mut req, &gate, &route, (outer_cookie, outer_decided), scheme);
            // The credential goes on to the handler (and any layer inside):
            // marked sensitive, so a `Debug` of the headers shows no key.
            for (name, value) in req.headers_mut().iter_mut() {
                if name == ::http::header::AUTHORIZATION
                    || name == crate::auth::X_API_KEY
                    || name == ::http::header::COOKIE
                {
                    value.set_sensitive(true);
                }
            }
            let mut res = inner.call(req).await?;
            // One of each family: an inner layer's, or the handler's, even in
            // part, stand (no field beside another limit's). None
            // where an inner layer charged the request itself (this layer's
            // charge was given back), and none on an inner layer's 401 (a
            // key of another region or format there): an unknown key's 401
            // has none, and the two must look alike.
            let inside = res.extensions().get::<TookOver>().filter(|t| t.0 == gate.id());
            let took_over_inside = inside.is_some();
            // The limiter failure of this gate that the take-over inside
            // checked again (this layer's own, or none of its).
            let superseded_inside = inside.and_then(|t| t.1.clone());
            if let Some(headers) = headers
                && res.extensions().get::<LayerRefusedKey>().is_none()
                && !took_over_inside
            {
                headers.fill_in(res.headers_mut());
            }
            // After this layer's own headers: those of the layers outside
            // it are spent.
            if took_over {
                res.extensions_mut().insert(TookOver(gate.id(), superseded));
            } else if took_over_inside && outer_cookie.is_none() {
                // The layer inside took over this layer's fresh charge, not
                // one of a layer further out (this one did not vouch): the
                // take-over stops here.
                res.extensions_mut().remove::<TookOver>();
            }
            if let Some(f) = failed_open {
                // Beside, not over, what an inner layer left; this layer's
                // limiter failure no longer holds where a layer inside
                // took over from this very layer and checked the limit
                // again (not where it took over from another layer).
                let inner = res.extensions_mut().remove::<FailedOpen>();
                if let Some(f) = FailedOpen::beside(inner, Some(f), superseded_inside.as_ref()) {
                    res.extensions_mut().insert(f);
                }
            }
            Ok(res)
        })
    }
}

impl Admitted {
    /// Hands the admission on to the request (the principal, the decision
    /// and their handles in its extensions, beside this layer's mark) and
    /// returns what the response needs: whether this layer took over an
    /// outer layer's charge, the failures it passed open, the outer
    /// limiter failure it superseded, and the headers to add.
    fn hand_on<ReqB, S, L, Q, C>(
        self,
        req: &mut Request<ReqB>,
        gate: &Gate<S, L, Q, C>,
        route: &Route,
        (outer_cookie, outer_decided): (Option<u64>, Option<bool>),
        scheme: AuthScheme,
    ) -> (bool, Option<FailedOpen>, Option<Arc<BackendError>>, Option<RenderedHeaders>)
    where
        S: KeyStore,
        L: LimitStore,
        Q: QuotaStore,
        C: Clock,
    {
        let took_over = self.took_over;
        if took_over && outer_decided == Some(true) {
            // Given back: the outer layer's decision is spent (a
            // decision of another gate's stays), and so is the refund
            // that goes with it.
            req.extensions_mut().remove::<Decision>();
            if req.extensions().get::<Refund>().is_some_and(|r| r.0.gate() == gate.id()) {
                req.extensions_mut().remove::<Refund>();
            }
        }
        let failed_open = self.failed_open.clone();
        // The outer mark, still in place: read here, not held across
        // the admission. The outermost admitting layer's style and
        // challenge, whatever its gate; and this gate's standing limiter
        // failure, where it vouched (this gate's mark).
        let outer_mark = req.extensions().get::<AdmittedBy>();
        let outer_answer = outer_mark.map(|m| (m.style, m.scheme));
        let outer_failed = outer_cookie.and(outer_mark).and_then(|m| m.limiter_failed.clone());
        // This gate's standing failure now: this layer's own, or (where
        // it did not check the limit again) the outer layer's.
        let own_failure = failed_open.as_ref().and_then(|f| f.limiter.clone());
        let (superseded, carried) =
            if took_over { (outer_failed, None) } else { (None, outer_failed) };
        let limiter_failed = own_failure.or(carried);
        let mark = AdmittedBy {
            gate: gate.id(),
            principal: self.principal.handle(),
            plan: self.plan,
            cookie: outer_cookie.unwrap_or(self.cookie),
            decided: self.decision.is_some() || (outer_decided == Some(true) && !self.took_over),
            limiter_failed,
            style: outer_answer.map_or_else(|| gate.style(route), |(s, _)| s),
            scheme: outer_answer.map_or(scheme, |(_, s)| s),
        };
        let headers = self.into_extensions(req.extensions_mut(), gate, superseded.as_ref());
        req.extensions_mut().insert(mark);
        (took_over, failed_open, superseded, headers)
    }

    /// Moves the principal and the decisions into request `extensions`,
    /// each beside its handle ([`Refund`], [`QuotaRefund`]); returns the
    /// decision's headers (in the gate's set) for the response.
    fn into_extensions<S, L, Q, C>(
        self,
        extensions: &mut Extensions,
        gate: &Gate<S, L, Q, C>,
        superseded: Option<&Arc<BackendError>>,
    ) -> Option<RenderedHeaders> {
        if let Some(q) = self.quota {
            // An outer layer's handle must never stand beside this layer's
            // decision (`admit_to` makes one for every quota decision).
            match self.quota_refund {
                Some(refund) => extensions.insert(refund),
                None => extensions.remove::<QuotaRefund>(),
            };
            extensions.insert(q);
        }
        // The outer layers' trace stays beside this one's, but for the
        // limiter failure of this gate's that this layer checked again.
        let outer = extensions.remove::<FailedOpen>();
        if let Some(f) = FailedOpen::beside(self.failed_open, outer, superseded) {
            extensions.insert(f);
        }
        // A decision goes in with its refund (`admit_to` makes one for
        // every decision), never beside an outer layer's.
        let (Some(decision), Some(refund)) = (self.decision, self.refund) else {
            extensions.insert(self.principal);
            return None;
        };
        // Rendered before the decision moves into the extensions.
        let headers = decision.rendered_headers(gate.0.headers);
        extensions.insert(refund);
        extensions.insert(self.principal);
        extensions.insert(decision);
        Some(headers)
    }
}

/// The address of `plan` (in its gate's set; 0 for none): the record of it
/// that marks and refunds keep ([`Gate::plan_at`] finds it again).
fn plan_addr(plan: Option<&Plan>) -> usize {
    plan.map_or(0, |p| std::ptr::from_ref(p).addr())
}

/// The target of routes without a target function.
static ANY: Target = Target::any();

/// In a response's extensions: a layer refused the key (a 401, as for an
/// unknown key), so the layers outside it add no rate-limit headers,
/// whatever they charged: the 401 must look like any other. A handler's
/// own 401 (through [`Gate::respond`] or not) keeps them.
#[derive(Debug, Clone, Copy)]
struct LayerRefusedKey;

/// In a response's extensions: a layer nested inside charged the request
/// itself and gave the outer layers' charge back, so their decisions are
/// spent and their headers are not added. Names the gate (its address),
/// whose layers alone it concerns; with the limiter failure of that gate
/// the take-over checked again, if any (the error its failing layer
/// recorded), which that layer then drops from its trace.
#[derive(Debug, Clone)]
struct TookOver(usize, Option<Arc<BackendError>>);

/// What an outer layer of the same gate settled, for the layer inside:
/// the principal it admitted (not authenticated again, but held to the
/// inner route's formats and region), the plan it applied (its address in
/// the gate's set; 0 for none) and its limiter charge (given back when the
/// inner layer charges instead: under another plan, or for a cost of the
/// inner route's own).
struct Known<S, L, Q, C> {
    principal: Principal,
    plan: usize,
    /// The outer layer's charge, through its [`Refund`] (one pointer: the
    /// request's future holds it).
    charged: Option<Arc<Charged<S, L, Q, C>>>,
}

/// How a request was admitted, for a layer of the same gate nested inside
/// to reuse: by which gate (its address, while it lives), for which
/// principal (the very value it put in the extensions, not one a layer in
/// between may have swapped in), charged under which plan (its address in
/// the gate's set; 0 for none), and from which cookie (a hash of its name;
/// 0 for a credential header).
#[derive(Debug, Clone)]
struct AdmittedBy {
    gate: usize,
    principal: crate::auth::PrincipalHandle,
    plan: usize,
    cookie: u64,
    /// Whether the request's `Decision` is this gate's (a layer of it
    /// charged, and no layer inside gave that back): not another gate's,
    /// for a layer inside to give back.
    decided: bool,
    /// The style of the outermost layer that admitted the request (of
    /// any gate): where an unknown key's 401 comes from, so a layer
    /// inside answers its own 401s alike.
    style: BodyStyle,
    /// That layer's challenge, likewise.
    scheme: AuthScheme,
    /// This gate's limiter failure standing for the request (the failing
    /// layer's error, shared with the trace): the one a layer of the gate
    /// inside drops from the trace when it checks the limit again; another
    /// gate's failure is not this gate's to drop.
    limiter_failed: Option<Arc<BackendError>>,
}

impl AdmittedBy {
    /// Whether a layer of `gate` on `route` may take this admission for
    /// `principal`: the same gate and principal, and a cookie credential
    /// only where the route takes that very cookie.
    fn vouches(&self, gate: usize, principal: &Principal, route: &Route) -> bool {
        self.gate == gate
            && principal.is(&self.principal)
            && (self.cookie == 0 || route.cookie.as_ref().map(|(_, id)| *id) == Some(self.cookie))
    }
}

/// A cookie name's identity in an [`AdmittedBy`] (never 0).
fn cookie_id(name: &str) -> u64 {
    std::hash::BuildHasher::hash_one(
        &std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default(),
        name,
    ) | 1
}

/// What authentication checks for `route` and `target`: who is calling
/// (format, secret, revocation, expiry, region). Whether the key reaches
/// the tenant and environment, the deployment's environment and the
/// account's status are checked after the rate limit, so that those 403s
/// carry the limit headers too.
fn identity(route: &Route, target: Result<&Target, &Rejection>) -> Target {
    Target {
        tenant: None,
        environment: None,
        region: target.ok().and_then(|t| t.region),
        formats: narrowest(target.ok().and_then(|t| t.formats.as_ref()), route.formats.as_ref()),
        defer_standing: true,
    }
}

/// The formats both lists accept (either alone when the other is unset): a
/// target function narrows a route's formats, never widens them.
fn narrowest(
    target: Option<&Arc<[Cow<'static, str>]>>,
    route: Option<&Arc<[Cow<'static, str>]>>,
) -> Option<Arc<[Cow<'static, str>]>> {
    match (target, route) {
        (Some(t), Some(r)) if !Arc::ptr_eq(t, r) => {
            Some(t.iter().filter(|f| r.contains(f)).cloned().collect())
        }
        (t, r) => t.or(r).cloned(),
    }
}

/// The credential in the route's cookie, if it takes one, for a request
/// with no credential header (a blank one is none: see
/// [`HeaderRules::extract`]).
///
/// [`HeaderRules::extract`]: crate::auth::HeaderRules::extract
fn cookie_credential<'h, S: KeyStore, C: Clock>(
    auth: &Authenticator<S, C>,
    route: &Route,
    headers: &'h HeaderMap,
) -> Result<Option<&'h str>, CredentialError> {
    match &route.cookie {
        Some((name, _)) if !auth.has_credential_header(headers) => cookie(headers, name),
        _ => Ok(None),
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
///
/// # Errors
///
/// [`CredentialError::Conflicting`] when the cookie comes twice (a sibling
/// domain or a narrower path can set one of the same name: which the
/// browser sends first is not the site's choice), whatever its bytes;
/// [`CredentialError::InvalidBytes`] when its value holds bytes a
/// credential header may not (a presented credential, not a missing one).
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h str>, CredentialError> {
    // By bytes: one cookie of the site with non-ASCII bytes (another app's,
    // a sibling subdomain's) must not hide this one in the same header.
    let mut found = headers
        .get_all(::http::header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .filter_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            let (n, v) = (&pair[..eq], &pair[eq + 1..]);
            // RFC 6265 allows a value in double quotes.
            let v = v.strip_prefix(b"\"").and_then(|v| v.strip_suffix(b"\"")).unwrap_or(v);
            (n == name.as_bytes()).then_some(v)
        })
        // An empty value (a cleared session cookie) is no credential, as an
        // empty credential header is: a missing key, not a malformed one,
        // and no second credential beside a live cookie of the name.
        .filter(|v| !v.is_empty());
    let first = found.next();
    if found.next().is_some() {
        return Err(CredentialError::Conflicting);
    }
    let Some(value) = first else { return Ok(None) };
    if !crate::auth::visible_ascii(value) {
        return Err(CredentialError::InvalidBytes);
    }
    // Checked ASCII above, so this cannot fail.
    std::str::from_utf8(value).map(Some).map_err(|_| CredentialError::InvalidBytes)
}
