//! The tower layer over the Redis stores: what it promises in memory
//! (refunds, nested layers, plan changes, fail modes) holds there alike.

#[path = "support/redis_server.rs"]
mod redis_server;

use std::fmt::Write as _;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::{MethodRouter, get};
use axum::{Extension, Router};
use keygate::auth::Authenticator;
use keygate::backend::FailMode;
use keygate::limit::{Algorithm, HeaderSet, MemoryLimiter, Plan, PlanSet, Policy, QuotaRule};
use keygate::manager::{KeyManager, NewKey};
use keygate::quota::MemoryQuotaStore;
use keygate::redis::{Redis, RedisConfig};
use keygate::store::{KeyStore, MemoryKeyStore, Tenant};
use keygate::tower::{Gate, Refund};
use redis_server::RedisServer;
use tower::ServiceExt;

async fn connect(server: &RedisServer, timeout: Duration) -> Redis {
    connect_to(&server.url(), timeout).await
}

async fn connect_to(url: &str, timeout: Duration) -> Redis {
    RedisConfig::from_url(url)
        .unwrap()
        .timeout(timeout)
        .prefix("gate")
        .unwrap()
        .connect()
        .await
        .expect("connect to the test redis-server")
}

fn policy(name: &'static str, limit: u32, secs: u64, alg: Algorithm) -> Policy {
    Policy::new(name, limit, Duration::from_secs(secs), alg).unwrap()
}

/// Plans on hour-long windows (no unit earned back during a test), one
/// per algorithm, and a stacked one (a burst under a sustained limit).
fn plans() -> PlanSet {
    let monthly = [QuotaRule::new("notifications", 3, &["webhook"])];
    let mut set = PlanSet::default();
    for (name, rate) in [
        ("fixed", vec![policy("default", 5, 3600, Algorithm::FixedWindow)]),
        ("sliding", vec![policy("default", 5, 3600, Algorithm::SlidingWindow)]),
        ("gcra", vec![policy("default", 5, 3600, Algorithm::Gcra)]),
        ("gcra_burst", vec![policy("default", 2, 3600, Algorithm::Gcra).with_burst(5).unwrap()]),
        (
            "stacked",
            vec![
                policy("burst", 4, 1800, Algorithm::Gcra),
                policy("sustained", 6, 3600, Algorithm::FixedWindow),
            ],
        ),
        (
            "stacked_sliding",
            vec![
                policy("burst", 4, 3600, Algorithm::SlidingWindow),
                policy("sustained", 6, 3600, Algorithm::FixedWindow),
            ],
        ),
    ] {
        set.insert(Plan::new(name, rate, monthly.to_vec()).unwrap());
    }
    set
}

async fn make_key<S: KeyStore + Clone>(keys: &S, plan: Option<&str>) -> String {
    let ws = Tenant::workspace("ws_r".parse().unwrap());
    let mut new = NewKey::new("t", keygate::format::NH, ws).scopes(&["events:read"]).unwrap();
    if let Some(p) = plan {
        new = new.plan(p);
    }
    KeyManager::new(keys.clone()).create(new).await.unwrap().key().expose_secret().to_owned()
}

/// Waits out the last 30 seconds of a half hour: fixed windows of an hour
/// or half an hour start on one, and checks across it would find a fresh
/// window.
async fn clear_of_the_half_hour() {
    let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let left = 1800 - unix.as_secs() % 1800;
    if left < 30 {
        tokio::time::sleep(Duration::from_secs(left + 5)).await;
    }
}

/// What a response said: status, `X-RateLimit-Limit`, `-Remaining`.
type Seen = (StatusCode, String, String);

async fn call(app: &Router, path: &str, key: &str) -> Seen {
    let (seen, _) = call_timed(app, path, key).await;
    seen
}

