//! keygate in a host without tower (actix-web, rocket, a gRPC gateway): the
//! per-request line the `tower::Gate` runs, built from public API only.
//!
//! The "framework" is a plain function from method, path, header list and
//! body to status, header list and body. Read `Host::gated` top to bottom
//! as the recipe: credentials → `Authenticator` (standing deferred) → rate
//! limit under the key's plan (`Principal::limit_key`, the gate's limiter
//! key) → target (tenant) and standing (`Authenticator::check_standing`) →
//! scope → monthly quota (`Principal::quota_account`, the gate's account)
//! → handler, with the decision's rate-limit headers filled in
//! (`Decision::fill_in`) on every answer made after the limit, 2xx and
//! refusals alike, and refusals rendered by `http::Rejection` in the
//! route's body style and challenge scheme.
//!
//! As under the gate, units are spent when the limiter admits: a refusal
//! after it, or a failed handler, still costs them, unless the handler
//! gives them back (`LimitStore::refund`, under the key and plan it was
//! charged under), and the monthly count likewise (`QuotaStore::refund`,
//! under the account it was counted in).

use std::time::Duration;

#[path = "support/failing.rs"]
mod failing;
use failing::Failing;

use keygate::auth::{Authenticator, Principal, Target};
use keygate::backend::FailMode;
use keygate::clock::{Clock, FakeClock};
use keygate::format::{FormatSet, NH, NHM, SK};
use keygate::http::{AuthScheme, BodyStyle, Rejection, Response};
use keygate::limit::{CheckMode, Decision, HeaderSet, LimitStore, MemoryLimiter, Plan, PlanSet};
use keygate::manager::{KeyManager, NewKey, TokenExpiry};
use keygate::portal::{MemoryPortalStore, Portal, SessionRequest};
use keygate::quota::{MemoryQuotaStore, QuotaDecision, QuotaStore};
use keygate::store::{MemoryKeyStore, Tenant, WorkspaceId};

/// What the framework hands the host and gets back.
type Fields = Vec<(String, String)>;

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Fields,
    body: String,
}

impl Reply {
    fn ok(status: u16, body: impl Into<String>) -> Self {
        Self { status, headers: Vec::new(), body: body.into() }
    }

    /// Every value of header `name` (case-insensitive).
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.all(name).first().copied()
    }
}

impl From<Response> for Reply {
    fn from(r: Response) -> Self {
        Self {
            status: r.status,
            headers: r.headers.into_iter().map(|(n, v)| (n.to_owned(), v)).collect(),
            body: r.body,
        }
    }
}

/// One route's rules: what the gate's per-route layer would hold.
struct Route {
    formats: &'static [&'static str],
    style: BodyStyle,
    scope: Option<&'static str>,
    quota: Option<&'static str>,
}

const APPS: Route = Route {
    formats: &["sk"],
    style: BodyStyle::Nested,
    scope: Some("applications:read"),
    quota: None,
};

const NOTIFY: Route =
    Route { formats: &["nh"], style: BodyStyle::Envelope, scope: None, quota: Some("webhook") };

const PORTAL_API: Route = Route {
    formats: &["kgpt"],
    style: BodyStyle::Nested,
    scope: Some("endpoints:read"),
    quota: None,
};

const PORTAL_DELETE: Route = Route { scope: Some("endpoints:delete"), ..PORTAL_API };

const MANAGEMENT: Route =
    Route { formats: &["nhm"], style: BodyStyle::Nested, scope: None, quota: None };

/// Any `LimitStore`: in memory here, `keygate::redis::RedisLimiter` across
/// instances.
struct Host<L = MemoryLimiter<String, FakeClock>> {
    clock: FakeClock,
    auth: Authenticator<MemoryKeyStore, FakeClock>,
    manager: KeyManager<MemoryKeyStore, FakeClock>,
    limiter: L,
    plans: PlanSet,
    default_plan: &'static str,
    limiter_fails: FailMode,
    quotas: MemoryQuotaStore,
    portal: Portal<MemoryPortalStore, MemoryKeyStore, FakeClock>,
    workspace: WorkspaceId,
}

