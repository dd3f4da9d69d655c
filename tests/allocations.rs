//! Heap allocations of the hot paths, counted exactly: a count is the same
//! on every machine (a time is not), so a change that adds one shows here.
//! One test in a binary of its own: the counter is the process's.
//!
//! Each figure is the median over many operations on stores already in
//! use, so a table growing under one of them does not decide it.

use std::alloc::System;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use keygate::auth::{Authenticator, PrincipalCache, Target};
use keygate::format::{NH, NHM};
use keygate::limit::{MemoryLimiter, PlanSet};
use keygate::manager::{KeyManager, NewKey};
use keygate::portal::{self as kportal, MemoryPortalStore, Portal, SessionRequest};
use keygate::store::{MemoryKeyStore, Tenant};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn ready<F: Future>(f: F) -> F::Output {
    match pin!(f).as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("in-memory stores are always ready"),
    }
}

/// The median number of allocations (reallocations included) of `op` over
/// `runs` runs. What `op` returns is dropped outside the count.
fn median_allocations<T>(runs: usize, mut op: impl FnMut(usize) -> T) -> usize {
    let mut counts: Vec<usize> = (0..runs)
        .map(|i| {
            let region = Region::new(GLOBAL);
            let out = black_box(op(i));
            let change = region.change();
            drop(out);
            change.allocations + change.reallocations
        })
        .collect();
    counts.sort_unstable();
    counts[runs / 2]
}

#[test]
fn hot_paths_allocate_no_more_than_they_must() {
    let keys = MemoryKeyStore::with_capacity(4096);
    let ws = Tenant::workspace("ws_alloc".parse().unwrap());
    let manager = KeyManager::new(keys.clone());
    let token = ready(manager.create(NewKey::new("m", NHM, ws.clone()).scopes(&["*"]).unwrap()));
    let auth = Authenticator::new(keys.clone()).formats(kportal::formats());
    let header = format!("Bearer {}", token.unwrap().key().expose_secret());
    let minter = ready(auth.authenticate([("authorization", header.as_bytes())], &Target::any()));
    let minter = minter.unwrap();
    let (wsid, app) = ("ws_alloc".parse().unwrap(), "app_1".parse().unwrap());
    let portal = Portal::for_authenticator(MemoryPortalStore::new(), &auth)
        .url_template("https://portal.acme.test/p?code={code}");
    let mint = || {
        let session = ready(portal.create_session(&minter, &wsid, &app, SessionRequest::default()));
        session.unwrap()
    };
    // Stores in use: sessions minted and redeemed before the counting.
    let warm: Vec<_> = (0..512).map(|_| mint()).collect();
    for s in &warm[..256] {
        ready(portal.redeem(s.code().expose_secret())).unwrap();
    }

    // A session: three (its code and its URL among them).
    assert_eq!(median_allocations(101, |_| mint()), 3, "portal mint");
    // A redemption: the access token, its record, and the record's
    // metadata node (the `portal.` entries are held inline).
    let codes: Vec<String> = (0..101).map(|_| mint().code().expose_secret().to_owned()).collect();
    let redeem = |i: usize| ready(portal.redeem(&codes[i])).unwrap();
    assert_eq!(median_allocations(101, redeem), 3, "portal redemption");

    // An authentication served by the principal cache allocates nothing:
    // the principal is shared.
    let cached = Authenticator::new(keys.clone()).cache(Arc::new(PrincipalCache::default()));
    let key = ready(manager.create(NewKey::new("k", NH, ws))).unwrap();
    let key = key.key().expose_secret().to_owned();
    let headers = [("x-api-key", key.as_bytes())];
    let authenticate = |_| ready(cached.authenticate(headers, &Target::any())).unwrap();
    assert_eq!(median_allocations(101, authenticate), 0, "cached authentication");

    // A limiter check of a key already tracked allocates nothing.
    let plans = PlanSet::presets();
    let plan = plans.get("pro").unwrap().rate();
    let limiter = MemoryLimiter::<u64>::new(1024);
    let check = |i: usize| limiter.check(&((i % 4) as u64), plan, 1).unwrap();
    for i in 0..4 {
        assert!(check(i).is_allowed());
    }
    assert_eq!(median_allocations(101, check), 0, "limiter check");
    assert!(keys.len() > 256, "the redemptions stored their tokens");

    // The layer's own, per request: its boxed future; the principal, the
    // decision, the refund handle and the private admission mark, boxed
    // into the request's extensions (which then outgrow their table: a
    // fifth); the refund's shared charge; the `X-RateLimit-Remaining`
    // value (the limit and the reset are rendered once per thread).
    #[cfg(feature = "tower")]
    assert_eq!(layer_allocations(), 8, "the layer's own");
    // Its boxed future stays a small block (see `keygate::tower::GateFuture`).
    #[cfg(feature = "tower")]
    {
        let size = layer_future_size();
        assert!(size <= 1024, "the layer's future over an axum route is {size} bytes");
    }
}

/// The size of the gate's future over an axum router on the in-memory
/// stores: the block each request allocates for it.
#[cfg(feature = "tower")]
fn layer_future_size() -> usize {
    use axum::Router;
    use axum::body::Body;
    use axum::routing::get;
    use http::Request;
    use keygate::tower::Gate;
    use tower::{Layer, Service};

    let auth = Authenticator::new(MemoryKeyStore::new());
    let gate = Gate::builder(auth, MemoryLimiter::new(1000)).build();
    let router = Router::new().route("/ping", get(|| async { "pong" })).with_state(());
    let mut service = gate.layer().layer(router);
    let future = service.call(Request::get("/ping").body(Body::empty()).unwrap());
    size_of_val(&*future)
}

/// What the layer adds to an in-process request: the same route behind a
/// do-nothing layer and behind the gate (principal cache, limiter check,
/// headers, extensions, the boxed future).
#[cfg(feature = "tower")]
fn layer_allocations() -> usize {
    use axum::Router;
    use axum::body::Body;
    use axum::routing::get;
    use http::Request;
    use keygate::tower::Gate;
    use tower::Service;

    let keys = MemoryKeyStore::new();
    let ws = Tenant::workspace("ws_alloc".parse().unwrap());
    let key = ready(KeyManager::new(keys.clone()).create(NewKey::new("b", NH, ws).plan("load")));
    let key = key.unwrap().key().expose_secret().to_owned();
    let auth = Authenticator::new(keys).cache(Arc::new(PrincipalCache::default()));
    // A limit no request here reaches: every one is admitted and charged.
    let plans = r#"{"plans": {"load": {"rate": [{"name": "default", "limit": 1000000000, "window_seconds": 1}]}}}"#;
    let gate = Gate::builder(auth, MemoryLimiter::new(1000))
        .plans(PlanSet::from_json(plans).unwrap())
        .build();
    let handler = || async { "pong" };
    let noop = tower::util::MapRequestLayer::new(|r: Request<Body>| r);
    let routers: [Router; 2] = [
        Router::new().route("/ping", get(handler).layer(noop)),
        Router::new().route("/ping", get(handler).layer(gate.layer())),
    ];
    // Built once with their state, as `axum::serve` does: called as it is, a
    // router would apply its layers again for every request.
    let mut routers = routers.map(|r| r.with_state(()));
    let [noop, gated] = routers.each_mut().map(|router| {
        let mut request = || {
            let req = Request::get("/ping").header("x-api-key", &key).body(Body::empty());
            let res = ready(router.call(req.unwrap())).unwrap();
            assert_eq!(res.status(), 200);
            res
        };
        for _ in 0..8 {
            request();
        }
        median_allocations(101, |_| request())
    });
    gated - noop
}