/// [`call`], and the headers that tell time: `X-RateLimit-Reset`,
/// `Retry-After`, `RateLimit`.
async fn call_timed(app: &Router, path: &str, key: &str) -> (Seen, [String; 3]) {
    let req = Request::get(path).header("x-api-key", key).body(Body::empty()).unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let h = |n: &str| res.headers().get(n).map_or("none", |v| v.to_str().unwrap()).to_owned();
    let timed = [h("x-ratelimit-reset"), h("retry-after"), h("ratelimit")];
    ((res.status(), h("x-ratelimit-limit"), h("x-ratelimit-remaining")), timed)
}

fn ok() -> MethodRouter {
    get(|| async { "in" })
}

/// Gives back `units` of its request's charge, twice over through copies
/// racing each other: together no more than the charge.
fn gives_back(units: u32) -> MethodRouter {
    get(move |Extension(refund): Extension<Refund>| async move {
        let (a, b) = (refund.clone(), refund.clone());
        let (x, y) = tokio::join!(a.give_back(units), b.give_back(units));
        x.unwrap();
        y.unwrap();
        StatusCode::SERVICE_UNAVAILABLE
    })
}

/// The routes of one gate: plain, a failing handler giving back all, a
/// route of cost 3 giving back 1, and the same nested in a router-wide
/// layer of the gate.
type Held = std::sync::Arc<std::sync::Mutex<Vec<Refund>>>;

/// Keeps its request's `Refund` for `/release` to give back later.
fn hold(held: &Held) -> MethodRouter {
    let held = held.clone();
    get(move |Extension(refund): Extension<Refund>| async move {
        held.lock().unwrap().push(refund);
        "held"
    })
}

/// Gives back every charge held so far.
fn release(held: &Held) -> MethodRouter {
    let held = held.clone();
    get(move || async move {
        let all: Vec<Refund> = held.lock().unwrap().drain(..).collect();
        for r in all {
            r.give_back(u32::MAX).await.unwrap();
        }
        "released"
    })
}

macro_rules! routes {
    ($gate:expr) => {
        routes!($gate, Held::default())
    };
    ($gate:expr, $held:expr) => {{
        let g = &$gate;
        let held: Held = $held;
        let inner: Router = Router::new()
            .route("/n/ok", ok().route_layer(g.layer().require("events:read").unwrap()))
            .route("/n/fail", gives_back(u32::MAX).route_layer(g.layer()))
            .route("/n/three", gives_back(1).route_layer(g.layer().cost(3)))
            .layer(g.layer());
        Router::new()
            .route("/ok", ok().route_layer(g.layer()))
            .route("/fail", gives_back(u32::MAX).route_layer(g.layer()))
            .route("/three", gives_back(1).route_layer(g.layer().cost(3)))
            .route("/ten", ok().route_layer(g.layer().cost(10)))
            .route("/zero", gives_back(u32::MAX).route_layer(g.layer().cost(0)))
            .route("/hold", hold(&held).route_layer(g.layer().cost(2)))
            .route("/release", release(&held))
            .merge(inner)
    }};
}

/// One key's requests: charges of 0, 1, 3 and 10 (more than any limit),
/// given back whole, in part or not at all, alone and nested.
const SCRIPT: [&str; 18] = [
    "/zero", "/ok", "/fail", "/three", "/ten", "/n/fail", "/n/ok", "/fail", "/n/three", "/ok",
    "/zero", "/n/fail", "/ok", "/three", "/ok", "/n/ok", "/ok", "/zero",
];

/// [`SCRIPT`] with `key`: what each response said, and its times.
async fn run(app: &Router, key: &str) -> (Vec<Seen>, Vec<[String; 3]>) {
    let mut seen = (Vec::new(), Vec::new());
    for path in SCRIPT {
        let (s, t) = call_timed(app, path, key).await;
        seen.0.push(s);
        seen.1.push(t);
    }
    seen
}