/// What passes the gate: the principal, the limiter's decision (with what
/// a refund needs: the limiter key and the plan's policies) and the quota
/// count (with its account and category).
struct Admitted {
    principal: Principal,
    decision: Option<Decision>,
    limiter_key: String,
    plan: Plan,
    counted: Option<(QuotaDecision, String, &'static str)>,
}

impl Host {
    fn new() -> Self {
        let clock = FakeClock::new("2026-01-09T12:00:00Z".parse().unwrap());
        Host::with_limiter(MemoryLimiter::with_clock(10_000, clock.clone()), clock)
    }

    /// A new `sk` key of `project` in the host's workspace with `scope`:
    /// its plaintext.
    async fn sk(&self, name: &str, project: &str, scope: &str) -> String {
        let tenant =
            Tenant::workspace(self.workspace.clone()).with_project(project.parse().unwrap());
        let new = NewKey::new(name, SK, tenant).scopes(&[scope]).unwrap();
        self.manager.create(new).await.unwrap().key().expose_secret().to_owned()
    }
}

impl<L: LimitStore> Host<L> {
    /// A host over `limiter`, on `clock`; a limiter that fails refuses
    /// (503) unless `limiter_fails` says `Open`.
    fn with_limiter(limiter: L, clock: FakeClock) -> Self {
        let store = MemoryKeyStore::new();
        let plans = PlanSet::presets();
        // The portal's access tokens are keys too: the authenticator and the
        // manager take `portal::formats()` in place of the presets.
        let formats: FormatSet = keygate::portal::formats();
        // A deactivated account's keys are a 403 "Account is inactive".
        let auth = Authenticator::new(store.clone())
            .formats(formats.clone())
            .account_status(|t: &Tenant| t.project.as_ref().is_none_or(|p| p.as_str() != "closed"))
            .clock(clock.clone());
        let manager =
            KeyManager::new(store.clone()).formats(formats).plans(&plans).clock(clock.clone());
        let portal = Portal::new(MemoryPortalStore::with_clock(clock.clone()), store)
            .url_template("https://portal.example.com/?code={code}")
            .clock(clock.clone());
        Self {
            limiter,
            quotas: MemoryQuotaStore::with_clock(clock.clone()),
            clock,
            auth,
            manager,
            plans,
            default_plan: "hobby",
            limiter_fails: FailMode::Closed,
            portal,
            workspace: "ws_demo".parse().unwrap(),
        }
    }

