//! The tower layer on its own: fail modes when stores are down, what it puts
//! in request and response extensions, cookies, and axum wiring.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use axum::{Extension, Router};
use jiff::Timestamp;
use keygate::auth::{AuthError, Authenticator, Principal};
use keygate::backend::{BackendError, FailMode};
use keygate::limit::QuotaRule;
use keygate::limit::{CheckMode, Decision, LimitStore, MemoryLimiter, PlanSet, Policy};
use keygate::manager::{KeyManager, NewKey};
use keygate::quota::{MemoryQuotaStore, QuotaDecision, QuotaStore};
use keygate::store::{MemoryKeyStore, Tenant};
use keygate::tower::{Gate, Refusal, Refused, RouteError};
use tower::ServiceExt;

#[path = "support/failing.rs"]
mod failing;
use failing::{Failing, outage};

/// A store that can be switched off, as when Redis goes away.
#[derive(Clone, Default)]
struct Switch(Arc<AtomicBool>);

impl Switch {
    fn down(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    fn set_down(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    fn set_up(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// A limiter and a quota store that are always down.
struct Down;

impl QuotaStore for Down {
    async fn check_and_count(
        &self,
        _: &str,
        _: &[QuotaRule],
        _: &str,
        _: u64,
        _: Timestamp,
    ) -> Result<QuotaDecision, BackendError> {
        Err(outage())
    }
    async fn refund(
        &self,
        _: &str,
        _: &str,
        _: u64,
        _: &mut QuotaDecision,
        _: Timestamp,
    ) -> Result<(), BackendError> {
        Err(outage())
    }
    async fn usage(&self, _: &str, _: &str, _: Timestamp) -> Result<u64, BackendError> {
        Err(outage())
    }
}

impl LimitStore for Down {
    async fn check(
        &self,
        _: &str,
        _: &[Policy],
        _: u32,
        _: CheckMode,
    ) -> Result<Decision, BackendError> {
        Err(outage())
    }
    async fn refund(
        &self,
        _: &str,
        _: &[Policy],
        _: u32,
        _: &mut Decision,
    ) -> Result<(), BackendError> {
        Err(outage())
    }
}

struct FlakyQuota(MemoryQuotaStore, Switch);

impl QuotaStore for FlakyQuota {
    async fn check_and_count(
        &self,
        account: &str,
        rules: &[QuotaRule],
        category: &str,
        cost: u64,
        now: Timestamp,
    ) -> Result<QuotaDecision, BackendError> {
        if self.1.down() {
            return Err(outage());
        }
        self.0.check_and_count(account, rules, category, cost, now).await
    }

    async fn refund(
        &self,
        account: &str,
        category: &str,
        cost: u64,
        check: &mut QuotaDecision,
        now: Timestamp,
    ) -> Result<(), BackendError> {
        if self.1.down() {
            // Taken off as a real store's would be, the call then failing.
            check.refunded(check.refund_units(cost, now));
            return Err(outage());
        }
        self.0.refund(account, category, cost, check, now).await
    }

    async fn usage(
        &self,
        account: &str,
        category: &str,
        now: Timestamp,
    ) -> Result<u64, BackendError> {
        self.0.usage(account, category, now).await
    }
}

struct Fixture {
    key: String,
    switch: Switch,
    keys: MemoryKeyStore,
}

async fn fixture() -> Fixture {
    let keys = MemoryKeyStore::new();
    let ws = Tenant::workspace("ws_t".parse().unwrap());
    let created = KeyManager::new(keys.clone())
        .create(
            NewKey::new("t", keygate::format::NH, ws)
                .plan("free")
                .scopes(&["events:read"])
                .unwrap(),
        )
        .await
        .unwrap();
    Fixture { key: created.key().expose_secret().to_owned(), switch: Switch::default(), keys }
}

/// An in-memory limiter that fails while `switch` is down.
fn flaky_limiter(switch: &Switch) -> Failing {
    let switch = switch.clone();
    Failing::new(MemoryLimiter::new(1000), move |_, _| switch.down())
}

fn app(f: &Fixture, limit_fail: FailMode, quota_fail: FailMode) -> Router {
    let gate = Gate::builder(Authenticator::new(f.keys.clone()), flaky_limiter(&f.switch))
        .plans(PlanSet::presets())
        .quotas(FlakyQuota(MemoryQuotaStore::new(), f.switch.clone()))
        .limiter_fail_mode(limit_fail)
        .quota_fail_mode(quota_fail)
        .build();
    Router::new()
        .route(
            "/events",
            get(|Extension(p): Extension<Principal>, d: Option<Extension<Decision>>| async move {
                format!("{} {}", p.name(), d.map_or(0, |Extension(d)| d.remaining()))
            }),
        )
        .route_layer(gate.layer().require("events:read").unwrap().quota("email"))
}

async fn get_events(app: &Router, key: &str) -> axum::response::Response {
    let req = Request::get("/events").header("x-api-key", key).body(Body::empty()).unwrap();
    app.clone().oneshot(req).await.unwrap()
}

async fn text(res: axum::response::Response) -> String {
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn admitted_requests_see_principal_and_decision() {
    let f = fixture().await;
    let app = app(&f, FailMode::Closed, FailMode::Closed);
    let res = get_events(&app, &f.key).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-ratelimit-limit"], "5");
    assert_eq!(res.headers()["x-ratelimit-remaining"], "4");
    assert_eq!(text(res).await, "t 4");
}

/// `Gate::charge` from a handler: its decision, nothing to count, or an
/// outage let through whose trace the handler hands to the layer.
#[tokio::test]
async fn a_handlers_charge_reports_an_outage_it_let_through() {
    use keygate::tower::{Charge, FailedOpen};
    let f = fixture().await;
    // A frozen clock counts the quota: the two charges below must land in
    // one month, however near its end the test runs.
    let auth = Authenticator::new(f.keys.clone()).clock(keygate::clock::FakeClock::at_2026());
    let gate = Gate::builder(auth, flaky_limiter(&f.switch))
        .plans(PlanSet::presets())
        .quotas(FlakyQuota(MemoryQuotaStore::new(), f.switch.clone()))
        .limiter_fail_mode(FailMode::Open)
        .quota_fail_mode(FailMode::Open)
        .build();
    let charging = gate.clone();
    let app = Router::new()
        .route(
            "/events",
            get(move |Extension(p): Extension<Principal>| async move {
                let charge = charging.charge(&p, "email", 1).await.unwrap();
                let used = charge.decision().map_or(0, |q| q.used);
                let outage = charge.failed_open().is_some_and(|f| f.quota.is_some());
                let mut res =
                    axum::response::IntoResponse::into_response(format!("{used} {outage}"));
                charge.trace_into(res.extensions_mut());
                res
            }),
        )
        .route_layer(gate.layer());
    let res = get_events(&app, &f.key).await;
    assert!(res.extensions().get::<FailedOpen>().is_none());
    assert_eq!(text(res).await, "1 false", "counted");
    // Both stores down: the layer's limiter failure and the handler's
    // quota failure side by side in the response.
    f.switch.set_down();
    let res = get_events(&app, &f.key).await;
    assert_eq!(res.status(), StatusCode::OK);
    let failed = res.extensions().get::<FailedOpen>().expect("the outage").clone();
    assert!(failed.limiter.is_some() && failed.quota.is_some(), "{failed:?}");
    assert_eq!(text(res).await, "0 true", "let through uncounted, and the charge says why");
    f.switch.set_up();
    let principal = Authenticator::new(f.keys.clone())
        .authenticate([("x-api-key", f.key.as_bytes())], &keygate::auth::Target::any())
        .await
        .unwrap();
    let charge = gate.charge(&principal, "email", 1).await.unwrap();
    assert_eq!(charge.decision().map(|q| q.used), Some(2), "{charge:?}");
    // Without a quota store there is nothing to count against.
    let uncounted = Gate::builder(Authenticator::new(f.keys.clone()), MemoryLimiter::new(10))
        .plans(PlanSet::presets())
        .build();
    let charge = uncounted.charge(&principal, "email", 1).await.unwrap();
    assert!(matches!(charge, Charge::Uncounted) && charge.failed_open().is_none());
    let mut ext = axum::http::Extensions::new();
    charge.trace_into(&mut ext);
    assert!(ext.get::<FailedOpen>().is_none());
}

/// What a gate, its builder and a request's refund handles show in logs:
/// the plans, the units each handle can give back; never a key.
#[tokio::test]
async fn gates_and_refund_handles_debug_as_what_they_hold() {
    use keygate::tower::{QuotaRefund, Refund};
    let f = fixture().await;
    let builder = Gate::builder(Authenticator::new(f.keys.clone()), MemoryLimiter::new(10))
        .plans(PlanSet::presets())
        .default_plan("indie")
        .quotas(MemoryQuotaStore::new());
    assert!(format!("{builder:?}").starts_with("GateBuilder"), "{builder:?}");
    let gate = builder.build();
    let shown = format!("{gate:?}");
    assert!(shown.starts_with("Gate {") && shown.contains(r#"Some("indie")"#), "{shown}");
    assert!(shown.contains(r#""startup""#) && shown.contains("quotas: true"), "{shown}");
    assert_eq!(gate.plans().get("indie").map(keygate::limit::Plan::name), Some("indie"));
    let layer = gate.layer().require("events:read").unwrap();
    let route = format!("{layer:?}");
    assert!(route.starts_with("GateLayer") && route.contains("events:read"), "{route}");
    let app: Router = Router::new().route(
        "/events",
        get(|Extension(r): Extension<Refund>, Extension(q): Extension<QuotaRefund>| async move {
            format!("{r:?} {q:?}")
        })
        .route_layer(gate.layer().cost(2).quota("webhook")),
    );
    let res = get_events(&app, &f.key).await;
    assert_eq!(res.status(), StatusCode::OK);
    let handles = text(res).await;
    assert!(
        handles.starts_with("Refund { refundable: 2")
            && handles.contains("QuotaRefund { refundable: 1"),
        "{handles}"
    );
    assert!(!shown.contains(&f.key) && !handles.contains(&f.key));
}

/// A test-mode key spends its own month, not production's: `sk_test_` use
/// in a sandbox (a CI run, a leaked test key) must not leave the live keys
/// of its workspace at 429 (SPEC §2: `test` keys never reach `live`).
#[tokio::test]
async fn a_test_keys_charges_leave_the_live_months_quota_alone() {
    use keygate::format::{Environment, SK};
    use keygate::scope::ScopeRegistry;
    let keys = MemoryKeyStore::new();
    let ws = Tenant::workspace("ws_e".parse().unwrap());
    let manager = KeyManager::new(keys.clone());
    let mut who = Vec::new();
    for env in [Environment::TEST, Environment::LIVE] {
        let created =
            manager.create(NewKey::new("k", SK, ws.clone()).environment(env).plan("free")).await;
        let (_, record) = created.unwrap().into_parts();
        who.push(Principal::from_record(record, &ScopeRegistry::default()).unwrap());
    }
    let auth = Authenticator::new(keys).clock(keygate::clock::FakeClock::at_2026());
    let gate = Gate::builder(auth, MemoryLimiter::new(10))
        .plans(PlanSet::presets())
        .quotas(MemoryQuotaStore::new())
        .build();
    // `free`: 100 notifications a month; the test key uses them all.
    let spent = gate.charge(&who[0], "email", 100).await.unwrap();
    assert_eq!(spent.decision().map(|q| q.used), Some(100));
    let live = gate.charge(&who[1], "email", 1).await;
    assert!(live.is_ok(), "the live key was refused by the test key's use: {live:?}");
}

#[tokio::test]
async fn store_outage_fails_closed_by_default() {
    let f = fixture().await;
    let app = app(&f, FailMode::Closed, FailMode::Closed);
    f.switch.set_down();
    let res = get_events(&app, &f.key).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "1");
    let refused = res.extensions().get::<Refused>().expect("typed reason for logs");
    assert!(matches!(refused.reason(), Refusal::LimiterBackend(_)), "{:?}", refused.reason());
    assert!(!text(res).await.contains("connection refused"), "the cause stays in the logs");
}

#[tokio::test]
async fn store_outage_fails_open_when_chosen() {
    let f = fixture().await;
    let app = app(&f, FailMode::Open, FailMode::Open);
    f.switch.set_down();
    let res = get_events(&app, &f.key).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers().get("x-ratelimit-limit").is_none(), "no decision, no headers");
    // Let through, but not unseen: both errors are there for the logs.
    let failed = res.extensions().get::<keygate::tower::FailedOpen>().expect("the outage");
    assert!(failed.limiter.is_some() && failed.quota.is_some(), "{failed:?}");
    assert_eq!(text(res).await, "t 0");
    // A refusal after the limiter failed open reports it too.
    let unscoped = KeyManager::new(f.keys.clone())
        .create(
            NewKey::new("u", keygate::format::NH, Tenant::workspace("ws_t".parse().unwrap()))
                .plan("free"),
        )
        .await
        .unwrap();
    let res = get_events(&app, unscoped.key().expose_secret()).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let failed = res.extensions().get::<keygate::tower::FailedOpen>().expect("the outage");
    assert!(failed.limiter.is_some());
    // Once the stores are back, nothing is reported.
    f.switch.set_up();
    let res = get_events(&app, &f.key).await;
    assert!(res.extensions().get::<keygate::tower::FailedOpen>().is_none());
}

#[tokio::test]
async fn quota_outage_is_its_own_choice() {
    let f = fixture().await;
    // Limiter open, quota closed: the limiter's outage passes, the quota's refuses.
    let app = app(&f, FailMode::Open, FailMode::Closed);
    f.switch.set_down();
    let res = get_events(&app, &f.key).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let refused = res.extensions().get::<Refused>().unwrap();
    assert!(matches!(refused.reason(), Refusal::QuotaBackend(_)));
}

/// One gate over a limiter that is down, one route failing otherwise than
/// the gate: each route's own mode, else the gate's, so a route that must
/// stay up (an ingest path) needs no second gate.
#[tokio::test]
async fn a_routes_limiter_fail_mode_stands_in_for_the_gates() {
    let f = fixture().await;
    f.switch.set_down();
    for (gate_mode, route_mode) in
        [(FailMode::Closed, FailMode::Open), (FailMode::Open, FailMode::Closed)]
    {
        let gate = Gate::builder(Authenticator::new(f.keys.clone()), flaky_limiter(&f.switch))
            .plans(PlanSet::presets())
            .limiter_fail_mode(gate_mode)
            .build();
        let app: Router = Router::new()
            .route(
                "/own",
                get(|| async { "in" }).route_layer(gate.layer().limiter_fail_mode(route_mode)),
            )
            .route("/gates", get(|| async { "in" }).route_layer(gate.layer()));
        let modes = [("/own", route_mode), ("/gates", gate_mode)];
        expect_fail_modes(
            &app,
            &f.key,
            modes,
            |failed| failed.limiter.is_some(),
            |reason| matches!(reason, Refusal::LimiterBackend(_)),
        )
        .await;
    }
}

/// Each `(path, mode)` of `app` with a store down: `Open` lets the request
/// through with the outage `open` expects in its `FailedOpen`; `Closed` is a
/// 503 whose reason `closed` expects.
async fn expect_fail_modes(
    app: &Router,
    key: &str,
    modes: [(&str, FailMode); 2],
    open: impl Fn(&keygate::tower::FailedOpen) -> bool,
    closed: impl Fn(&Refusal) -> bool,
) {
    for (path, mode) in modes {
        let req = Request::get(path).header("x-api-key", key).body(Body::empty()).unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        if mode == FailMode::Open {
            assert_eq!(res.status(), StatusCode::OK, "{path}");
            let failed = res.extensions().get::<keygate::tower::FailedOpen>().expect("the outage");
            assert!(open(failed), "{path}: {failed:?}");
        } else {
            assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
            let refused = res.extensions().get::<Refused>().unwrap();
            assert!(closed(refused.reason()), "{path}: {refused:?}");
        }
    }
}

/// The same for the quota store: a route's own mode, else the gate's.
#[tokio::test]
async fn a_routes_quota_fail_mode_stands_in_for_the_gates() {
    use keygate::tower::FailedOpen;
    let f = fixture().await;
    for (gate_mode, route_mode) in
        [(FailMode::Closed, FailMode::Open), (FailMode::Open, FailMode::Closed)]
    {
        let gate = Gate::builder(Authenticator::new(f.keys.clone()), MemoryLimiter::new(100))
            .plans(PlanSet::presets())
            .quotas(Down)
            .quota_fail_mode(gate_mode)
            .build();
        let counted = gate.layer().quota("email");
        let app: Router = Router::new()
            .route(
                "/own",
                get(|| async { "in" }).route_layer(counted.clone().quota_fail_mode(route_mode)),
            )
            .route("/gates", get(|| async { "in" }).route_layer(counted));
        let modes = [("/own", route_mode), ("/gates", gate_mode)];
        let quota_only = |failed: &FailedOpen| failed.quota.is_some() && failed.limiter.is_none();
        expect_fail_modes(&app, &f.key, modes, quota_only, |reason| {
            matches!(reason, Refusal::QuotaBackend(_))
        })
        .await;
    }
}

#[tokio::test]
async fn refusals_carry_typed_reasons() {
    let f = fixture().await;
    let app = app(&f, FailMode::Closed, FailMode::Closed);
    let res = get_events(&app, "nh_nope").await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let reason = res.extensions().get::<Refused>().unwrap().reason();
    assert!(matches!(reason, Refusal::Auth(_)), "{reason}");
    // Free plan: 5 a minute, then 429 with the limit headers.
    for _ in 0..5 {
        assert_eq!(get_events(&app, &f.key).await.status(), StatusCode::OK);
    }
    let res = get_events(&app, &f.key).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["x-ratelimit-remaining"], "0");
    assert!(res.headers().get("retry-after").is_some());
    assert!(matches!(res.extensions().get::<Refused>().unwrap().reason(), Refusal::RateLimited(_)));
}

/// `Refused` (what `Gate::admit` and `Gate::charge` return) is an error: a
/// host's handler returning `Box<dyn Error + Send + Sync>` (or `anyhow`)
/// can `?` it, and its source is the typed reason's cause, for logs that
/// walk the chain.
#[tokio::test]
async fn refusals_are_errors_whose_source_is_the_cause() {
    fn boxed<E: std::error::Error + Send + Sync + 'static>(e: E) -> Box<dyn std::error::Error> {
        Box::new(e)
    }
    let f = fixture().await;
    let app = app(&f, FailMode::Closed, FailMode::Closed);
    let res = get_events(&app, "nh_nope").await;
    let refused = res.extensions().get::<Refused>().unwrap().clone();
    let reason = refused.reason().to_string();
    assert!(reason.starts_with("authentication failed: "), "{reason}");
    let e = boxed(refused);
    assert_eq!(e.to_string(), reason);
    let cause = e.source().expect("the authentication error");
    assert!(cause.downcast_ref::<AuthError>().is_some(), "{cause:?}");
    // The store down, failing closed: the limiter's failure is the cause.
    f.switch.set_down();
    let res = get_events(&app, &f.key).await;
    let refused = res.extensions().get::<Refused>().unwrap();
    assert!(matches!(refused.reason(), Refusal::LimiterBackend(_)), "{}", refused.reason());
    let e = boxed(refused.clone());
    assert!(e.source().and_then(|c| c.downcast_ref::<BackendError>()).is_some());
    // A reason with no cause of its own has no source.
    assert!(boxed(Refusal::Target).source().is_none());
}

#[tokio::test]
async fn unknown_plan_is_a_deployment_error_not_a_free_pass() {
    let f = fixture().await;
    let gate = Gate::builder(Authenticator::new(f.keys.clone()), MemoryLimiter::new(10))
        .plans(PlanSet::default()) // knows no plans, the key names "free"
        .build();
    let app: Router = Router::new().route("/", get(|| async { "in" })).route_layer(gate.layer());
    let req = Request::get("/").header("x-api-key", &f.key).body(Body::empty()).unwrap();
    let res = app.oneshot(req).await.unwrap();
    // A misspelled default plan is caught at start-up by `try_build`.
    let checked = Gate::builder(Authenticator::new(f.keys.clone()), MemoryLimiter::new(10))
        .plans(PlanSet::presets())
        .default_plan("hobbby")
        .try_build();
    assert_eq!(checked.err().map(|e| e.plan), Some("hobbby".to_owned()));
    let fine = Gate::builder(Authenticator::new(f.keys.clone()), MemoryLimiter::new(10))
        .plans(PlanSet::presets())
        .default_plan("hobby")
        .try_build();
    assert!(fine.is_ok());
    // A deployment error: a 500, with no invitation to retry.
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(res.headers().get("retry-after").is_none());
    assert!(matches!(
        res.extensions().get::<Refused>().unwrap().reason(),
        Refusal::UnknownPlan { .. }
    ));
}

#[tokio::test]
async fn checked_routes_refuse_names_that_resolve_to_nothing() {
    let f = fixture().await;
    let auth = || Authenticator::new(f.keys.clone());
    let gate = Gate::builder(auth(), MemoryLimiter::new(10))
        .plans(PlanSet::presets())
        .quotas(MemoryQuotaStore::new())
        .build();
    // Every name resolves: presets count `webhook` and `email`.
    let fine = gate.layer().formats(["nh", "sk"]).plan("pro").quota("webhook").checked();
    assert!(fine.is_ok());
    assert!(gate.layer().checked().is_ok());
    let err = |layer: keygate::tower::GateLayer<_, _, _, _>| layer.checked().err();
    assert_eq!(
        err(gate.layer().formats(["nh", "skk"])),
        Some(RouteError::UnknownFormat("skk".into()))
    );
    assert_eq!(err(gate.layer().plan("proo")), Some(RouteError::UnknownPlan("proo".into())));
    assert_eq!(
        err(gate.layer().quota("webhok")),
        Some(RouteError::UncountedCategory("webhok".into()))
    );
    // A category named without a store to count it in counts nothing.
    let storeless = Gate::builder(auth(), MemoryLimiter::new(10)).plans(PlanSet::presets()).build();
    assert_eq!(
        storeless.layer().quota("webhook").checked().err(),
        Some(RouteError::NoQuotaStore("webhook".into()))
    );
    // Unchecked, the misspelled category is admitted and never counted.
    let app: Router =
        Router::new().route("/", get(|| async { "in" })).route_layer(gate.layer().quota("webhok"));
    let req = Request::get("/").header("x-api-key", &f.key).body(Body::empty()).unwrap();
    assert_eq!(app.oneshot(req).await.unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn cookie_credentials_only_where_enabled() {
    let f = fixture().await;
    let gate = Gate::builder(Authenticator::new(f.keys.clone()), MemoryLimiter::new(10)).build();
    let app: Router = Router::new()
        .route("/c", get(|| async { "in" }).layer(gate.layer().cookie("sess")))
        .route("/h", get(|| async { "in" }).layer(gate.layer()));
    // Cookies follow the Bearer header rules: an `sk` key, not an `nh` one.
    let ws = Tenant::workspace("ws_t".parse().unwrap());
    let sk = KeyManager::new(f.keys.clone())
        .create(NewKey::new("browser", keygate::format::SK, ws))
        .await
        .unwrap();
    let cookie = format!("theme=dark; sess={}", sk.key().expose_secret());
    let call = |path: &'static str| {
        Request::get(path).header("cookie", &cookie).body(Body::empty()).unwrap()
    };
    assert_eq!(app.clone().oneshot(call("/c")).await.unwrap().status(), StatusCode::OK);
    assert_eq!(app.clone().oneshot(call("/h")).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    // A quoted cookie value (RFC 6265) is the same credential, and so is
    // one with spaces around it.
    for value in [
        format!("sess=\"{}\"", sk.key().expose_secret()),
        format!("sess={} ; a=b", sk.key().expose_secret()),
    ] {
        let req = Request::get("/c").header("cookie", &value).body(Body::empty()).unwrap();
        assert_eq!(app.clone().oneshot(req).await.unwrap().status(), StatusCode::OK, "{value}");
    }
    // Another cookie of the site holding UTF-8 does not hide this one.
    let mixed = format!("x=caf\u{e9}; sess={}", sk.key().expose_secret());
    let value = axum::http::HeaderValue::from_bytes(mixed.as_bytes()).unwrap();
    let req = Request::get("/c").header("cookie", value).body(Body::empty()).unwrap();
    assert_eq!(app.clone().oneshot(req).await.unwrap().status(), StatusCode::OK);
    // An empty cookie of the name (a session cleared by the browser) is no
    // credential, as an empty credential header is: a missing key.
    for value in ["sess=; theme=dark", "sess=\"\""] {
        let req = Request::get("/c").header("cookie", value).body(Body::empty()).unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{value}");
        assert!(
            matches!(
                res.extensions().get::<Refused>().unwrap().reason(),
                Refusal::Auth(AuthError::Missing)
            ),
            "{value}"
        );
    }
    // A blank credential header (what a browser app sends with its token
    // variable empty) is no credential either: the cookie still counts.
    for (name, blank) in [("authorization", "Bearer "), ("authorization", ""), ("x-api-key", "")] {
        let req = Request::get("/c")
            .header(name, blank)
            .header("cookie", &cookie)
            .body(Body::empty())
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{name}: {blank:?}");
    }
    // A header with something in it is judged, not the cookie.
    let req = Request::get("/c")
        .header("authorization", "Basic abc")
        .header("cookie", &cookie)
        .body(Body::empty())
        .unwrap();
    assert_eq!(app.clone().oneshot(req).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    // Two cookies of the name (one set by a sibling domain, or for a
    // narrower path) are two credentials: refused, whichever comes first.
    let other = KeyManager::new(f.keys.clone())
        .create(NewKey::new(
            "other",
            keygate::format::SK,
            Tenant::workspace("ws_t".parse().unwrap()),
        ))
        .await
        .unwrap();
    let two = format!("sess={}; sess={}", other.key().expose_secret(), sk.key().expose_secret());
    let req = Request::get("/c").header("cookie", &two).body(Body::empty()).unwrap();
    let res = app.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert!(matches!(
        res.extensions().get::<Refused>().unwrap().reason(),
        Refusal::Auth(AuthError::Credential(keygate::auth::CredentialError::Conflicting))
    ));
}

/// A route taking credentials from cookie `sess` (`/c`), and a live `sk`
/// key for it (a browser's).
async fn cookie_route() -> (Router, String) {
    let f = fixture().await;
    let gate = Gate::builder(Authenticator::new(f.keys.clone()), MemoryLimiter::new(10)).build();
    let app: Router =
        Router::new().route("/c", get(|| async { "in" }).layer(gate.layer().cookie("sess")));
    let ws = Tenant::workspace("ws_t".parse().unwrap());
    let sk = KeyManager::new(f.keys.clone())
        .create(NewKey::new("browser", keygate::format::SK, ws))
        .await
        .unwrap();
    (app, sk.key().expose_secret().to_owned())
}

/// A cookie of the route's name whose value holds bytes no key has (here not
/// even UTF-8) is a credential presented and refused for its bytes, as such a
/// header is: not a missing key, and a second credential beside a live
/// cookie of the name, whichever comes first.
#[tokio::test]
async fn a_cookie_with_non_ascii_bytes_is_an_invalid_credential_not_a_missing_one() {
    use keygate::auth::CredentialError;
    let (app, live) = cookie_route().await;
    let live = live.as_str();
    let mut bad = b"sess=sk_live_caf".to_vec();
    bad.push(0xe9);
    let mut before = bad.clone();
    before.extend_from_slice(format!("; sess={live}").as_bytes());
    let mut after = format!("sess={live}; ").into_bytes();
    after.extend_from_slice(&bad);
    for (value, want) in [
        (bad, CredentialError::InvalidBytes),
        (before, CredentialError::Conflicting),
        (after, CredentialError::Conflicting),
    ] {
        let shown = String::from_utf8_lossy(&value).into_owned();
        let value = axum::http::HeaderValue::from_bytes(&value).unwrap();
        let req = Request::get("/c").header("cookie", value).body(Body::empty()).unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{shown}");
        let refused = res.extensions().get::<Refused>().unwrap();
        assert!(
            matches!(refused.reason(), Refusal::Auth(AuthError::Credential(e)) if *e == want),
            "{shown}: {}",
            refused.reason()
        );
        assert_eq!(
            res.headers().get("www-authenticate").unwrap(),
            "Bearer error=\"invalid_token\"",
            "{shown}"
        );
    }
}

/// A cookie is held to the Bearer header rules (an `nh` key is refused
/// there), and the typed reason for the logs names the cookie it came in,
/// not an `Authorization` header the request never had.
#[tokio::test]
async fn a_key_refused_in_a_cookie_is_logged_as_from_the_cookie() {
    use keygate::auth::{CredentialError, Source};
    let f = fixture().await;
    let gate = Gate::builder(Authenticator::new(f.keys.clone()), MemoryLimiter::new(10)).build();
    let app: Router =
        Router::new().route("/c", get(|| async { "in" }).layer(gate.layer().cookie("sess")));
    let req = Request::get("/c").header("cookie", format!("sess={}", f.key));
    let res = app.oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let refused = res.extensions().get::<Refused>().unwrap();
    assert!(
        matches!(
            refused.reason(),
            Refusal::Auth(AuthError::Credential(CredentialError::WrongHeader {
                format: "nh",
                header: Source::Cookie,
            }))
        ),
        "{}",
        refused.reason()
    );
    assert!(refused.reason().to_string().contains("cookie"), "{}", refused.reason());
}

/// An empty cookie of the route's name (one cleared for another path, say)
/// is no credential (`GateLayer::cookie`), so it is no second credential
/// beside a live one either, as a blank header is none beside another
/// header's key: the live key is used, in whichever order they come.
#[tokio::test]
async fn an_empty_cookie_is_no_second_credential_beside_a_live_one() {
    let (app, live) = cookie_route().await;
    let live = live.as_str();
    for value in [
        format!("sess=; sess={live}"),
        format!("sess={live}; sess="),
        format!("sess=\"\"; theme=dark; sess={live}"),
    ] {
        let req = Request::get("/c").header("cookie", &value).body(Body::empty()).unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        let reason = res.extensions().get::<Refused>().map(|r| r.reason().to_string());
        assert_eq!(res.status(), StatusCode::OK, "{value}: {reason:?}");
    }
}

#[tokio::test]
async fn repeated_or_mixed_credential_headers_are_refused() {
    let f = fixture().await;
    let app = app(&f, FailMode::Closed, FailMode::Closed);
    let both = Request::get("/events")
        .header("x-api-key", &f.key)
        .header("authorization", format!("Bearer {}", f.key))
        .body(Body::empty())
        .unwrap();
    let twice = Request::get("/events").header("x-api-key", &f.key).header("X-Api-Key", &f.key);
    for req in [both, twice.body(Body::empty()).unwrap()] {
        let res = app.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        let reason = res.extensions().get::<Refused>().unwrap().reason().to_string();
        assert!(reason.contains("credential refused"), "{reason}");
    }
}

#[tokio::test]
async fn the_request_future_fits_the_allocators_small_size_classes() {
    // Each request boxes one future. glibc serves requests under 1 KiB from
    // its per-thread cache; larger ones take the slow path (and consolidate
    // free chunks first), which cost ~100 ns per request when this future
    // held copies of its request and decisions. The inner service here is
    // small, so the figure is the layer's own share (808 bytes before
    // nested layers of one gate; 912 with what they carry, 992 since an
    // inner layer can give the outer one's charge back; 1000 later, 1008
    // once quota decisions kept their count for refunds, 984 with the
    // quota count boxed, 1008 with ids held inline: 24 bytes instead of
    // 16, no allocation per id). glibc's cache takes up to 1032 bytes.
    use tower::{Layer, Service};
    let f = fixture().await;
    let gate = Gate::builder(Authenticator::new(f.keys.clone()), MemoryLimiter::new(1000))
        .plans(PlanSet::presets())
        .build();
    let inner = tower::service_fn(|_: Request<Body>| async {
        Ok::<_, std::convert::Infallible>(axum::response::Response::new(Body::empty()))
    });
    let mut svc = gate.layer().layer(inner);
    let req = Request::get("/").header("x-api-key", &f.key).body(Body::empty()).unwrap();
    let fut = svc.call(req);
    let size = std::mem::size_of_val(&*fut);
    assert!(size <= 1016, "the gate's future grew to {size} bytes");
    let res = fut.await.unwrap();
    assert_eq!(res.headers()["x-ratelimit-remaining"], "4");
}

#[tokio::test]
async fn a_target_refusal_comes_after_authentication_and_carries_the_limit_headers() {
    let f = fixture().await;
    let gate = Gate::builder(Authenticator::new(f.keys.clone()), MemoryLimiter::new(1000))
        .plans(PlanSet::presets())
        .build();
    let refuse =
        |_: &axum::http::request::Parts| Err(keygate::http::Rejection::Forbidden { scope: None });
    // The target function also asks for `sk` keys: it narrows the route's
    // `nh`, it cannot widen it.
    let widen = |_: &axum::http::request::Parts| Ok(keygate::auth::Target::any().formats(["sk"]));
    let app = Router::new()
        .route("/refused", get(|| async { "unreachable" }))
        .route_layer(gate.layer().formats(["nh"]).target(refuse))
        .merge(
            Router::new()
                .route("/narrowed", get(|| async { "unreachable" }))
                .route_layer(gate.layer().formats(["nh"]).target(widen)),
        );
    let call = |path: &'static str, key: Option<&str>| {
        let mut req = Request::get(path);
        if let Some(key) = key {
            req = req.header("x-api-key", key);
        }
        app.clone().oneshot(req.body(Body::empty()).unwrap())
    };
    // No key: a 401, whatever the target function says.
    assert_eq!(call("/refused", None).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    // A valid key: the target's 403, with the limit headers like any 403.
    let res = call("/refused", Some(&f.key)).await.unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(res.headers()["x-ratelimit-limit"], "5");
    assert!(matches!(res.extensions().get::<Refused>().unwrap().reason(), Refusal::Target));
    // `nh` and `sk` have nothing in common: no key format is accepted,
    // neither the route's nor the one the target function names.
    let res = call("/narrowed", Some(&f.key)).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let sk = KeyManager::new(f.keys.clone())
        .create(NewKey::new("s", keygate::format::SK, Tenant::workspace("ws_t".parse().unwrap())))
        .await
        .unwrap();
    let bearer = format!("Bearer {}", sk.key().expose_secret());
    let req = Request::get("/narrowed").header("authorization", bearer).body(Body::empty());
    let res = app.clone().oneshot(req.unwrap()).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "the target cannot widen the route");
}

#[tokio::test]
async fn an_inactive_account_or_a_foreign_environment_is_a_403_with_the_limit_headers() {
    let f = fixture().await;
    let sk_test = KeyManager::new(f.keys.clone())
        .create(
            NewKey::new("s", keygate::format::SK, Tenant::workspace("ws_t".parse().unwrap()))
                .environment(keygate::format::Environment::TEST)
                .plan("free"),
        )
        .await
        .unwrap();
    let auth = Authenticator::new(f.keys.clone())
        .environment(keygate::format::Environment::LIVE)
        .account_status(|t: &Tenant| t.workspace.as_str() != "ws_t");
    let gate = Gate::builder(auth, MemoryLimiter::new(1000)).plans(PlanSet::presets()).build();
    let app = Router::new().route("/x", get(|| async { "unreachable" })).route_layer(gate.layer());
    let call = |header: &'static str, value: String| {
        let req = Request::get("/x").header(header, value).body(Body::empty()).unwrap();
        app.clone().oneshot(req)
    };
    let inactive = call("x-api-key", f.key.clone()).await.unwrap();
    let foreign = call("authorization", format!("Bearer {}", sk_test.key().expose_secret()));
    let foreign = foreign.await.unwrap();
    for (res, reason) in [(inactive, "inactive"), (foreign, "environment")] {
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{reason}");
        assert_eq!(res.headers()["x-ratelimit-limit"], "5", "{reason}: limited, with headers");
        let refused = res.extensions().get::<Refused>().unwrap();
        let auth_error = match refused.reason() {
            Refusal::Auth(e) => e,
            other => panic!("{reason}: {other:?}"),
        };
        match reason {
            "inactive" => assert!(matches!(auth_error, AuthError::AccountInactive { .. })),
            _ => assert!(matches!(auth_error, AuthError::WrongEnvironment { .. })),
        }
    }
}

#[tokio::test]
async fn a_gate_nested_in_itself_authenticates_and_charges_once() {
    let f = fixture().await;
    let gate = Gate::builder(Authenticator::new(f.keys.clone()), MemoryLimiter::new(10))
        .plans(PlanSet::presets())
        .build();
    // Authentication for the whole router, scopes per route: the natural
    // layout, with the same gate twice on each request.
    let app: Router = Router::new()
        .route(
            "/events",
            get(|| async { "in" }).route_layer(gate.layer().require("events:read").unwrap()),
        )
        .route(
            "/keys",
            get(|| async { "in" }).route_layer(gate.layer().require("api_keys:read").unwrap()),
        )
        .route(
            "/costly",
            get(|Extension(d): Extension<Decision>| async move { d.remaining().to_string() })
                .route_layer(gate.layer().cost(2)),
        )
        .layer(gate.layer());
    let call = |path: &'static str| {
        Request::get(path).header("x-api-key", &f.key).body(Body::empty()).unwrap()
    };
    // The free plan: 5 a minute.
    let res = app.clone().oneshot(call("/events")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let remaining: Vec<_> = res.headers().get_all("x-ratelimit-remaining").iter().collect();
    assert_eq!(remaining, ["4"], "charged once, one header");
    // A refusal by the inner layer carries the outer layer's headers, once.
    let res = app.clone().oneshot(call("/keys")).await.unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let remaining: Vec<_> = res.headers().get_all("x-ratelimit-remaining").iter().collect();
    assert_eq!(remaining, ["3"]);
    // An inner route with a cost of its own costs that, once: the router's
    // unit is given back and the route's 2 charged, and its decision is
    // the one the handler and the headers see.
    let res = app.clone().oneshot(call("/costly")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let remaining: Vec<_> = res.headers().get_all("x-ratelimit-remaining").iter().collect();
    assert_eq!(remaining, ["1"], "the route's 2, not the router's 1 as well");
    assert_eq!(text(res).await, "1");
    // An inner layer's narrower formats hold for the outer's caller too: an
    // `nh` key admitted by the router's layer is refused on an `sk` route.
    let fresh = Gate::builder(Authenticator::new(f.keys.clone()), MemoryLimiter::new(10))
        .plans(PlanSet::presets())
        .build();
    let narrow: Router = Router::new()
        .route("/sk", get(|| async { "in" }).route_layer(fresh.layer().formats(["sk"])))
        .layer(fresh.layer());
    let req = Request::get("/sk").header("x-api-key", &f.key).body(Body::empty()).unwrap();
    let res = narrow.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert!(matches!(
        res.extensions().get::<Refused>().unwrap().reason(),
        Refusal::Auth(AuthError::FormatNotAccepted { format: "nh" })
    ));
    // A route's plan is the plan of keys that name none: this key names
    // one, so the inner layer's plan changes nothing and charges nothing.
    let planned: Router = Router::new()
        .route("/p", get(|| async { "in" }).route_layer(fresh.layer().plan("enterprise")))
        .layer(fresh.layer());
    let req = Request::get("/p").header("x-api-key", &f.key).body(Body::empty()).unwrap();
    let res = planned.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let remaining: Vec<_> = res.headers().get_all("x-ratelimit-remaining").iter().collect();
    assert_eq!(remaining, ["3"], "one more unit (after the /sk refusal's), not two");
    // The first gate's last unit.
    assert_eq!(app.clone().oneshot(call("/events")).await.unwrap().status(), StatusCode::OK);
    // Another gate is another gate: it authenticates (and charges) itself.
    let other = Gate::builder(Authenticator::new(f.keys.clone()), MemoryLimiter::new(10))
        .plans(PlanSet::presets())
        .build();
    let twice: Router = Router::new()
        .route("/e", get(|| async { "in" }).route_layer(other.layer()))
        .layer(gate.layer());
    let req = Request::get("/e").header("x-api-key", &f.key).body(Body::empty()).unwrap();
    let res = twice.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS, "the first gate's budget is spent");
}

#[tokio::test]
async fn the_handler_sees_the_credential_marked_sensitive() {
    let f = fixture().await;
    let gate = Gate::builder(Authenticator::new(f.keys.clone()), MemoryLimiter::new(10))
        .plans(PlanSet::presets())
        .build();
    let app: Router = Router::new().route(
        "/",
        get(|headers: axum::http::HeaderMap| async move { format!("{headers:?}") })
            .route_layer(gate.layer()),
    );
    let req = Request::get("/").header("x-api-key", &f.key).body(Body::empty()).unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let logged = text(res).await;
    assert!(!logged.contains(&f.key) && logged.contains("Sensitive"), "{logged}");
    // A Bearer key, and cookies (whichever carries the key, a cookie
    // header holds the browser's other sessions too); other headers stay
    // readable in logs.
    let ws = Tenant::workspace("ws_t".parse().unwrap());
    let sk = KeyManager::new(f.keys.clone())
        .create(NewKey::new("bearer", keygate::format::SK, ws))
        .await
        .unwrap();
    let sk = sk.key().expose_secret();
    let req = Request::get("/")
        .header("authorization", format!("Bearer {sk}"))
        .header("cookie", "theme=dark; other_app_session=s3cr3t")
        .header("x-request-id", "req-42")
        .body(Body::empty())
        .unwrap();
    let res = app.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let logged = text(res).await;
    assert!(!logged.contains(sk) && !logged.contains("s3cr3t"), "{logged}");
    assert!(logged.contains("req-42"), "{logged}");
}

/// An inner service that is ready only once its switch is up.
#[derive(Clone)]
struct Gated(Switch);

impl tower::Service<Request<Body>> for Gated {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        if self.0.down() { std::task::Poll::Pending } else { std::task::Poll::Ready(Ok(())) }
    }

    fn call(&mut self, _: Request<Body>) -> Self::Future {
        std::future::ready(Ok(axum::response::Response::new(Body::empty())))
    }
}

/// The layer passes its inner service's back-pressure on (a concurrency or
/// load-shed layer inside it stays in force), and says what it is in logs.
#[tokio::test]
async fn the_layer_is_ready_when_its_inner_service_is_and_debugs_as_its_route() {
    use tower::{Layer, Service};
    let f = fixture().await;
    let gate = Gate::builder(Authenticator::new(f.keys.clone()), MemoryLimiter::new(10)).build();
    let switch = Switch::default();
    switch.set_down();
    let mut svc = gate.layer().require("events:read").unwrap().layer(Gated(switch.clone()));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_pending());
    switch.set_up();
    assert!(matches!(svc.poll_ready(&mut cx), std::task::Poll::Ready(Ok(()))));
    let debug = format!("{svc:?}");
    assert!(debug.starts_with("GateService") && debug.contains("events:read"), "{debug}");
}

#[tokio::test]
async fn a_nested_layer_vouches_only_for_its_own_principal_and_cookie() {
    let f = fixture().await;
    let fresh = Gate::builder(Authenticator::new(f.keys.clone()), MemoryLimiter::new(10))
        .plans(PlanSet::presets())
        .build();
    // A cookie admitted by the outer layer reaches only inner routes that
    // take cookies: the others answer as if no credential came.
    let ws = Tenant::workspace("ws_t".parse().unwrap());
    let sk = KeyManager::new(f.keys.clone())
        .create(NewKey::new("b", keygate::format::SK, ws))
        .await
        .unwrap();
    let cookie = format!("sess={}", sk.key().expose_secret());
    let browser: Router = Router::new()
        .route("/page", get(|| async { "in" }).route_layer(fresh.layer().cookie("sess")))
        .route("/api", get(|| async { "in" }).route_layer(fresh.layer()))
        .layer(fresh.layer().cookie("sess"));
    let call = |path: &'static str| {
        Request::get(path).header("cookie", &cookie).body(Body::empty()).unwrap()
    };
    assert_eq!(browser.clone().oneshot(call("/page")).await.unwrap().status(), StatusCode::OK);
    let res = browser.oneshot(call("/api")).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert!(matches!(
        res.extensions().get::<Refused>().unwrap().reason(),
        Refusal::Auth(AuthError::Missing)
    ));
    // ...and only the cookie it came in: an inner route taking another
    // cookie answers as if no credential came.
    let two: Router = Router::new()
        .route("/b", get(|| async { "in" }).route_layer(fresh.layer().cookie("other")))
        .layer(fresh.layer().cookie("sess"));
    let req = Request::get("/b").header("cookie", &cookie).body(Body::empty()).unwrap();
    assert_eq!(two.oneshot(req).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    // A principal swapped in between the layers is not vouched for: the
    // inner layer authenticates the request itself.
    let decoy = keygate::auth::Principal::from_record(
        Arc::new(sk.record().clone()),
        &keygate::scope::ScopeRegistry::default(),
    )
    .unwrap();
    let swapped: Router = Router::new()
        .route(
            "/who",
            get(|Extension(p): Extension<Principal>| async move { p.name().to_owned() })
                .route_layer(fresh.layer()),
        )
        .layer(tower::util::MapRequestLayer::new(move |mut r: Request<Body>| {
            r.extensions_mut().insert(decoy.clone());
            r
        }))
        .layer(fresh.layer());
    let req = Request::get("/who").header("x-api-key", &f.key).body(Body::empty()).unwrap();
    let res = swapped.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(text(res).await, "t", "the key's own principal, not the decoy");
    // The same when the first principal is dropped before the new one is
    // made (the allocator would hand its address straight back).
    let record = Arc::new(sk.record().clone());
    let g2 = Gate::builder(Authenticator::new(f.keys.clone()), MemoryLimiter::new(10))
        .plans(PlanSet::presets())
        .build();
    let replaced: Router = Router::new()
        .route(
            "/who",
            get(|Extension(p): Extension<Principal>| async move { p.name().to_owned() })
                .route_layer(g2.layer()),
        )
        .layer(tower::util::MapRequestLayer::new(move |mut r: Request<Body>| {
            drop(r.extensions_mut().remove::<Principal>());
            let registry = keygate::scope::ScopeRegistry::default();
            let fake = keygate::auth::Principal::from_record(Arc::clone(&record), &registry);
            r.extensions_mut().insert(fake.unwrap());
            r
        }))
        .layer(g2.layer());
    // (Each request is charged twice here: the free plan's 5 hold two.)
    for _ in 0..2 {
        let req = Request::get("/who").header("x-api-key", &f.key).body(Body::empty()).unwrap();
        let res = replaced.clone().oneshot(req).await.unwrap();
        assert_eq!(text(res).await, "t", "a new principal at a reused address is not vouched for");
    }
}

#[tokio::test]
async fn every_required_scope_is_required() {
    let f = fixture().await;
    let gate = Gate::builder(Authenticator::new(f.keys.clone()), MemoryLimiter::new(10))
        .plans(PlanSet::presets())
        .build();
    // The key holds `events:read` only.
    let layer = gate.layer().require("events:write").unwrap().require("events:read").unwrap();
    let app: Router = Router::new().route("/e", get(|| async { "in" }).route_layer(layer));
    let req = Request::get("/e").header("x-api-key", &f.key).body(Body::empty()).unwrap();
    let res = app.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN, "both, not the last one");
    assert!(res.headers()["www-authenticate"].to_str().unwrap().contains("events:write"));
}

/// Layers of one gate nested (the router's, then a route's): one plan
/// applies, one charge is made, and what each layer reports survives.
mod nested {
    use super::*;
    use keygate::clock::{Clock, FakeClock};
    use keygate::format::{NH, NHK, Region};
    use keygate::tower::FailedOpen;

    /// An `nh` key holding `events:read`, on `plan` (or none).
    pub(super) async fn key(keys: &MemoryKeyStore, plan: Option<&str>) -> String {
        let ws = Tenant::workspace("ws_t".parse().unwrap());
        let mut new = NewKey::new("t", NH, ws).scopes(&["events:read"]).unwrap();
        if let Some(p) = plan {
            new = new.plan(p);
        }
        KeyManager::new(keys.clone()).create(new).await.unwrap().key().expose_secret().to_owned()
    }

    fn call(path: &'static str, key: &str) -> Request<Body> {
        Request::get(path).header("x-api-key", key).body(Body::empty()).unwrap()
    }

    fn header(res: &axum::response::Response, name: &str) -> Vec<String> {
        res.headers().get_all(name).iter().map(|v| v.to_str().unwrap().to_owned()).collect()
    }

    /// The presets on an in-memory limiter on a frozen clock, `default` the
    /// plan of keys naming none.
    pub(super) fn frozen_gate(
        keys: &MemoryKeyStore,
        default: &str,
    ) -> Gate<MemoryKeyStore, MemoryLimiter<String, FakeClock>, MemoryQuotaStore, FakeClock> {
        let clock = FakeClock::at_2026();
        Gate::builder(
            Authenticator::new(keys.clone()).clock(clock.clone()),
            MemoryLimiter::with_clock(100, clock),
        )
        .plans(PlanSet::presets())
        .default_plan(default)
        .build()
    }

    /// The presets on an in-memory limiter, no default plan.
    fn memory_gate(keys: &MemoryKeyStore) -> Gate<MemoryKeyStore, MemoryLimiter> {
        Gate::builder(Authenticator::new(keys.clone()), MemoryLimiter::new(100))
            .plans(PlanSet::presets())
            .build()
    }

    #[tokio::test]
    async fn the_routers_plan_holds_for_keys_without_one_inside_a_route_layer() {
        let keys = MemoryKeyStore::new();
        let k = key(&keys, None).await;
        // A frozen clock: pro's windows are a second long, and three checks
        // across a second's end would find a fresh window.
        let gate = frozen_gate(&keys, "hobby");
        let app: Router = Router::new()
            .route(
                "/events",
                get(|| async { "in" }).route_layer(gate.layer().require("events:read").unwrap()),
            )
            .layer(gate.layer().plan("pro"));
        for remaining in ["9", "8", "7"] {
            let res = app.clone().oneshot(call("/events", &k)).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            assert_eq!(header(&res, "x-ratelimit-limit"), ["10"], "pro, not the default");
            assert_eq!(header(&res, "x-ratelimit-remaining"), [remaining], "charged once");
        }
    }

    #[tokio::test]
    async fn a_route_quota_counts_under_the_routers_plan() {
        let keys = MemoryKeyStore::new();
        let k = key(&keys, None).await;
        let quotas = Arc::new(MemoryQuotaStore::new());
        // The gate's clock, not the system's: a month ending between the
        // count and the read would read the next month's zero.
        let clock = FakeClock::at_2026();
        let auth = Authenticator::new(keys.clone()).clock(clock.clone());
        let gate = Gate::builder(auth, MemoryLimiter::with_clock(100, clock.clone()))
            .plans(PlanSet::presets())
            .quotas(quotas.clone())
            .build();
        let app: Router = Router::new()
            .route("/n", get(|| async { "sent" }).route_layer(gate.layer().quota("email")))
            .layer(gate.layer().plan("free"));
        let res = app.oneshot(call("/n", &k)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let used = quotas.usage("ws_t/free", "email", clock.now()).await.unwrap();
        assert_eq!(used, 1, "counted against the free plan's 100");
    }

    #[tokio::test]
    async fn a_routes_own_plan_is_charged_once_not_on_top_of_the_routers() {
        let keys = MemoryKeyStore::new();
        let k = key(&keys, None).await;
        let gate = frozen_gate(&keys, "starter");
        let app: Router = Router::new()
            .route("/big", get(|| async { "in" }).route_layer(gate.layer().plan("enterprise")))
            .layer(gate.layer());
        // Enterprise: 100 a second, each request one unit of it (the
        // router's starter unit given back), so the sixth is no 429.
        for remaining in 1..=6 {
            let res = app.clone().oneshot(call("/big", &k)).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK, "request {remaining} {:?}", res.headers());
            assert_eq!(header(&res, "x-ratelimit-limit"), ["100"]);
            assert_eq!(header(&res, "x-ratelimit-remaining"), [(100 - remaining).to_string()]);
        }
    }

    #[tokio::test]
    async fn an_inner_401_carries_no_limit_headers_as_an_unknown_keys_does_not() {
        let keys = MemoryKeyStore::new();
        let ws = Tenant::workspace("ws_t".parse().unwrap());
        let us = KeyManager::new(keys.clone())
            .create(NewKey::new("u", NHK, ws).region(Region::US).plan("hobby"))
            .await
            .unwrap();
        let gate = memory_gate(&keys);
        let eu_only =
            |_: &axum::http::request::Parts| Ok(keygate::auth::Target::any().region(Region::EU));
        let app: Router = Router::new()
            .route("/eu", get(|| async { "in" }).route_layer(gate.layer().target(eu_only)))
            .layer(gate.layer());
        let bearer = |k: &str| {
            let h = format!("Bearer {k}");
            Request::get("/eu").header("authorization", h).body(Body::empty()).unwrap()
        };
        let unknown = format!("nhk_us_{}", "0".repeat(64));
        for k in [unknown.as_str(), us.key().expose_secret()] {
            let res = app.clone().oneshot(bearer(k)).await.unwrap();
            assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
            assert!(res.headers().get("x-ratelimit-limit").is_none(), "{:?}", res.headers());
        }
        // `GateLayer::target`'s region is the route's region: a key of
        // another region is invalid there (a 401, as an unknown key's), not
        // a key that fails to reach the target (403).
        let res = app.oneshot(bearer(us.key().expose_secret())).await.unwrap();
        let refused = res.extensions().get::<Refused>().expect("a refusal");
        assert!(
            matches!(refused.reason(), Refusal::Auth(AuthError::WrongRegion { .. })),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn each_layers_fail_open_trace_survives() {
        let keys = MemoryKeyStore::new();
        let k = key(&keys, Some("free")).await;
        let gate = Gate::builder(Authenticator::new(keys.clone()), Down)
            .plans(PlanSet::presets())
            .quotas(Down)
            .limiter_fail_mode(FailMode::Open)
            .quota_fail_mode(FailMode::Open)
            .build();
        // The router's layer fails open on the limiter, the route's on the
        // quota store: the handler and the response see both.
        let app: Router = Router::new()
            .route(
                "/n",
                get(|Extension(f): Extension<FailedOpen>| async move {
                    format!("{} {}", f.limiter.is_some(), f.quota.is_some())
                })
                .route_layer(gate.layer().quota("email")),
            )
            .layer(gate.layer());
        let res = app.oneshot(call("/n", &k)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let f = res.extensions().get::<FailedOpen>().cloned().unwrap();
        assert_eq!((f.limiter.is_some(), f.quota.is_some()), (true, true));
        assert_eq!(text(res).await, "true true", "the handler's view");
    }

    /// Nested layers of one gate: a check is made under the mode of the
    /// layer that makes it (its route's, else the gate's; an outer layer's
    /// is not inherited), so an inner route's `Open` cannot undo the
    /// router's layer failing closed, which checks first.
    #[tokio::test]
    async fn each_check_fails_as_the_layer_that_makes_it_says() {
        let f = super::fixture().await;
        f.switch.set_down();
        let gate = Gate::builder(Authenticator::new(f.keys.clone()), flaky_limiter(&f.switch))
            .plans(PlanSet::presets())
            .quotas(Down)
            .build();
        let inner =
            |layer: keygate::tower::GateLayer<_, _, _>| get(|| async { "in" }).route_layer(layer);
        let open = gate.layer().limiter_fail_mode(FailMode::Open).quota_fail_mode(FailMode::Open);
        let routes = || {
            Router::new()
                // The router's check stands (same plan, no cost of its own),
                // made under the router's mode: a route's own mode concerns
                // only checks the route makes.
                .route("/plain", inner(gate.layer()))
                .route("/plain-closed", inner(gate.layer().limiter_fail_mode(FailMode::Closed)))
                // Checked again here, under the gate's mode, or this route's.
                .route("/costly", inner(gate.layer().cost(2)))
                .route("/costly-open", inner(open.clone().cost(2)))
                // Counted here, likewise.
                .route("/counted", inner(gate.layer().quota("email")))
                .route("/counted-open", inner(open.clone().quota("webhook")))
        };
        let under_open: Router = routes().layer(open.clone().quota("email"));
        let paths =
            ["/plain", "/plain-closed", "/costly", "/costly-open", "/counted", "/counted-open"];
        for path in paths {
            let res = under_open.clone().oneshot(call(path, &f.key)).await.unwrap();
            // The router's quota failure, let through, in every trace.
            let failed = res.extensions().get::<FailedOpen>().expect("the router's outage");
            assert!(failed.quota.is_some(), "{path}: {failed:?}");
            if path.ends_with("-open") || path.starts_with("/plain") {
                assert_eq!(res.status(), StatusCode::OK, "{path} under an open router layer");
                assert!(failed.limiter.is_some(), "{path}: {failed:?}");
                continue;
            }
            assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
            let refused = res.extensions().get::<Refused>().unwrap();
            let reason = refused.reason();
            match path {
                "/costly" => assert!(matches!(reason, Refusal::LimiterBackend(_)), "{reason:?}"),
                _ => assert!(matches!(reason, Refusal::QuotaBackend(_)), "{reason:?}"),
            }
        }
        // Under a router layer failing closed (the gate's mode), the inner
        // route's `Open` is never reached.
        let under_closed: Router = routes().layer(gate.layer());
        for path in ["/plain", "/costly-open", "/counted-open"] {
            let res = under_closed.clone().oneshot(call(path, &f.key)).await.unwrap();
            assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
            let refused = res.extensions().get::<Refused>().unwrap();
            assert!(matches!(refused.reason(), Refusal::LimiterBackend(_)), "{path}: {refused:?}");
        }
    }

    /// Route-plan keys (`{record id}#{plan}`), or the others.
    fn route_plan_keys(key: &str) -> bool {
        key.contains('#')
    }
    fn plain_keys(key: &str) -> bool {
        !key.contains('#')
    }
    fn no_keys(_: &str) -> bool {
        false
    }
    fn all_keys(_: &str) -> bool {
        true
    }

    fn partial_gate(
        keys: &MemoryKeyStore,
        down: fn(&str) -> bool,
        refunds_down: bool,
    ) -> Gate<MemoryKeyStore, Failing<FakeClock>, MemoryQuotaStore, FakeClock> {
        partial_gate_failing(keys, down, refunds_down, FailMode::Open)
    }

    /// [`partial_gate`] with the limiter failing as `mode` says.
    fn partial_gate_failing(
        keys: &MemoryKeyStore,
        down: fn(&str) -> bool,
        refunds_down: bool,
        mode: FailMode,
    ) -> Gate<MemoryKeyStore, Failing<FakeClock>, MemoryQuotaStore, FakeClock> {
        let clock = FakeClock::at_2026();
        let mem = MemoryLimiter::with_clock(100, clock.clone());
        let store = Failing::new(mem, move |key, _| down(key)).refunds_failing(refunds_down);
        Gate::builder(Authenticator::new(keys.clone()).clock(clock), store)
            .plans(PlanSet::presets())
            .default_plan("hobby")
            .limiter_fail_mode(mode)
            .build()
    }

    #[tokio::test]
    async fn a_charge_given_back_is_not_reported_or_left_to_refund_again() {
        // The route layer gives the router's hobby unit back, then its own
        // (pro) check fails open: no decision, no headers; the router's
        // spent decision is neither reported nor handed to the handler.
        let keys = MemoryKeyStore::new();
        let k = key(&keys, None).await;
        let gate = partial_gate(&keys, route_plan_keys, false);
        let app: Router = Router::new()
            .route("/h", get(|| async { "in" }))
            .route(
                "/pro",
                get(
                    |d: Option<Extension<Decision>>,
                     r: Option<Extension<keygate::tower::Refund>>| async move {
                        format!("{} {}", d.is_some(), r.is_some())
                    },
                )
                .route_layer(gate.layer().plan("pro")),
            )
            .layer(gate.layer());
        let res = app.clone().oneshot(call("/pro", &k)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert!(res.extensions().get::<FailedOpen>().is_some_and(|f| f.limiter.is_some()));
        assert_eq!(header(&res, "x-ratelimit-remaining"), Vec::<String>::new());
        assert_eq!(
            text(res).await,
            "false false",
            "the handler got no spent decision, nor its refund to give back twice"
        );
        // The hobby plan's 3 a second are all there.
        for _ in 0..3 {
            assert_eq!(app.clone().oneshot(call("/h", &k)).await.unwrap().status(), StatusCode::OK);
        }
        let res = app.oneshot(call("/h", &k)).await.unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    }

    #[tokio::test]
    async fn a_refund_that_fails_is_traced() {
        let keys = MemoryKeyStore::new();
        let k = key(&keys, None).await;
        let gate = partial_gate(&keys, no_keys, true);
        let app: Router = Router::new()
            .route("/c", get(|| async { "in" }).route_layer(gate.layer().cost(1)))
            .layer(gate.layer());
        let res = app.oneshot(call("/c", &k)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        // Charged under both (the refund failed), and said so.
        assert_eq!(header(&res, "x-ratelimit-remaining"), ["1"]);
        let f = res.extensions().get::<FailedOpen>().unwrap();
        assert!(f.refund.is_some() && f.limiter.is_none());
    }

    #[tokio::test]
    async fn a_handlers_own_401_keeps_the_limit_headers() {
        // Only an inner layer's 401 (a key refused there) goes without.
        let keys = MemoryKeyStore::new();
        let k = key(&keys, Some("hobby")).await;
        let gate = memory_gate(&keys);
        let app: Router = Router::new().route(
            "/x",
            get(|| async { (StatusCode::UNAUTHORIZED, "step-up required") })
                .route_layer(gate.layer()),
        );
        let res = app.oneshot(call("/x", &k)).await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(header(&res, "x-ratelimit-limit"), ["3"], "charged, so reported");
    }

    #[tokio::test]
    async fn a_handlers_own_rate_limit_fields_are_not_mixed_with_the_layers() {
        // A handler reporting a limit of its own (a per-endpoint limiter)
        // in some of the `X-RateLimit-*` fields, or in `RateLimit` alone:
        // its values stand, and the layer adds none of that family, or the
        // set would describe no limit at all (the handler's Limit beside
        // the gate's Remaining and Reset). Families it left alone are added.
        let keys = MemoryKeyStore::new();
        let k = key(&keys, Some("hobby")).await;
        let gate = Gate::builder(Authenticator::new(keys.clone()), MemoryLimiter::new(100))
            .plans(PlanSet::presets())
            .rate_limit_headers(keygate::limit::HeaderSet::all())
            .build();
        let own_x =
            || async { ([("x-ratelimit-limit", "1000"), ("x-ratelimit-remaining", "999")], "in") };
        let own_ietf = || async { ([("ratelimit", "\"mine\";r=9;t=5")], "in") };
        let app: Router = Router::new()
            .route("/x", get(own_x).route_layer(gate.layer()))
            .route("/i", get(own_ietf).route_layer(gate.layer()));
        let res = app.clone().oneshot(call("/x", &k)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(header(&res, "x-ratelimit-limit"), ["1000"]);
        assert_eq!(header(&res, "x-ratelimit-remaining"), ["999"]);
        assert_eq!(header(&res, "x-ratelimit-reset"), Vec::<String>::new(), "not the gate's");
        assert_eq!(header(&res, "ratelimit-policy"), [r#""default";q=3;w=1"#]);
        let res = app.oneshot(call("/i", &k)).await.unwrap();
        assert_eq!(header(&res, "ratelimit"), [r#""mine";r=9;t=5"#]);
        assert_eq!(header(&res, "ratelimit-policy"), Vec::<String>::new(), "not the gate's");
        assert_eq!(header(&res, "x-ratelimit-limit"), ["3"]);
    }

    #[tokio::test]
    async fn an_inner_refusal_carries_the_outer_layers_fail_open_trace() {
        let keys = MemoryKeyStore::new();
        let k = key(&keys, Some("hobby")).await;
        let gate = partial_gate(&keys, all_keys, false);
        let app: Router = Router::new()
            .route(
                "/k",
                get(|| async { "in" }).route_layer(gate.layer().require("api_keys:read").unwrap()),
            )
            .layer(gate.layer());
        let res = app.oneshot(call("/k", &k)).await.unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        let refused = res.extensions().get::<Refused>().unwrap();
        assert!(refused.failed_open().is_some_and(|f| f.limiter.is_some()));
    }

    #[tokio::test]
    async fn a_route_layers_403_after_authentication_keeps_the_routers_headers() {
        // Another tenant's route: a 403 (not a 401) with an `Auth` reason.
        // The router charged the request, so its headers are reported.
        let keys = MemoryKeyStore::new();
        let k = key(&keys, Some("hobby")).await;
        let gate = memory_gate(&keys);
        let other = |_: &axum::http::request::Parts| {
            let ws = Tenant::workspace("ws_other".parse().unwrap());
            Ok(keygate::auth::Target::any().tenant(ws))
        };
        // The route answers in its own style: only a 401 takes the router's
        // (an unknown key's comes from there; see below).
        let flat = gate.layer().target(other).body_style(keygate::http::BodyStyle::Flat);
        let app: Router =
            Router::new().route("/w", get(|| async { "in" }).route_layer(flat)).layer(gate.layer());
        let res = app.oneshot(call("/w", &k)).await.unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        assert!(matches!(res.extensions().get::<Refused>().unwrap().reason(), Refusal::Auth(_)));
        assert_eq!(header(&res, "x-ratelimit-remaining"), ["2"]);
        let body: serde_json::Value = serde_json::from_str(&text(res).await).unwrap();
        assert!(body["error"].is_string(), "the route's flat style, not nested: {body}");
    }

    #[tokio::test]
    async fn a_503_after_a_refund_that_failed_still_reports_it() {
        let keys = MemoryKeyStore::new();
        let k = key(&keys, None).await;
        let gate = partial_gate_failing(&keys, route_plan_keys, true, FailMode::Closed);
        let app: Router = Router::new()
            .route("/pro", get(|| async { "in" }).route_layer(gate.layer().plan("pro")))
            .layer(gate.layer());
        let res = app.oneshot(call("/pro", &k)).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        let refused = res.extensions().get::<Refused>().unwrap();
        assert!(refused.failed_open().is_some_and(|f| f.refund.is_some()));
    }

    #[tokio::test]
    async fn three_levels_charge_once_and_report_the_innermost() {
        // Router (default hobby), group `.plan("pro")`, route
        // `.plan("enterprise")`: one charge, one set of headers, the
        // handler's decision the route's; hobby and pro given back.
        let keys = MemoryKeyStore::new();
        let k = key(&keys, None).await;
        let gate = frozen_gate(&keys, "hobby");
        let handler = |Extension(d): Extension<Decision>| async move {
            format!("{} {}", d.limit(), d.remaining())
        };
        let group: Router = Router::new()
            .route("/e", get(handler).route_layer(gate.layer().plan("enterprise")))
            .route("/p", get(handler))
            .layer(gate.layer().plan("pro"));
        let app: Router =
            Router::new().route("/h", get(handler)).nest("/g", group).layer(gate.layer());
        for i in 1..=5u32 {
            let res = app.clone().oneshot(call("/g/e", &k)).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            assert_eq!(header(&res, "x-ratelimit-limit"), ["100"]);
            assert_eq!(header(&res, "x-ratelimit-remaining"), [(100 - i).to_string()]);
            assert_eq!(text(res).await, format!("100 {}", 100 - i));
        }
        let res = app.clone().oneshot(call("/g/p", &k)).await.unwrap();
        assert_eq!(text(res).await, "10 9", "pro untouched by /g/e");
        let res = app.oneshot(call("/h", &k)).await.unwrap();
        assert_eq!(text(res).await, "3 2", "hobby given back each time");
    }

    #[tokio::test]
    async fn a_route_gives_back_the_routers_charge_through_a_group_layer_between() {
        // Router (default hobby), a group's layer that only requires a
        // scope, the route `.plan("pro")`: the group takes the router's
        // charge as its own, and the route gives that back, through it.
        let keys = MemoryKeyStore::new();
        let k = key(&keys, None).await;
        let gate = frozen_gate(&keys, "hobby");
        let group: Router = Router::new()
            .route("/pro", get(|| async { "in" }).route_layer(gate.layer().plan("pro")))
            .layer(gate.layer().require("events:read").unwrap());
        let app: Router =
            Router::new().route("/h", get(|| async { "in" })).nest("/g", group).layer(gate.layer());
        let res = app.clone().oneshot(call("/g/pro", &k)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(header(&res, "x-ratelimit-limit"), ["10"]);
        // The hobby plan's 3 a second are all there.
        for remaining in ["2", "1", "0"] {
            let res = app.clone().oneshot(call("/h", &k)).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            assert_eq!(header(&res, "x-ratelimit-remaining"), [remaining]);
        }
    }

    #[tokio::test]
    async fn another_gates_decision_is_not_taken_for_an_outer_layers() {
        // Gate B outside gate A. A's router layer fails open (no decision
        // of its own); A's route layer, under another plan, must not give
        // B's decision back nor take it from the handler.
        let keys = MemoryKeyStore::new();
        let k = key(&keys, Some("hobby")).await;
        let b = memory_gate(&keys);
        let a = partial_gate(&keys, all_keys, false);
        let app: Router = Router::new()
            .route(
                "/r",
                get(|d: Option<Extension<Decision>>| async move { d.is_some().to_string() })
                    .route_layer(a.layer().cost(2)),
            )
            .layer(a.layer())
            .layer(b.layer());
        let res = app.oneshot(call("/r", &k)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let f = res.extensions().get::<FailedOpen>().cloned().unwrap();
        assert!(f.limiter.is_some() && f.refund.is_none(), "{f:?}");
        assert_eq!(text(res).await, "true", "B's decision reaches the handler");
    }

    #[tokio::test]
    async fn a_limit_checked_again_inside_clears_the_routers_failure() {
        // The router's check fails open; the route's, under its own plan,
        // works: the request was rate-limited, and no trace says not. Also
        // with a group's layer between (the router's plan): the take-over
        // reaches through it to the router.
        let keys = MemoryKeyStore::new();
        let k = key(&keys, None).await;
        let gate = partial_gate(&keys, plain_keys, false);
        for group_between in [false, true] {
            let routes: Router = Router::new().route(
                "/pro",
                get(|f: Option<Extension<FailedOpen>>| async move { f.is_some().to_string() })
                    .route_layer(gate.layer().plan("pro")),
            );
            let routes = if group_between {
                routes.layer(gate.layer().require("events:read").unwrap())
            } else {
                routes
            };
            let app: Router = Router::new().nest("/g", routes).layer(gate.layer());
            let res = app.oneshot(call("/g/pro", &k)).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            let remaining = if group_between { "8" } else { "9" }; // pro, once per round
            assert_eq!(header(&res, "x-ratelimit-remaining"), [remaining]);
            assert!(res.extensions().get::<FailedOpen>().is_none(), "group: {group_between}");
            assert_eq!(text(res).await, "false", "nor in the request");
        }
    }

    #[tokio::test]
    async fn an_inner_refusal_after_a_take_over_drops_the_routers_limiter_failure() {
        // The router's check fails open; the route's own (pro) check
        // works, then the route refuses (a scope, then its own limit): the
        // request was rate-limited, and no trace may say it was not.
        let keys = MemoryKeyStore::new();
        let k = key(&keys, None).await;
        let gate = partial_gate(&keys, plain_keys, false);
        let scoped = gate.layer().plan("pro").require("api_keys:read").unwrap();
        let app: Router = Router::new()
            .route("/scope", get(|| async { "in" }).route_layer(scoped))
            .route("/cost", get(|| async { "in" }).route_layer(gate.layer().plan("pro").cost(11)))
            .layer(gate.layer());
        for (path, status) in
            [("/scope", StatusCode::FORBIDDEN), ("/cost", StatusCode::TOO_MANY_REQUESTS)]
        {
            let res = app.clone().oneshot(call(path, &k)).await.unwrap();
            assert_eq!(res.status(), status, "{path}");
            let refused = res.extensions().get::<Refused>().unwrap();
            assert!(
                refused.failed_open().is_none_or(|f| f.limiter.is_none()),
                "{path}: {:?}",
                refused.failed_open()
            );
            let f = res.extensions().get::<FailedOpen>();
            assert!(f.is_none_or(|f| f.limiter.is_none()), "{path}: {f:?}");
        }
    }

    #[tokio::test]
    async fn an_inner_401_answers_as_an_unknown_keys_401_whatever_the_routes_style() {
        // An unknown key is refused by the router's layer, in its style; a
        // valid key of a format the route refuses must get the very same
        // body, or the body tells valid keys from invalid ones.
        let keys = MemoryKeyStore::new();
        let valid = key(&keys, Some("hobby")).await;
        let unknown = format!("nh_{}", "0".repeat(64));
        let gate = memory_gate(&keys);
        let flat = gate.layer().formats(["sk"]).body_style(keygate::http::BodyStyle::Flat);
        let app: Router =
            Router::new().route("/r", get(|| async { "in" }).route_layer(flat)).layer(gate.layer());
        let mut answers = Vec::new();
        for k in [&unknown, &valid] {
            let res = app.clone().oneshot(call("/r", k)).await.unwrap();
            assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
            let challenge = header(&res, "www-authenticate");
            answers.push((challenge, text(res).await));
        }
        assert_eq!(answers[0], answers[1]);
    }

    #[tokio::test]
    async fn a_route_taking_keys_only_in_x_api_key_challenges_for_that_header() {
        // `nh` keys come only in `X-API-Key` (the default header rules): a
        // Bearer challenge would name a scheme the route refuses.
        let keys = MemoryKeyStore::new();
        let valid = key(&keys, Some("hobby")).await;
        let gate = memory_gate(&keys);
        let app: Router = Router::new()
            .route("/nh", get(|| async { "in" }).route_layer(gate.layer().formats(["nh"])))
            .route("/any", get(|| async { "in" }).route_layer(gate.layer()))
            .route(
                "/write",
                get(|| async { "in" })
                    .route_layer(gate.layer().formats(["nh"]).require("events:write").unwrap()),
            );
        let ask = |path: &'static str, key: Option<&str>| {
            let mut req = Request::get(path);
            if let Some(k) = key {
                req = req.header("x-api-key", k);
            }
            app.clone().oneshot(req.body(Body::empty()).unwrap())
        };
        let unknown = format!("nh_{}", "0".repeat(64));
        let res = ask("/nh", None).await.unwrap();
        assert_eq!(header(&res, "www-authenticate"), [r#"ApiKey header="X-API-Key""#]);
        let res = ask("/nh", Some(&unknown)).await.unwrap();
        assert_eq!(
            header(&res, "www-authenticate"),
            [r#"ApiKey header="X-API-Key", error="invalid_token""#]
        );
        let res = ask("/write", Some(&valid)).await.unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            header(&res, "www-authenticate"),
            [r#"ApiKey header="X-API-Key", error="insufficient_scope", scope="events:write""#]
        );
        // A route that also takes Bearer formats keeps the Bearer challenge.
        let res = ask("/any", None).await.unwrap();
        assert_eq!(header(&res, "www-authenticate"), ["Bearer"]);
        // A target function that narrows the formats to `nh` narrows the
        // challenge too.
        let narrowed = gate.layer().target(|_| Ok(keygate::auth::Target::any().formats(["nh"])));
        let app: Router = Router::new().route("/t", get(|| async { "in" }).route_layer(narrowed));
        let res = app.oneshot(Request::get("/t").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(header(&res, "www-authenticate"), [r#"ApiKey header="X-API-Key""#]);
        // A refusal through `Gate::admit` and `Gate::respond` challenges as
        // its route does.
        let layer = gate.layer().formats(["nh"]);
        let refused = gate
            .admit(layer.route(), &axum::http::HeaderMap::new(), &keygate::auth::Target::any())
            .await
            .unwrap_err();
        let res = gate.respond::<Body>(refused);
        assert_eq!(header(&res, "www-authenticate"), [r#"ApiKey header="X-API-Key""#]);
        // A gate whose authenticator knows `nh` keys alone challenges so on
        // every route, formats named or not.
        let only_nh = keygate::FormatSet::new([NH]).unwrap();
        let gate = Gate::builder(
            Authenticator::new(keys.clone()).formats(only_nh),
            MemoryLimiter::new(100),
        )
        .build();
        let app: Router =
            Router::new().route("/", get(|| async { "in" }).route_layer(gate.layer()));
        let res = app.oneshot(Request::get("/").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(header(&res, "www-authenticate"), [r#"ApiKey header="X-API-Key""#]);
    }

    #[tokio::test]
    async fn an_authorization_scheme_other_than_bearer_is_answered_as_no_key() {
        // RFC 6750 §3.1: a request that "attempted using an unsupported
        // authentication method" lacks authentication information, and its
        // challenge carries no error code; no API key was presented, so the
        // body says the key is missing. The logs still see why.
        let keys = MemoryKeyStore::new();
        let gate = memory_gate(&keys);
        let app: Router = Router::new()
            .route("/nh", get(|| async { "in" }).route_layer(gate.layer().formats(["nh"])))
            .route("/any", get(|| async { "in" }).route_layer(gate.layer()));
        for (path, challenge) in [("/any", "Bearer"), ("/nh", r#"ApiKey header="X-API-Key""#)] {
            for value in ["Basic dXNlcjpwYXNz", "Token abc", "Digest username=\"u\""] {
                let req = Request::get(path).header("authorization", value);
                let res = app.clone().oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
                assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{path} {value}");
                assert_eq!(header(&res, "www-authenticate"), [challenge], "{path} {value}");
                let refused = res.extensions().get::<Refused>().unwrap();
                assert_eq!(refused.rejection(), &keygate::http::Rejection::MissingCredentials);
                assert!(
                    matches!(
                        refused.reason(),
                        Refusal::Auth(AuthError::Credential(
                            keygate::auth::CredentialError::NotBearer
                        ))
                    ),
                    "{path} {value}: {}",
                    refused.reason()
                );
            }
        }
    }

    #[tokio::test]
    async fn a_request_sent_twice_between_nested_layers_gives_the_outer_charge_back_once() {
        // A middleware between the layers that sends the request twice (a
        // retry layer): each copy is charged the route's 2, and the
        // router's unit they share is given back once.
        async fn twice(
            req: Request<Body>,
            next: axum::middleware::Next,
        ) -> axum::response::Response {
            let (parts, body) = req.into_parts();
            let copy = Request::from_parts(parts.clone(), Body::empty());
            assert_eq!(next.clone().run(copy).await.status(), StatusCode::OK);
            next.run(Request::from_parts(parts, body)).await
        }
        let keys = MemoryKeyStore::new();
        let k = key(&keys, Some("free")).await; // 5 a minute
        let gate = frozen_gate(&keys, "hobby");
        let app: Router = Router::new()
            .route("/costly", get(|| async { "in" }).route_layer(gate.layer().cost(2)))
            .layer(axum::middleware::from_fn(twice))
            .layer(gate.layer());
        let res = app.oneshot(call("/costly", &k)).await.unwrap();
        assert_eq!(header(&res, "x-ratelimit-remaining"), ["1"], "not 2: given back twice");
    }

    #[tokio::test]
    async fn a_handlers_401_through_gate_respond_keeps_the_limit_headers() {
        // A step-up check in the handler, answered with the gate's own
        // `respond`: the layer charged, so its headers are reported.
        let keys = MemoryKeyStore::new();
        let k = key(&keys, Some("hobby")).await;
        let gate = memory_gate(&keys);
        let inner = gate.clone();
        let handler = move |req: Request<Body>| async move {
            let step_up = inner.layer().formats(["sk"]);
            let target = keygate::auth::Target::any();
            match inner.admit(step_up.route(), req.headers(), &target).await {
                Ok(_) => axum::response::Response::new(Body::from("in")),
                Err(r) => inner.respond::<Body>(r),
            }
        };
        let app: Router = Router::new().route("/s", get(handler).route_layer(gate.layer()));
        let res = app.oneshot(call("/s", &k)).await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(header(&res, "x-ratelimit-remaining"), ["2"]);
    }
}

/// Two gates nested, and a cookie taken by an outer layer only.
mod across_gates {
    use super::*;
    use keygate::format::{NH, SK};
    use keygate::http::BodyStyle;
    use keygate::tower::FailedOpen;

    async fn nh_key(keys: &MemoryKeyStore) -> String {
        let ws = Tenant::workspace("ws_t".parse().unwrap());
        // Pro: ten a second, room for both routes' charges.
        let new = NewKey::new("t", NH, ws).plan("pro").scopes(&["events:read"]).unwrap();
        KeyManager::new(keys.clone()).create(new).await.unwrap().key().expose_secret().to_owned()
    }

    fn call(path: &'static str, key: &str) -> Request<Body> {
        Request::get(path).header("x-api-key", key).body(Body::empty()).unwrap()
    }

    /// Gate B (outside) fails open on a limiter that is down; gate A
    /// (inside) works.
    fn gates(
        keys: &MemoryKeyStore,
    ) -> (Gate<MemoryKeyStore, Down>, Gate<MemoryKeyStore, MemoryLimiter>) {
        let b = Gate::builder(Authenticator::new(keys.clone()), Down)
            .plans(PlanSet::presets())
            .limiter_fail_mode(FailMode::Open)
            .build();
        let a = Gate::builder(Authenticator::new(keys.clone()), MemoryLimiter::new(100))
            .plans(PlanSet::presets())
            .build();
        (b, a)
    }

    #[tokio::test]
    async fn a_take_over_inside_one_gate_keeps_another_gates_limiter_failure() {
        // A's route layer takes A's charge over and checks A's limit again:
        // B's limit was never checked, on a refusal or on success.
        let keys = MemoryKeyStore::new();
        let k = nh_key(&keys).await;
        let (b, a) = gates(&keys);
        let scoped = a.layer().cost(2).require("api_keys:read").unwrap();
        let told = |f: Option<Extension<FailedOpen>>| async move {
            f.is_some_and(|Extension(f)| f.limiter.is_some()).to_string()
        };
        let app: Router = Router::new()
            .route("/refused", get(|| async { "in" }).route_layer(scoped))
            .route("/ok", get(told).route_layer(a.layer().cost(2)))
            .layer(a.layer())
            .layer(b.layer());
        let res = app.clone().oneshot(call("/refused", &k)).await.unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        assert!(res.extensions().get::<FailedOpen>().is_some_and(|f| f.limiter.is_some()));
        let refused = res.extensions().get::<Refused>().unwrap();
        assert!(refused.failed_open().is_some_and(|f| f.limiter.is_some()), "{refused:?}");
        let res = app.oneshot(call("/ok", &k)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(text(res).await, "true", "the handler is told B's limiter ran");
    }

    #[tokio::test]
    async fn a_take_over_from_another_layer_keeps_the_routers_failure() {
        // A's router layer fails open; B's layer between means A's group
        // layer does not vouch and charges afresh; A's route layer takes
        // the group's charge over. The router's failure was never checked
        // again: the handler and the response both keep it.
        let keys = MemoryKeyStore::new();
        let k = nh_key(&keys).await;
        let a = Gate::builder(Authenticator::new(keys.clone()), {
            // The first check fails.
            let first = AtomicBool::new(true);
            Failing::new(MemoryLimiter::new(100), move |_, _| first.swap(false, Ordering::SeqCst))
        })
        .plans(PlanSet::presets())
        .limiter_fail_mode(FailMode::Open)
        .build();
        let b = Gate::builder(Authenticator::new(keys.clone()), MemoryLimiter::new(100))
            .plans(PlanSet::presets())
            .build();
        let told = |f: Option<Extension<FailedOpen>>| async move {
            f.is_some_and(|Extension(f)| f.limiter.is_some()).to_string()
        };
        let app: Router = Router::new()
            .route("/ok", get(told).route_layer(a.layer().cost(2)))
            .layer(a.layer())
            .layer(b.layer())
            .layer(a.layer());
        let res = app.oneshot(call("/ok", &k)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let traced = res.extensions().get::<FailedOpen>().is_some_and(|f| f.limiter.is_some());
        assert_eq!(text(res).await, "true", "the handler is told the router's limiter failed");
        assert!(traced, "the response's trace keeps it too");
    }

    /// Gate A failing open on checks of `cost`, and gate B answering with
    /// the IETF headers only (so A's `X-RateLimit-*` are A's alone).
    fn a_and_b(
        keys: &MemoryKeyStore,
        cost: u32,
    ) -> (Gate<MemoryKeyStore, Failing>, Gate<MemoryKeyStore, MemoryLimiter>) {
        let a = Gate::builder(
            Authenticator::new(keys.clone()),
            Failing::new(MemoryLimiter::new(100), move |_, c| c == cost),
        )
        .plans(PlanSet::presets())
        .limiter_fail_mode(FailMode::Open)
        .build();
        let ietf_only =
            keygate::limit::HeaderSet { x_ratelimit: false, ietf: true, retry_after: false };
        let b = Gate::builder(Authenticator::new(keys.clone()), MemoryLimiter::new(100))
            .plans(PlanSet::presets())
            .rate_limit_headers(ietf_only)
            .build();
        (a, b)
    }

    #[tokio::test]
    async fn the_routers_failure_stands_where_a_group_of_its_gate_failed_too() {
        // A's router and group layers (B between: the group does not
        // vouch) both fail open; the route takes the group's charge over:
        // the router's limit was never checked again, on every side.
        let keys = MemoryKeyStore::new();
        let k = nh_key(&keys).await;
        let (a, b) = a_and_b(&keys, 1);
        let told = |f: Option<Extension<FailedOpen>>| async move {
            f.is_some_and(|Extension(f)| f.limiter.is_some()).to_string()
        };
        let scoped = a.layer().cost(2).require("api_keys:read").unwrap();
        let app: Router = Router::new()
            .route("/ok", get(told).route_layer(a.layer().cost(2)))
            .route("/refused", get(|| async { "in" }).route_layer(scoped))
            .layer(a.layer())
            .layer(b.layer())
            .layer(a.layer());
        let res = app.clone().oneshot(call("/ok", &k)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let traced = res.extensions().get::<FailedOpen>().is_some_and(|f| f.limiter.is_some());
        let handler = text(res).await;
        let res = app.oneshot(call("/refused", &k)).await.unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        let r_traced = res.extensions().get::<FailedOpen>().is_some_and(|f| f.limiter.is_some());
        let refused = res.extensions().get::<Refused>().unwrap();
        let r_refused = refused.failed_open().is_some_and(|f| f.limiter.is_some());
        assert_eq!(
            (handler.as_str(), traced, r_refused, r_traced),
            ("true", true, true, true),
            "(handler, response trace, Refused::failed_open, refusal's response trace)"
        );
    }

    #[tokio::test]
    async fn a_take_over_stops_at_the_layer_whose_charge_it_took() {
        // The route takes over the group's fresh charge (the group did not
        // vouch, B being between): the router's unit stays spent, so its
        // headers are reported.
        let keys = MemoryKeyStore::new();
        let k = nh_key(&keys).await;
        let (a, b) = a_and_b(&keys, 2);
        let app: Router = Router::new()
            .route("/ok", get(|| async { "in" }).route_layer(a.layer().cost(2)))
            .layer(a.layer())
            .layer(b.layer())
            .layer(a.layer());
        let res = app.oneshot(call("/ok", &k)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert!(res.headers().get("x-ratelimit-remaining").is_some(), "{:?}", res.headers());
    }

    #[tokio::test]
    async fn a_valid_cookie_key_refused_inside_answers_as_an_unknown_one() {
        // The router's layer takes the cookie, the route's does not: a valid
        // key there is admitted outside and missing inside; an unknown one
        // is refused outside. The client must not tell them apart.
        let keys = MemoryKeyStore::new();
        let ws = Tenant::workspace("ws_t".parse().unwrap());
        let sk = KeyManager::new(keys.clone()).create(NewKey::new("b", SK, ws)).await.unwrap();
        let valid = sk.key().expose_secret().to_owned();
        let unknown = format!("sk_live_{}", "A".repeat(32));
        for style in [BodyStyle::Nested, BodyStyle::Flat] {
            let gate = Gate::builder(Authenticator::new(keys.clone()), MemoryLimiter::new(100))
                .plans(PlanSet::presets())
                .body_style(style)
                .build();
            let app: Router = Router::new()
                .route("/api", get(|| async { "in" }).route_layer(gate.layer()))
                .layer(gate.layer().cookie("sess"));
            let mut seen = Vec::new();
            for k in [&unknown, &valid] {
                let req = Request::get("/api").header("cookie", format!("sess={k}"));
                let res = app.clone().oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
                assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
                let www = res.headers()["www-authenticate"].to_str().unwrap().to_owned();
                seen.push((www, text(res).await));
            }
            assert_eq!(seen[0], seen[1], "{style:?}");
        }
    }
}

/// A handler giving back what the layer charged for its request, through
/// the `Refund` handle the layer leaves in the request's extensions.
mod refund {
    use super::*;
    use axum::routing::MethodRouter;
    use keygate::clock::FakeClock;
    use keygate::tower::Refund;

    use super::nested::{frozen_gate, key};

    /// The presets on a frozen clock (no unit is earned back between two
    /// requests), `hobby` the plan of keys naming none.
    fn gate(
        keys: &MemoryKeyStore,
    ) -> Gate<MemoryKeyStore, MemoryLimiter<String, FakeClock>, MemoryQuotaStore, FakeClock> {
        frozen_gate(keys, "hobby")
    }

    /// `GET path` with the key, and its `X-RateLimit-Remaining`.
    async fn remaining(app: &Router, path: &str, key: &str) -> (StatusCode, String) {
        let req = Request::get(path).header("x-api-key", key).body(Body::empty()).unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        let left = res.headers().get("x-ratelimit-remaining").map(|v| v.to_str().unwrap());
        (res.status(), left.unwrap_or("none").to_owned())
    }

    /// A handler that fails before doing any work and gives back what its
    /// request was charged, then tries again through a copy of the handle.
    fn fails() -> MethodRouter {
        get(|Extension(refund): Extension<Refund>| async move {
            assert!(refund.refundable() > 0);
            refund.give_back(u32::MAX).await.unwrap();
            assert_eq!(refund.clone().refundable(), 0, "copies share the charge");
            refund.clone().give_back(u32::MAX).await.unwrap(); // nothing left
            StatusCode::SERVICE_UNAVAILABLE
        })
    }

    fn ok() -> MethodRouter {
        get(|| async { "in" })
    }

    /// Five calls: ok, failing, ok, failing, ok. The failing ones leave the
    /// key's units as they were; their own responses report the check as
    /// the layer made it (before the handler gave its units back).
    async fn five_calls(app: &Router, key: &str) -> Vec<(StatusCode, String)> {
        let mut seen = Vec::new();
        for path in ["/ok", "/fail", "/ok", "/fail", "/ok"] {
            seen.push(remaining(app, path, key).await);
        }
        seen
    }

    fn counted(remaining: [&str; 5]) -> Vec<(StatusCode, String)> {
        let status = [200, 503, 200, 503, 200].map(|s| StatusCode::from_u16(s).unwrap());
        status.into_iter().zip(remaining.map(str::to_owned)).collect()
    }

    #[tokio::test]
    async fn a_failing_handler_gives_back_its_unit_under_the_keys_plan() {
        let keys = MemoryKeyStore::new();
        let k = key(&keys, Some("free")).await; // 5 a minute
        let gate = gate(&keys);
        let app: Router = Router::new()
            .route("/ok", ok().route_layer(gate.layer()))
            .route("/fail", fails().route_layer(gate.layer()));
        assert_eq!(five_calls(&app, &k).await, counted(["4", "3", "3", "2", "2"]));
    }

    #[tokio::test]
    async fn a_failing_handler_gives_back_its_unit_under_a_routes_plan() {
        // A key naming no plan, on routes under `pro` (the gate's default
        // being `hobby`): the units are the key's units of `pro`.
        let keys = MemoryKeyStore::new();
        let k = key(&keys, None).await;
        let gate = gate(&keys);
        let pro = gate.layer().plan("pro"); // 10 a second
        let app: Router = Router::new()
            .route("/ok", ok().route_layer(pro.clone()))
            .route("/fail", fails().route_layer(pro));
        assert_eq!(five_calls(&app, &k).await, counted(["9", "8", "8", "7", "7"]));
    }

    #[tokio::test]
    async fn a_failing_handler_gives_back_the_charge_that_stands_under_nested_layers() {
        let keys = MemoryKeyStore::new();
        let gate = gate(&keys);
        // The router's charge, not taken over: the route adds a scope.
        let k = key(&keys, Some("free")).await;
        let scoped = gate.layer().require("events:read").unwrap();
        let app: Router = Router::new()
            .route("/ok", ok().route_layer(scoped.clone()))
            .route("/fail", fails().route_layer(scoped))
            .layer(gate.layer());
        assert_eq!(five_calls(&app, &k).await, counted(["4", "3", "3", "2", "2"]));
        // The route's own cost: it gave the router's unit back and charged
        // its 2, which the handler gives back.
        let k = key(&keys, Some("free")).await;
        let app: Router = Router::new()
            .route("/ok", ok().route_layer(gate.layer()))
            .route("/fail", fails().route_layer(gate.layer().cost(2)))
            .layer(gate.layer());
        assert_eq!(five_calls(&app, &k).await, counted(["4", "2", "3", "1", "2"]));
        // A route's plan inside the router's, for a key naming none: the
        // route charges `{id}#enterprise`, and gives that back.
        let k = key(&keys, None).await;
        let enterprise = gate.layer().plan("enterprise"); // 100 a second
        let app: Router = Router::new()
            .route("/ok", ok().route_layer(enterprise.clone()))
            .route("/fail", fails().route_layer(enterprise))
            .layer(gate.layer().plan("pro"));
        assert_eq!(five_calls(&app, &k).await, counted(["99", "98", "98", "97", "97"]));
    }

    #[tokio::test]
    async fn a_request_charged_nothing_has_nothing_to_give_back() {
        // No decision (the limiter failed open), no refund; a check of
        // cost 0, a refund of nothing.
        let keys = MemoryKeyStore::new();
        let k = key(&keys, Some("free")).await;
        let refundable = |r: Option<Extension<Refund>>| async move {
            r.map_or("none".to_owned(), |Extension(r)| r.refundable().to_string())
        };
        let open = Gate::builder(Authenticator::new(keys.clone()), Down)
            .plans(PlanSet::presets())
            .limiter_fail_mode(FailMode::Open)
            .build();
        let free = gate(&keys);
        let app: Router = Router::new()
            .route("/open", get(refundable).route_layer(open.layer()))
            .route("/free", get(refundable).route_layer(free.layer().cost(0)))
            .route("/charged", get(refundable).route_layer(free.layer().cost(2)));
        for (path, units) in [("/open", "none"), ("/free", "0"), ("/charged", "2")] {
            let req = Request::get(path).header("x-api-key", &k).body(Body::empty()).unwrap();
            let res = app.clone().oneshot(req).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            assert_eq!(text(res).await, units, "{path}");
        }
    }

    #[tokio::test]
    async fn a_give_back_takes_its_units_off_when_it_runs_not_when_it_is_called() {
        // A future dropped before it runs gives nothing back and takes
        // nothing off: the charge is still there for the next call.
        let keys = MemoryKeyStore::new();
        let k = key(&keys, Some("free")).await; // 5 a minute
        let gate = gate(&keys);
        let handler = |Extension(refund): Extension<Refund>| async move {
            drop(refund.give_back(u32::MAX));
            let after_drop = refund.refundable();
            refund.give_back(u32::MAX).await.unwrap();
            format!("{after_drop} {}", refund.refundable())
        };
        let app: Router = Router::new().route("/r", get(handler).route_layer(gate.layer().cost(2)));
        let req = Request::get("/r").header("x-api-key", &k).body(Body::empty()).unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        assert_eq!(text(res).await, "2 0");
        // Given back by the second call: the next request finds 5 less 2.
        assert_eq!(remaining(&app, "/r", &k).await, (StatusCode::OK, "3".to_owned()));
    }
}

/// A handler giving back what the layer's quota store counted for its
/// request, through the `QuotaRefund` the layer leaves beside the
/// `QuotaDecision` in the request's extensions.
mod quota_refund {
    use super::*;
    use keygate::clock::{Clock, FakeClock};
    use keygate::quota::Month;
    use keygate::tower::{QuotaRefund, Refund};

    use super::nested::key;

    type Quotas = Arc<MemoryQuotaStore>;
    type Frozen = Gate<MemoryKeyStore, MemoryLimiter<String, FakeClock>, Quotas, FakeClock>;

    /// The presets and a quota store the test reads, on a frozen clock.
    fn gate(keys: &MemoryKeyStore) -> (Frozen, Quotas, FakeClock) {
        let clock = FakeClock::at_2026();
        let quotas = Arc::new(MemoryQuotaStore::with_clock(clock.clone()));
        let auth = Authenticator::new(keys.clone()).clock(clock.clone());
        let gate = Gate::builder(auth, MemoryLimiter::with_clock(100, clock.clone()))
            .plans(PlanSet::presets())
            .quotas(Arc::clone(&quotas))
            .build();
        (gate, quotas, clock)
    }

    /// A handler that fails before doing any work and gives back all its
    /// request counted, then tries again through a copy of the handle;
    /// answers what there was to give back (`none`: no handle).
    async fn gives_back(refund: Option<Extension<QuotaRefund>>) -> String {
        let Some(Extension(refund)) = refund else { return "none".to_owned() };
        let had = refund.refundable();
        refund.give_back(u64::MAX).await.unwrap();
        assert_eq!(refund.clone().refundable(), 0, "copies share the count");
        refund.clone().give_back(u64::MAX).await.unwrap(); // nothing left
        had.to_string()
    }

    async fn get_text(app: &Router, path: &str, key: &str) -> String {
        let req = Request::get(path).header("x-api-key", key).body(Body::empty()).unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{path}");
        text(res).await
    }

    #[tokio::test]
    async fn a_failing_handler_gives_back_its_quota_unit() {
        let keys = MemoryKeyStore::new();
        let k = key(&keys, Some("free")).await; // 100 notifications a month
        let (gate, quotas, clock) = gate(&keys);
        let app: Router = Router::new()
            .route("/ok", get(|| async { "sent" }).route_layer(gate.layer().quota("email")))
            .route("/fail", get(gives_back).route_layer(gate.layer().quota("email")));
        for (path, seen) in [("/ok", "sent"), ("/fail", "1"), ("/ok", "sent"), ("/fail", "1")] {
            assert_eq!(get_text(&app, path, &k).await, seen, "{path}");
        }
        let used = quotas.usage("ws_t/free", "email", clock.now()).await.unwrap();
        assert_eq!(used, 2, "the two sent, not the two that failed");
    }

    #[tokio::test]
    async fn under_nested_layers_the_handle_gives_back_the_innermost_count() {
        let keys = MemoryKeyStore::new();
        let k = key(&keys, Some("free")).await;
        let (gate, quotas, clock) = gate(&keys);
        let used = async |c: &str| quotas.usage("ws_t/free", c, clock.now()).await.unwrap();
        let app: Router = Router::new()
            .route("/webhook", get(gives_back).route_layer(gate.layer().quota("webhook")))
            .route(
                "/router",
                get(gives_back).route_layer(gate.layer().require("events:read").unwrap()),
            )
            .route("/sms", get(gives_back).route_layer(gate.layer().quota("sms")))
            .layer(gate.layer().quota("email"));
        // The route's own count is given back; the router's stands.
        assert_eq!(get_text(&app, "/webhook", &k).await, "1");
        assert_eq!((used("email").await, used("webhook").await), (1, 0));
        // A route counting nothing: the router's count is the one.
        assert_eq!(get_text(&app, "/router", &k).await, "1");
        assert_eq!((used("email").await, used("webhook").await), (1, 0));
        // A route whose category the plan does not count: its own handle,
        // which gives nothing back, not the router's beside its decision.
        assert_eq!(get_text(&app, "/sms", &k).await, "0");
        assert_eq!((used("email").await, used("webhook").await), (2, 0));
    }

    #[tokio::test]
    async fn a_request_counted_nowhere_carries_no_handle() {
        let keys = MemoryKeyStore::new();
        let k = key(&keys, Some("free")).await;
        let (gate, _, _) = gate(&keys);
        let open = Gate::builder(Authenticator::new(keys.clone()), MemoryLimiter::new(100))
            .plans(PlanSet::presets())
            .quotas(Down)
            .quota_fail_mode(FailMode::Open)
            .build();
        let app: Router = Router::new()
            .route("/none", get(gives_back).route_layer(gate.layer()))
            .route("/open", get(gives_back).route_layer(open.layer().quota("email")));
        for path in ["/none", "/open"] {
            assert_eq!(get_text(&app, path, &k).await, "none", "{path}");
        }
    }

    #[tokio::test]
    async fn a_handle_gives_nothing_back_once_its_month_has_ended() {
        let keys = MemoryKeyStore::new();
        let k = key(&keys, Some("free")).await;
        let (gate, quotas, clock) = gate(&keys);
        let counted_at = clock.now();
        let late = {
            let clock = clock.clone();
            move |Extension(refund): Extension<QuotaRefund>| async move {
                clock.set_wall(Month::of(clock.now()).next_reset());
                let left = refund.refundable();
                refund.give_back(u64::MAX).await.unwrap();
                left.to_string()
            }
        };
        let app: Router =
            Router::new().route("/late", get(late).route_layer(gate.layer().quota("email")));
        assert_eq!(get_text(&app, "/late", &k).await, "0");
        let used = quotas.usage("ws_t/free", "email", counted_at).await.unwrap();
        assert_eq!(used, 1, "the ended month's count stands");
    }

    /// Categories that come from the body are charged by `Gate::charge`;
    /// `Gate::quota_refund` gives the same handle the layer gives, under
    /// the account that charge counted in.
    #[tokio::test]
    async fn a_charge_from_the_body_is_given_back_through_the_gates_handle() {
        let keys = MemoryKeyStore::new();
        let k = key(&keys, Some("free")).await;
        let (gate, quotas, clock) = gate(&keys);
        let who = gate
            .authenticator()
            .authenticate([("x-api-key", k.as_bytes())], &keygate::auth::Target::any())
            .await
            .unwrap();
        let charge = gate.charge(&who, "webhook", 3).await.unwrap();
        let d = charge.decision().expect("counted");
        let refund = gate.quota_refund(&who, "webhook", d).expect("a plan applied");
        assert_eq!(refund.refundable(), 3);
        refund.give_back(2).await.unwrap();
        refund.give_back(5).await.unwrap(); // only the 1 left
        assert_eq!(refund.refundable(), 0);
        assert_eq!(quotas.usage("ws_t/free", "webhook", clock.now()).await.unwrap(), 0);

        // No plan, nothing counted: no handle.
        let bare = key(&keys, None).await;
        let nobody = gate
            .authenticator()
            .authenticate([("x-api-key", bare.as_bytes())], &keygate::auth::Target::any())
            .await
            .unwrap();
        assert!(gate.quota_refund(&nobody, "webhook", d).is_none());
    }
    /// A host without tower admits through `Gate::admit`: its `Admitted`
    /// carries the handles the layer puts in the request's extensions, so
    /// what admit charged and counted can be given back, under the limiter
    /// key, plan and quota account admit used.
    #[tokio::test]
    async fn gate_admit_hands_out_the_layers_refund_handles() {
        let keys = MemoryKeyStore::new();
        let k = key(&keys, Some("free")).await; // 5 a minute, 100 notifications a month
        let (gate, quotas, clock) = gate(&keys);
        let counted = gate.layer().quota("email");
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("x-api-key", k.parse().unwrap());
        let any = keygate::auth::Target::any();
        let admit = async |layer: &keygate::tower::GateLayer<_, _, _, _>| {
            gate.admit(layer.route(), &headers, &any).await.unwrap()
        };
        let admitted = admit(&counted).await;
        assert_eq!(admitted.decision.as_ref().map(Decision::remaining), Some(4));
        assert_eq!(admitted.quota.as_ref().map(|q| q.used), Some(1));
        let refund = admitted.refund().expect("a plan applied");
        let quota_refund = admitted.quota_refund().expect("the route counts email");
        assert_eq!((refund.refundable(), quota_refund.refundable()), (1, 1));
        refund.give_back(u32::MAX).await.unwrap();
        quota_refund.give_back(u64::MAX).await.unwrap();
        assert_eq!((refund.refundable(), quota_refund.refundable()), (0, 0));
        assert_eq!(quotas.usage("ws_t/free", "email", clock.now()).await.unwrap(), 0);
        // Both given back: the next admission finds what the first did.
        let again = admit(&counted).await;
        assert_eq!(again.decision.as_ref().map(Decision::remaining), Some(4));
        assert_eq!(again.quota.as_ref().map(|q| q.used), Some(1));
        // A route counting nothing: no quota handle, the rate one still.
        let plain = admit(&gate.layer()).await;
        assert!(plain.quota_refund().is_none());
        assert_eq!(plain.refund().map(Refund::refundable), Some(1));
    }
}

/// A host that limits or counts requests itself, beside a gate on the same
/// stores, names the gate's states with `Principal::limit_key` and
/// `Principal::quota_account`.
#[tokio::test]
async fn the_principals_limit_key_and_quota_account_are_the_gates() {
    let keys = MemoryKeyStore::new();
    let manager = KeyManager::new(keys.clone());
    let ws = Tenant::workspace("ws_t".parse().unwrap());
    let scopes = ["events:read"];
    let own = manager.create(
        NewKey::new("o", keygate::format::NH, ws.clone()).plan("free").scopes(&scopes).unwrap(),
    );
    let none = manager.create(NewKey::new("n", keygate::format::NH, ws).scopes(&scopes).unwrap());
    let (own, none) = (own.await.unwrap(), none.await.unwrap());
    let limiter = Arc::new(MemoryLimiter::<String>::new(1000));
    let quotas = Arc::new(MemoryQuotaStore::new());
    let gate = Gate::builder(Authenticator::new(keys), Arc::clone(&limiter))
        .plans(PlanSet::presets())
        .default_plan("hobby")
        .quotas(Arc::clone(&quotas))
        .build();
    let ok = || async { "ok" };
    let app = Router::new()
        .route("/default", get(ok).route_layer(gate.layer().require("events:read").unwrap()))
        .route(
            "/indie",
            get(ok).route_layer(
                gate.layer().plan("indie").require("events:read").unwrap().quota("webhook"),
            ),
        );
    let call = async |path: &str, key: &str| {
        let req = Request::get(path).header("x-api-key", key).body(Body::empty()).unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{path}");
    };
    let who = async |key: &str| {
        let h = [("x-api-key", key.as_bytes())];
        gate.authenticator().authenticate(h, &keygate::auth::Target::any()).await.unwrap()
    };
    let plans = PlanSet::presets();
    let (free, hobby, indie) =
        (plans.get("free").unwrap(), plans.get("hobby").unwrap(), plans.get("indie").unwrap());
    let remaining = |key: &str, plan: &keygate::limit::Plan| {
        // A peek of one unit: what is left once it would fit.
        limiter.peek(key, plan.rate(), 1).unwrap().remaining()
    };

    let (own_key, none_key) = (own.key().expose_secret(), none.key().expose_secret());
    let (own_p, none_p) = (who(own_key).await, who(none_key).await);
    // The key's own plan, on both routes: one state, under the record id.
    call("/default", own_key).await;
    call("/indie", own_key).await;
    let k = own_p.limit_key(free, Some("hobby"));
    assert_eq!(k, own.record().id.as_str());
    assert_eq!(remaining(&k, free), 5 - 2 - 1);
    // A key naming none: the default plan under the record id, the route's
    // plan under `{id}#indie`.
    call("/default", none_key).await;
    call("/indie", none_key).await;
    call("/indie", none_key).await;
    let k = none_p.limit_key(hobby, Some("hobby"));
    assert_eq!(k, none.record().id.as_str());
    assert_eq!(remaining(&k, hobby), 3 - 1 - 1);
    let k = none_p.limit_key(indie, Some("hobby"));
    assert_eq!(k, format!("{}#indie", none.record().id));
    assert_eq!(remaining(&k, indie), 50 - 2 - 1);
    // The quota the gate counted, under the workspace and plan. (A route's
    // plan counts under that plan for a key naming none.)
    let now = Timestamp::now();
    let account = own_p.quota_account(free);
    assert_eq!(account, "ws_t/free");
    assert_eq!(quotas.usage(&account, "webhook", now).await.unwrap(), 1);
    assert_eq!(quotas.usage(&none_p.quota_account(indie), "webhook", now).await.unwrap(), 2);
}