/// Times in headers alike, each number a second apart at most (the two
/// runs are made moments apart, and round up to whole seconds).
fn close(a: &[[String; 3]], b: &[[String; 3]]) -> bool {
    let numbers = |s: &str| -> Vec<i64> {
        s.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect()
    };
    let shape = |s: &str| s.replace(|c: char| c.is_ascii_digit(), "");
    a.iter().flatten().zip(b.iter().flatten()).all(|(x, y)| {
        let (nx, ny) = (numbers(x), numbers(y));
        shape(x) == shape(y)
            && nx.len() == ny.len()
            && nx.iter().zip(&ny).all(|(x, y)| (x - y).abs() <= 1)
    })
}

/// The same requests, with the same refunds, on memory and on Redis: the
/// same statuses and headers, whatever the algorithm or stack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_through_the_layer_match_memory_for_every_algorithm() {
    let server = RedisServer::start();
    let redis = connect(&server, Duration::from_secs(5)).await;
    clear_of_the_half_hour().await;
    let mem_keys = MemoryKeyStore::new();
    let mem = Gate::builder(Authenticator::new(mem_keys.clone()), MemoryLimiter::new(1000))
        .plans(plans())
        .rate_limit_headers(HeaderSet::all())
        .build();
    let red = Gate::builder(Authenticator::new(redis.keys()), redis.limiter())
        .plans(plans())
        .rate_limit_headers(HeaderSet::all())
        .build();
    let (mem_app, red_app) = (routes!(mem), routes!(red));
    for plan in ["fixed", "sliding", "gcra", "gcra_burst", "stacked", "stacked_sliding"] {
        let in_memory = run(&mem_app, &make_key(&mem_keys, Some(plan)).await).await;
        let on_redis = run(&red_app, &make_key(&redis.keys(), Some(plan)).await).await;
        assert_eq!(on_redis.0, in_memory.0, "plan {plan}");
        assert!(
            close(&on_redis.1, &in_memory.1),
            "plan {plan}: {:?} {:?}",
            on_redis.1,
            in_memory.1
        );
    }
}