    /// The framework's entry point.
    async fn handle(&self, method: &str, target: &str, headers: &Fields, body: &str) -> Reply {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (method, segments.as_slice()) {
            ("GET", ["v1", "projects", project, "applications"]) => {
                let Ok(project) = project.parse() else { return Reply::ok(404, "") };
                let tenant = Tenant::workspace(self.workspace.clone()).with_project(project);
                self.gated(&APPS, Target::any().tenant(tenant), headers, async |_| {
                    Reply::ok(200, r#"{"data":[]}"#)
                })
                .await
            }
            ("POST", ["v1", "notifications"]) => {
                let fail = body.contains("\"fail\"");
                self.gated(&NOTIFY, Target::any(), headers, async move |admitted: Admitted| {
                    if fail {
                        // The upstream is down before any work: give the
                        // units back, under the key and plan they were
                        // charged under, and the notification uncounted.
                        if let Some((mut q, account, category)) = admitted.counted {
                            let now = self.clock.now();
                            let _ = self.quotas.refund(&account, category, 1, &mut q, now).await;
                        }
                        if let Some(mut decision) = admitted.decision {
                            let _ = LimitStore::refund(
                                &self.limiter,
                                &admitted.limiter_key,
                                admitted.plan.rate(),
                                u32::MAX,
                                &mut decision,
                            )
                            .await;
                        }
                        return Reply::ok(503, r#"{"success":false}"#);
                    }
                    Reply::ok(202, r#"{"success":true}"#)
                })
                .await
            }
            ("POST", ["management", "applications", app, "portal"]) => {
                let Ok(app) = app.parse() else { return Reply::ok(404, "") };
                let request = match SessionRequest::from_json(body.as_bytes()) {
                    Ok(r) => r,
                    Err(e) => return self.refuse(&MANAGEMENT, &e.rejection(), None),
                };
                let target = Target::any().tenant(Tenant::workspace(self.workspace.clone()));
                self.gated(&MANAGEMENT, target, headers, async move |admitted: Admitted| match self
                    .portal
                    .create_session(&admitted.principal, &self.workspace, &app, request)
                    .await
                {
                    Ok(minted) => Reply::ok(201, minted.to_json().to_string()),
                    Err(e) => self.refuse(&MANAGEMENT, &e.rejection(), None),
                })
                .await
            }
            ("GET", ["portal"]) => {
                // Links sent by mail or chat: redeem on a POST from the
                // link's page instead (see `Portal::redeem`).
                let code = query.strip_prefix("code=").unwrap_or("");
                match self.portal.redeem(code).await {
                    Ok(token) => Reply::ok(200, token.token().expose_secret().to_owned()),
                    Err(e) => self.refuse(&PORTAL_API, &e.rejection(), None),
                }
            }
            ("DELETE", ["portal", "api", "endpoints", _]) => {
                self.gated(&PORTAL_DELETE, Target::any(), headers, async |_| Reply::ok(204, ""))
                    .await
            }
            ("GET", ["portal", "api", "endpoints"]) => {
                self.gated(&PORTAL_API, Target::any(), headers, async |_| {
                    Reply::ok(200, r#"{"data":[]}"#)
                })
                .await
            }
            _ => Reply::ok(404, ""),
        }
    }

    /// The gate: authenticate, limit, check target and scope, count the
    /// quota, run the handler; the decision's headers on every answer.
    async fn gated(
        &self,
        route: &Route,
        target: Target,
        headers: &Fields,
        handler: impl AsyncFnOnce(Admitted) -> Reply,
    ) -> Reply {
        // 1. Credentials. Formats are checked right after parsing (before
        // any store lookup); the tenant, the deployment's environment and
        // the account's status come after the limit (`defer_standing`, then
        // `check_standing`), so that their 403s carry the rate-limit
        // headers as the gate's do.
        let pairs = headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes()));
        let identity = Target::any().formats(route.formats.iter().copied()).defer_standing();
        let principal = match self.auth.authenticate(pairs, &identity).await {
            Ok(p) => p,
            Err(e) => return self.refuse(route, &e.rejection(), None),
        };
        // 2. The key's plan (or the default), then the rate limit under it,
        // keyed as the gate keys it (`limit_key`: the record id, or
        // `{id}#{plan}` under a plan a route gives keys that name none), so
        // this host can share a limiter (Redis, say) with a tower service.
        let plan_name = principal.plan().unwrap_or(self.default_plan);
        let Some(plan) = self.plans.get(plan_name).cloned() else {
            return self.refuse(route, &Rejection::Misconfigured, None);
        };
        let limiter_key = principal.limit_key(&plan, Some(self.default_plan)).into_owned();
        // Through the trait: `MemoryLimiter`'s own `check` (synchronous,
        // three arguments, a `CapacityError`) would shadow it.
        let decision = match LimitStore::check(
            &self.limiter,
            &limiter_key,
            plan.rate(),
            1,
            CheckMode::Consume,
        )
        .await
        {
            Ok(d) => Some(d),
            Err(_) if matches!(self.limiter_fails, FailMode::Open) => None,
            Err(_) => return self.refuse(route, &Rejection::Unavailable, None),
        };
        if let Some(rejection) = decision.as_ref().and_then(Decision::rejection) {
            return self.refuse(route, &rejection, decision.as_ref());
        }
        // 3. Target (tenant, environment), standing, then scope.
        if let Err(e) = target.check(&principal).and_then(|()| self.auth.check_standing(&principal))
        {
            return self.refuse(route, &e.rejection(), decision.as_ref());
        }
        if let Some(scope) = route.scope {
            let need = self.auth.scope_registry().required(scope).expect("route scope");
            if let Err(missing) = principal.require(&need) {
                return self.refuse(route, &missing.rejection(), decision.as_ref());
            }
        }
        // 4. The route's monthly quota, per workspace, environment and
        // plan, under the gate's account name (`quota_account`).
        let mut counted = None;
        if let Some(category) = route.quota {
            let account = principal.quota_account(&plan);
            match self
                .quotas
                .check_and_count(&account, plan.monthly(), category, 1, self.clock.now())
                .await
            {
                Ok(q) => {
                    if let Some(rejection) = q.rejection() {
                        return self.refuse(route, &rejection, decision.as_ref());
                    }
                    counted = Some((q, account, category));
                }
                Err(_) => return self.refuse(route, &Rejection::Unavailable, decision.as_ref()),
            }
        }
        // 5. The handler, then the rate-limit headers on its answer.
        let kept = decision.clone();
        let mut reply = handler(Admitted { principal, decision, limiter_key, plan, counted }).await;
        if let Some(d) = kept {
            // A handler's own rate-limit fields (of another limit) stand.
            d.fill_in(HeaderSet::default(), &mut reply.headers);
        }
        reply
    }

    /// A refusal in the route's body style and challenge scheme, with the
    /// decision's rate-limit headers when the limiter had been asked.
    fn refuse(&self, route: &Route, rejection: &Rejection, decision: Option<&Decision>) -> Reply {
        // The challenge the route's formats call for (`ApiKey header=…` on an
        // `X-API-Key` route), as the tower layer answers.
        let scheme = self.auth.auth_scheme_for(route.formats);
        let mut response = rejection.to_response_in(route.style, scheme, self.clock.now());
        // `fill_in`, not an append of `decision.headers(…)`: a 429's
        // rejection already carries `Retry-After`, and a second one (the
        // decision's) would make two.
        if let Some(d) = decision {
            d.fill_in(HeaderSet::default(), &mut response.headers);
        }
        response.into()
    }
}

fn bearer(key: &str) -> Fields {
    vec![("Authorization".to_owned(), format!("Bearer {key}"))]
}

fn api_key(key: &str) -> Fields {
    vec![("X-API-Key".to_owned(), key.to_owned())]
}

fn now_unix(clock: &FakeClock) -> i64 {
    clock.now().as_second()
}

#[tokio::test]
async fn a_scoped_key_passes_and_every_answer_after_the_limit_carries_its_headers() {
    let host = Host::new();
    let reader = host.sk("reader", "shop", "applications:read").await;
    let writer = host.sk("writer", "shop", "webhooks:write").await;

    let ok = host.handle("GET", "/v1/projects/shop/applications", &bearer(&reader), "").await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.header("x-ratelimit-limit"), Some("3"));
    assert_eq!(ok.header("x-ratelimit-remaining"), Some("2"));

    // Another project: 403, after the limit, with its headers.
    let other = host.handle("GET", "/v1/projects/blog/applications", &bearer(&reader), "").await;
    assert_eq!(other.status, 403, "{other:?}");
    assert_eq!(other.header("x-ratelimit-remaining"), Some("1"));

    // A key without the scope: 403 naming it, with the headers.
    let denied = host.handle("GET", "/v1/projects/shop/applications", &bearer(&writer), "").await;
    assert_eq!(denied.status, 403);
    assert!(denied.header("www-authenticate").unwrap().contains("applications:read"));
    assert_eq!(denied.header("x-ratelimit-remaining"), Some("2"));

    // No key, or a wrong one: 401 with the Bearer challenge, no limit asked.
    let missing = host.handle("GET", "/v1/projects/shop/applications", &Vec::new(), "").await;
    assert_eq!(missing.status, 401);
    assert!(missing.header("x-ratelimit-limit").is_none());
    assert!(missing.body.contains("unauthorized"));
}

#[tokio::test]
async fn over_the_limit_is_a_429_with_one_retry_after_and_the_limit_headers() {
    let host = Host::new();
    let key = host
        .manager
        .create(
            NewKey::new("reader", SK, Tenant::workspace(host.workspace.clone()))
                .scopes(&["applications:read"])
                .unwrap(),
        )
        .await
        .unwrap();
    let headers = bearer(key.key().expose_secret());
    for _ in 0..3 {
        let r = host.handle("GET", "/v1/projects/shop/applications", &headers, "").await;
        assert_eq!(r.status, 200);
    }
    let limited = host.handle("GET", "/v1/projects/shop/applications", &headers, "").await;
    assert_eq!(limited.status, 429, "{limited:?}");
    assert_eq!(limited.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(
        limited.header("x-ratelimit-reset"),
        Some(&*(now_unix(&host.clock) + 1).to_string())
    );
    assert_eq!(limited.all("retry-after"), ["1"], "one Retry-After: {limited:?}");
    assert!(limited.body.contains("rate_limit_exceeded"), "{}", limited.body);

    // The next second admits again.
    host.clock.advance(Duration::from_secs(1));
    let again = host.handle("GET", "/v1/projects/shop/applications", &headers, "").await;
    assert_eq!(again.status, 200);
}

#[tokio::test]
async fn the_monthly_quota_refuses_with_the_seed_message_and_a_refund_gives_units_back() {
    let host = Host::new();
    let key = host
        .manager
        .create(NewKey::new("notify", NH, Tenant::workspace(host.workspace.clone())).plan("free"))
        .await
        .unwrap();
    let headers = api_key(key.key().expose_secret());

    // A failed request gives its rate-limit unit back: the free plan's 5 a
    // minute are all still there afterwards.
    let failed = host.handle("POST", "/v1/notifications", &headers, r#"{"fail":true}"#).await;
    assert_eq!(failed.status, 503);
    assert_eq!(failed.header("x-ratelimit-remaining"), Some("4"), "the check as made");
    let probe = host
        .limiter
        .peek(key.record().id.as_str(), host.plans.get("free").unwrap().rate(), 1)
        .unwrap();
    assert_eq!(probe.remaining(), 4, "peek reports what is left after it would fit: 5 - 1");

    // 100 notifications a month, the failed one not among them: counted
    // before the handler ran, it was given back. Spread over time so the
    // rate limit admits.
    for i in 1..=100 {
        host.clock.advance(Duration::from_secs(13));
        let r = host.handle("POST", "/v1/notifications", &headers, "{}").await;
        assert_eq!(r.status, 202, "notification {i}: {r:?}");
    }
    host.clock.advance(Duration::from_secs(13));
    let over = host.handle("POST", "/v1/notifications", &headers, "{}").await;
    assert_eq!(over.status, 429);
    assert!(
        over.body.contains("Monthly usage limit exceeded (100/100). Upgrade your plan or wait for reset on 2/1/2026."),
        "{}",
        over.body
    );
    assert!(over.body.contains("\"success\":false"));
    assert!(
        over.header("x-ratelimit-limit").is_some(),
        "the quota 429 carries the rate-limit headers"
    );
}

#[tokio::test]
async fn a_portal_link_mints_redeems_once_and_its_token_reads_endpoints() {
    let host = Host::new();
    let token = host
        .manager
        .create(
            NewKey::new("ops", NHM, Tenant::workspace(host.workspace.clone()))
                .token_expiry(TokenExpiry::Never)
                .scopes(&["*"])
                .unwrap(),
        )
        .await
        .unwrap();
    let minted = host
        .handle(
            "POST",
            "/management/applications/app_shop/portal",
            &bearer(token.key().expose_secret()),
            r#"{"role":"viewer"}"#,
        )
        .await;
    assert_eq!(minted.status, 201, "{minted:?}");
    assert!(minted.header("x-ratelimit-limit").is_some());
    let body: serde_json::Value = serde_json::from_str(&minted.body).unwrap();
    let code = body["code"].as_str().unwrap().to_owned();

    let link = format!("/portal?code={code}");
    let first = host.handle("GET", &link, &Vec::new(), "").await;
    assert_eq!(first.status, 200);
    let second = host.handle("GET", &link, &Vec::new(), "").await;
    assert_eq!(second.status, 410);
    assert!(second.body.contains("already been used"), "{}", second.body);

    let access = first.body;
    let read = host.handle("GET", "/portal/api/endpoints", &bearer(&access), "").await;
    assert_eq!(read.status, 200, "{read:?}");
    // A viewer reads, and may not delete: a 403 naming the scope.
    let delete = host.handle("DELETE", "/portal/api/endpoints/ep_1", &bearer(&access), "").await;
    assert_eq!(delete.status, 403, "{delete:?}");
    assert!(delete.header("www-authenticate").unwrap().contains("endpoints:delete"));
    assert!(delete.header("x-ratelimit-limit").is_some());
}

#[tokio::test]
async fn an_inactive_account_is_a_403_after_the_limit_with_its_headers() {
    let host = Host::new();
    let key = host.sk("old", "closed", "applications:read").await;
    let r = host.handle("GET", "/v1/projects/closed/applications", &bearer(&key), "").await;
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("inactive"), "{}", r.body);
    assert_eq!(r.header("x-ratelimit-remaining"), Some("2"), "{r:?}");
}

#[tokio::test]
async fn a_limiter_outage_is_a_503_unless_the_host_chose_to_fail_open() {
    // A limiter whose backend is down (Redis gone, say): every check and
    // refund fails.
    let clock = FakeClock::at_2026();
    let down = Failing::new(MemoryLimiter::with_clock(10_000, clock.clone()), |_, _| true)
        .refunds_failing(true);
    let mut host = Host::with_limiter(down, clock);
    let key = host
        .manager
        .create(
            NewKey::new("reader", SK, Tenant::workspace(host.workspace.clone()))
                .scopes(&["applications:read"])
                .unwrap(),
        )
        .await
        .unwrap();
    let headers = bearer(key.key().expose_secret());
    let closed = host.handle("GET", "/v1/projects/shop/applications", &headers, "").await;
    assert_eq!(closed.status, 503, "{closed:?}");
    assert!(closed.header("x-ratelimit-limit").is_none(), "no decision, no limit to report");
    // Open: the request passes, unlimited and without headers; the host
    // logs the outage (the gate leaves a `FailedOpen` for its logs).
    host.limiter_fails = FailMode::Open;
    let open = host.handle("GET", "/v1/projects/shop/applications", &headers, "").await;
    assert_eq!(open.status, 200, "{open:?}");
    assert!(open.header("x-ratelimit-limit").is_none());
}

/// The challenge of a 401 follows where the route's formats travel: an
/// `nh` route reads `X-API-Key`, so its challenge names that header, not
/// Bearer (what `Rejection::to_response` defaults to).
#[test]
fn a_routes_challenge_is_the_authenticators_for_its_formats() {
    let host = Host::new();
    assert_eq!(host.auth.auth_scheme_for(&["nh"]), AuthScheme::ApiKeyHeader);
    assert_eq!(host.auth.auth_scheme_for(&["sk"]), AuthScheme::Bearer);
    assert_eq!(host.auth.auth_scheme_for(&["nh", "sk"]), AuthScheme::Bearer);
    assert_eq!(host.auth.auth_scheme(), AuthScheme::Bearer);
}