async fn text(res: axum::response::Response) -> String {
    let bytes = axum::body::to_bytes(res.into_body(), usize::MAX).await.unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// Everything a client sees of a response: status, headers and body.
async fn on_the_wire(res: axum::response::Response) -> String {
    let mut seen = format!("{}\n", res.status());
    for (n, v) in res.headers() {
        writeln!(seen, "{n}: {}", v.to_str().unwrap()).unwrap();
    }
    seen + &text(res).await
}

fn get_with(path: &str, key: &str) -> Request<Body> {
    Request::get(path).header("x-api-key", key).body(Body::empty()).unwrap()
}

/// Redis dies between the layer's check and the handler's give-back: the
/// refund fails and leaves the units spent (none left to give back twice);
/// the next request is a 503 that names neither key nor cause; and once
/// Redis is back, the request after is served, without a new gate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_between_admit_and_give_back_leaves_the_units_spent() {
    use std::sync::{Arc, Mutex};
    let server = Arc::new(Mutex::new(RedisServer::start()));
    let url = server.lock().unwrap().url();
    let redis = connect_to(&url, Duration::from_millis(250)).await;
    clear_of_the_half_hour().await;
    let keys = MemoryKeyStore::new();
    let key = make_key(&keys, Some("fixed")).await;
    let gate = Gate::builder(Authenticator::new(keys), redis.limiter()).plans(plans()).build();
    let down = Arc::clone(&server);
    let app: Router = Router::new()
        .route(
            "/kill",
            get(move |Extension(refund): Extension<Refund>| async move {
                down.lock().unwrap().stop();
                let failed = refund.give_back(u32::MAX).await.is_err();
                format!("{failed} {}", refund.refundable())
            }),
        )
        .route("/ok", ok())
        .route_layer(gate.layer());
    assert_eq!(call(&app, "/ok", &key).await.2, "4");
    let res = app.clone().oneshot(get_with("/kill", &key)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-ratelimit-remaining"], "3");
    assert_eq!(text(res).await, "true 0", "failed, and nothing left to give back");
    // Down: a 503 that says nothing of the cause or the key.
    let res = app.clone().oneshot(get_with("/ok", &key)).await.unwrap();
    let wire = on_the_wire(res).await;
    assert!(wire.starts_with("503"), "{wire}");
    assert!(wire.contains("retry-after: 1"), "{wire}");
    assert!(!wire.contains("x-ratelimit"), "{wire}");
    for secret in [key.as_str(), "refused", "redis", "127.0.0.1"] {
        assert!(!wire.to_lowercase().contains(&secret.to_lowercase()), "{secret} in {wire}");
    }
    // Back (empty: no persistence): the very next request is served.
    server.lock().unwrap().restart();
    assert_eq!(call(&app, "/ok", &key).await, (StatusCode::OK, "5".into(), "4".into()));
}

/// The key store hangs during authentication: a 503 within the timeout,
/// even where the limiter and quota fail open, with no part of the key on
/// the wire or in the logged reason; served again once Redis answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_store_that_hangs_is_a_503_and_the_next_request_after_is_served() {
    let server = RedisServer::start();
    let redis = connect(&server, Duration::from_millis(250)).await;
    let key = make_key(&redis.keys(), Some("fixed")).await;
    let gate = Gate::builder(Authenticator::new(redis.keys()), redis.limiter())
        .plans(plans())
        .quotas(redis.quota())
        .limiter_fail_mode(FailMode::Open)
        .quota_fail_mode(FailMode::Open)
        .build();
    let app: Router = Router::new().route("/ok", ok().route_layer(gate.layer()));
    assert_eq!(call(&app, "/ok", &key).await.0, StatusCode::OK);
    server.signal("STOP");
    let res = app.clone().oneshot(get_with("/ok", &key)).await.unwrap();
    let reason = res.extensions().get::<keygate::tower::Refused>().unwrap().reason().to_string();
    let wire = on_the_wire(res).await;
    server.signal("CONT");
    // Whatever the limiter's fail mode: a key that cannot be checked is no key.
    assert!(wire.starts_with("503"), "{wire}");
    assert!(wire.contains("retry-after: 1"), "{wire}");
    assert!(!wire.contains(&key) && !reason.contains(&key), "{reason}: {wire}");
    assert!(!wire.contains(&key[3..12]) && !reason.contains(&key[3..12]), "{reason}: {wire}");
    assert_eq!(call(&app, "/ok", &key).await.0, StatusCode::OK, "served once back");
}

/// The quota store down during `Gate::charge` and a route's `.quota`: a
/// 503 (with the limiter's headers) when failing closed, a traced pass
/// when open; counted again once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_store_down_during_a_charge_fails_as_chosen_and_counts_after() {
    use keygate::tower::Charge;
    let mut server = RedisServer::start();
    let redis = connect(&server, Duration::from_millis(250)).await;
    let keys = MemoryKeyStore::new();
    let key = make_key(&keys, Some("fixed")).await;
    let principal = Authenticator::new(keys.clone())
        .authenticate([("x-api-key", key.as_bytes())], &keygate::auth::Target::any())
        .await
        .unwrap();
    let build = |mode| {
        Gate::builder(Authenticator::new(keys.clone()), MemoryLimiter::new(100))
            .plans(plans())
            .quotas(redis.quota())
            .quota_fail_mode(mode)
            .build()
    };
    let (closed, open) = (build(FailMode::Closed), build(FailMode::Open));
    let c = closed.charge(&principal, "webhook", 1).await.unwrap();
    assert_eq!(c.decision().map(|q| q.used), Some(1));
    server.stop();
    let refused = closed.charge(&principal, "webhook", 1).await.unwrap_err();
    assert_eq!(refused.rejection().status(), 503);
    let c = open.charge(&principal, "webhook", 1).await.unwrap();
    assert!(matches!(c, Charge::FailedOpen(ref f) if f.quota.is_some()), "{c:?}");
    // A route counting the category, through the layer.
    let app: Router = Router::new().route("/ok", ok().route_layer(closed.layer().quota("webhook")));
    let res = app.clone().oneshot(get_with("/ok", &key)).await.unwrap();
    let wire = on_the_wire(res).await;
    assert!(wire.starts_with("503") && wire.contains("x-ratelimit-remaining: 4"), "{wire}");
    server.restart();
    let c = closed.charge(&principal, "webhook", 1).await.unwrap();
    assert_eq!(c.decision().map(|q| q.used), Some(1), "a fresh server counts from zero");
}

/// One plan name, `p`, under each of these rates in turn.
fn rates() -> Vec<Vec<Policy>> {
    vec![
        vec![policy("default", 5, 3600, Algorithm::FixedWindow)],
        vec![policy("default", 4, 3600, Algorithm::SlidingWindow)],
        vec![policy("default", 6, 3600, Algorithm::Gcra)],
        vec![policy("default", 2, 3600, Algorithm::Gcra).with_burst(5).unwrap()],
        vec![policy("default", 3, 1800, Algorithm::FixedWindow)],
        vec![policy("default", 3, 1800, Algorithm::SlidingWindow)],
        vec![
            policy("default", 4, 3600, Algorithm::SlidingWindow),
            policy("sustained", 6, 3600, Algorithm::FixedWindow),
        ],
        vec![
            policy("default", 3, 1800, Algorithm::Gcra).with_burst(4).unwrap(),
            policy("sustained", 7, 3600, Algorithm::SlidingWindow),
        ],
        vec![
            policy("sustained", 5, 1800, Algorithm::Gcra),
            policy("default", 2, 3600, Algorithm::FixedWindow),
        ],
        vec![policy("default", 8, 7200, Algorithm::Gcra)],
        vec![policy("default", 2, 3600, Algorithm::FixedWindow)],
    ]
}

fn plan_p(rate: &[Policy]) -> PlanSet {
    let mut set = PlanSet::default();
    set.insert(Plan::new("p", rate.to_vec(), Vec::new()).unwrap());
    set
}

/// Before the change, after it, then back to the first plan.
const CHANGE: [&str; 12] = [
    "a/ok", "a/ok", "a/fail", "b/ok", "b/fail", "b/ok", "b/ok", "a/ok", "b/ok", "b/ok", "a/ok",
    "b/ok",
];

/// A key's plan changes (two gates naming `p` differently, one limiter)
/// and back: Redis carries, converts and refunds the state as memory does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_changed_under_one_name_carries_its_state_as_in_memory() {
    use std::sync::Arc;
    let server = RedisServer::start();
    let redis = connect(&server, Duration::from_secs(5)).await;
    clear_of_the_half_hour().await;
    let mem_keys = MemoryKeyStore::new();
    let mem_limiter = Arc::new(MemoryLimiter::new(1000));
    let rates = rates();
    for before in &rates {
        for after in &rates {
            if before == after {
                continue;
            }
            let mut seen = Vec::new();
            for on_redis in [false, true] {
                let app = if on_redis {
                    let (a, b) = (plan_p(before), plan_p(after));
                    let gate = |plans| {
                        Gate::builder(Authenticator::new(redis.keys()), redis.limiter())
                            .plans(plans)
                            .build()
                    };
                    let (a, b) = (gate(a), gate(b));
                    Router::new().nest("/a", routes!(a)).nest("/b", routes!(b))
                } else {
                    let gate = |plans| {
                        Gate::builder(
                            Authenticator::new(mem_keys.clone()),
                            Arc::clone(&mem_limiter),
                        )
                        .plans(plans)
                        .build()
                    };
                    let (a, b) = (gate(plan_p(before)), gate(plan_p(after)));
                    Router::new().nest("/a", routes!(a)).nest("/b", routes!(b))
                };
                let key = if on_redis {
                    make_key(&redis.keys(), Some("p")).await
                } else {
                    make_key(&mem_keys, Some("p")).await
                };
                let mut got = Vec::new();
                for path in CHANGE {
                    got.push(call(&app, &format!("/{path}"), &key).await);
                }
                seen.push(got);
            }
            assert_eq!(seen[1], seen[0], "{before:?} -> {after:?}");
        }
    }
}

/// Random walks over three gates whose plan `p` differs (a plan change
/// back and forth, under one name), every route of each: Redis answers as
/// memory does, step by step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_plan_changes_through_the_layer_match_memory() {
    use std::sync::Arc;
    let server = RedisServer::start();
    let redis = connect(&server, Duration::from_secs(5)).await;
    clear_of_the_half_hour().await;
    let mem_keys = MemoryKeyStore::new();
    let mem_limiter = Arc::new(MemoryLimiter::new(100_000));
    let rates = rates();
    let paths =
        ["ok", "fail", "three", "ten", "zero", "n/ok", "n/fail", "n/three", "hold", "release"];
    // xorshift: the same walks on every run.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        usize::try_from(state % n as u64).unwrap()
    };
    for round in 0..80 {
        let windows = [0usize, 1, 4, 5, 6, 10];
        let picks: Vec<usize> = (0..3).map(|_| windows[next(windows.len())]).collect();
        let steps: Vec<(usize, &str)> =
            (0..20).map(|_| (next(3), paths[next(paths.len())])).collect();
        let mut seen = Vec::new();
        for on_redis in [false, true] {
            let mut apps = Vec::new();
            let held = Held::default();
            for &pi in &picks {
                let app = if on_redis {
                    let g = Gate::builder(Authenticator::new(redis.keys()), redis.limiter())
                        .plans(plan_p(&rates[pi]))
                        .build();
                    routes!(g, held.clone())
                } else {
                    let g = Gate::builder(
                        Authenticator::new(mem_keys.clone()),
                        Arc::clone(&mem_limiter),
                    )
                    .plans(plan_p(&rates[pi]))
                    .build();
                    routes!(g, held.clone())
                };
                apps.push(app);
            }
            let key = if on_redis {
                make_key(&redis.keys(), Some("p")).await
            } else {
                make_key(&mem_keys, Some("p")).await
            };
            let mut got = Vec::new();
            for (g, path) in &steps {
                got.push(call(&apps[*g], &format!("/{path}"), &key).await);
            }
            seen.push(got);
        }
        if seen[0] != seen[1] {
            let rs: Vec<_> = picks.iter().map(|&i| &rates[i]).collect();
            for (i, ((st, m), r)) in steps.iter().zip(&seen[0]).zip(&seen[1]).enumerate() {
                eprintln!("{i} {st:?} mem {m:?} redis {r:?}{}", if m == r { "" } else { "  <<<" });
            }
            panic!("round {round}: {rs:?}");
        }
    }
}

/// The principal `key` authenticates as at `gate`.
async fn principal<S, L, Q, C>(gate: &Gate<S, L, Q, C>, key: &str) -> keygate::auth::Principal
where
    S: KeyStore,
    L: keygate::limit::LimitStore,
    Q: keygate::quota::QuotaStore,
    C: keygate::clock::Clock,
{
    let header = [("x-api-key", key.as_bytes())];
    gate.authenticator().authenticate(header, &keygate::auth::Target::any()).await.unwrap()
}

/// `Gate::charge` over the Redis quota store: the same decisions, and the
/// same refusals on the wire, as over memory (rules counting several
/// categories, costs above a rule's limit, categories no rule counts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_charges_through_the_gate_match_memory() {
    use keygate::quota::QuotaDecision;
    let server = RedisServer::start();
    let redis = connect(&server, Duration::from_secs(5)).await;
    let monthly = vec![
        QuotaRule::new("notifications", 6, &["email", "webhook"]),
        QuotaRule::new("webhooks", 4, &["webhook"]),
        QuotaRule::new("sms", 2, &["sms"]),
    ];
    let mut set = PlanSet::default();
    let rate = vec![policy("default", 1000, 3600, Algorithm::Gcra)];
    set.insert(Plan::new("q", rate, monthly).unwrap());
    let now = keygate::clock::FakeClock::at_2026();
    let mem_keys = MemoryKeyStore::new();
    let mem = Gate::builder(
        Authenticator::new(mem_keys.clone()).clock(now.clone()),
        MemoryLimiter::new(100),
    )
    .plans(set.clone())
    .quotas(MemoryQuotaStore::new())
    .build();
    let red = Gate::builder(Authenticator::new(redis.keys()).clock(now.clone()), redis.limiter())
        .plans(set)
        .quotas(redis.quota())
        .build();
    let mp = principal(&mem, &make_key(&mem_keys, Some("q")).await).await;
    let rp = principal(&red, &make_key(&redis.keys(), Some("q")).await).await;
    let steps: [(&str, u64); 16] = [
        ("webhook", 1),
        ("email", 2),
        ("sms", 3),
        ("webhook", 5),
        ("Email", 1),
        ("webhook", 2),
        ("email", 7),
        ("sms", 2),
        ("webhook", 1),
        ("email", 1),
        ("webhook", 1),
        ("email", 1),
        ("sms", 1),
        ("webhook", 0),
        ("email", 0),
        ("email", 1),
    ];
    let show = |r: Result<keygate::tower::Charge, keygate::tower::Refused>| match r {
        Ok(c) => format!(
            "{:?}",
            c.decision().map(|q: &QuotaDecision| (
                q.allowed,
                q.rule.clone(),
                q.used,
                q.limit,
                q.cost_exceeds_limit
            ))
        ),
        Err(r) => {
            let res: axum::response::Response = mem.respond(r);
            let mut h: Vec<_> = res
                .headers()
                .iter()
                .filter(|(n, _)| *n != "date")
                .map(|(n, v)| format!("{n}={v:?}"))
                .collect();
            h.sort();
            format!("{} {h:?}", res.status())
        }
    };
    for (cat, cost) in steps {
        let m = show(mem.charge(&mp, cat, cost).await);
        let r = show(red.charge(&rp, cat, cost).await);
        assert_eq!(r, m, "{cat} {cost}");
    }
}

/// Eight copies of one request's `Refund` giving back on several threads
/// at once: the charge comes back once, under every algorithm.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copies_giving_back_in_parallel_give_back_the_charge_once() {
    let server = RedisServer::start();
    let redis = connect(&server, Duration::from_secs(5)).await;
    clear_of_the_half_hour().await;
    let gate =
        Gate::builder(Authenticator::new(redis.keys()), redis.limiter()).plans(plans()).build();
    let spray = get(|Extension(refund): Extension<Refund>| async move {
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let r = refund.clone();
                tokio::spawn(async move { r.give_back(1).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        refund.refundable().to_string()
    });
    let app: Router = Router::new()
        .route("/ok", ok().route_layer(gate.layer()))
        .route("/spray", spray.route_layer(gate.layer().cost(3)));
    for plan in ["fixed", "sliding", "gcra", "gcra_burst", "stacked", "stacked_sliding"] {
        let key = make_key(&redis.keys(), Some(plan)).await;
        let limit: u32 = call(&app, "/ok", &key).await.1.parse().unwrap();
        let res = app.clone().oneshot(get_with("/spray", &key)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(text(res).await, "0");
        // One unit charged by `/ok`, the three of `/spray` given back once:
        // the next check finds two used, not fewer.
        let left = call(&app, "/ok", &key).await.2;
        assert_eq!(left, (limit - 2).to_string(), "plan {plan}");
    }
}
