//! Exact instruction counts per operation, for a shared, noisy machine:
//! `bash scripts/icount.sh` runs this under Valgrind's callgrind, counting
//! only inside [`one`], and prints instructions per operation. Timings
//! wander with a neighbour's load; these counts do not, so a change's
//! effect on the hot paths is a difference of two numbers.
//!
//! `cargo run --release --example icount -- OP N` runs `OP` `N` times:
//!
//! - `mint`: a portal session on the in-memory stores;
//! - `redeem`: a portal code for its access token (codes minted first,
//!   outside the count);
//! - `bare`, `noop`, `gated`: an axum request to a handler with no layer,
//!   a layer that does nothing, and keygate's `Gate` (authenticate an `nh`
//!   key, rate-limit it, add the headers), as `benches/tower.rs` does;
//! - `keyed`, `keyed_quanta`, `governor_keyed`: a keyed check of one key
//!   with its full decision (remaining, reset) on the system clock and on
//!   the TSC, and `governor`'s with its state-information middleware;
//!   `direct`, `governor_direct`: the single-key limiters, as
//!   `benches/limit.rs` measures them.
//!
//! Counts are not times: a cache miss costs one instruction, and Valgrind
//! runs SHA-256 in software (no SHA extensions): each 64-byte block of a
//! digest counts about 3,400 instructions where the hardware's SHA
//! extensions take a few hundred cycles.

use std::num::NonZeroU32;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use axum::routing::get;
use keygate::auth::{Authenticator, Principal, PrincipalCache, Target};
use keygate::clock::QuantaClock;
use keygate::format::{NH, NHM};
use keygate::limit::{DirectLimiter, MemoryLimiter, PlanSet, Policy};
use keygate::manager::{KeyManager, NewKey};
use keygate::portal::{self as kportal, MemoryPortalStore, Portal, SessionRequest};
use keygate::store::{ApplicationId, InsertOutcome, KeyStore, MemoryKeyStore, Tenant, WorkspaceId};
use keygate::tower::Gate;
use tower::Service;

/// A plan far above any rate this reaches: every request is admitted.
const PLANS: &str = r#"{"plans": {"load": {"rate": [{"name": "default", "limit": 1000000000, "window_seconds": 1, "algorithm": "gcra"}]}}}"#;

/// Sessions per block of fresh stores (as `benches/portal.rs` measures).
const BLOCK: u64 = 10_000;

/// Runs a future that the in-memory stores make ready on first poll.
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("in-memory stores are always ready"),
    }
}

type MemoryPortal = Portal<MemoryPortalStore, MemoryKeyStore>;

/// One counted operation (callgrind counts inside this function only).
enum Op<'a> {
    Mint(&'a MemoryPortal, &'a Principal, &'a WorkspaceId, &'a ApplicationId),
    Redeem(&'a MemoryPortal, &'a str),
    Request(&'a tokio::runtime::Runtime, &'a mut Router, &'a str),
    Call(&'a dyn Fn()),
}

#[inline(never)]
fn one(op: Op<'_>) {
    match op {
        Op::Mint(portal, minter, ws, app) => {
            let session = ready(portal.create_session(minter, ws, app, SessionRequest::default()));
            std::hint::black_box(session.expect("mint"));
        }
        Op::Redeem(portal, code) => {
            std::hint::black_box(ready(portal.redeem(code)).expect("redeem"));
        }
        Op::Request(rt, router, key) => {
            let req = Request::get("/ping").header("x-api-key", key).body(Body::empty());
            let req = req.expect("request");
            let res = rt.block_on(<Router as Service<Request<Body>>>::call(router, req));
            let res = res.unwrap_or_else(|e| match e {});
            assert_eq!(res.status(), 200);
            std::hint::black_box(res);
        }
        Op::Call(f) => f(),
    }
}

fn portal_ops(redeem: bool, n: u64) {
    let keys = MemoryKeyStore::new();
    let ws = Tenant::workspace("ws_count".parse().expect("id"));
    let new = NewKey::new("m", NHM, ws).scopes(&["*"]).expect("scopes");
    let token = ready(KeyManager::new(keys.clone()).create(new)).expect("token");
    let auth = Authenticator::new(keys).formats(kportal::formats());
    let header = format!("Bearer {}", token.key().expose_secret());
    let minter = ready(auth.authenticate([("authorization", header.as_bytes())], &Target::any()));
    let minter = minter.expect("minter");
    let (ws, app) = ("ws_count".parse().expect("id"), "app_1".parse().expect("id"));
    let mut left = n;
    while left > 0 {
        let block = left.min(BLOCK);
        left -= block;
        // Fresh stores holding the minter, as a host's key store does.
        let keys = MemoryKeyStore::new();
        let held = ready(keys.insert(Arc::new(minter.record().clone()), None));
        assert_eq!(held.expect("insert"), InsertOutcome::Inserted);
        let portal = Portal::new(MemoryPortalStore::new(), keys)
            .url_template("https://portal.acme.test/p?code={code}");
        if redeem {
            let mint =
                || ready(portal.create_session(&minter, &ws, &app, SessionRequest::default()));
            let codes: Vec<String> = (0..block)
                .map(|_| mint().expect("mint").code().expose_secret().to_owned())
                .collect();
            for code in &codes {
                one(Op::Redeem(&portal, code));
            }
        } else {
            for _ in 0..block {
                one(Op::Mint(&portal, &minter, &ws, &app));
            }
        }
    }
}

fn requests(op: &str, n: u64) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let keys = MemoryKeyStore::new();
    let ws = Tenant::workspace("ws_count".parse().expect("id"));
    let key =
        rt.block_on(KeyManager::new(keys.clone()).create(NewKey::new("b", NH, ws).plan("load")));
    let key = key.expect("key").key().expose_secret().to_owned();
    let mut plans = PlanSet::presets();
    plans.extend(PlanSet::from_json(PLANS).expect("plans"));
    let auth = Authenticator::new(keys).cache(Arc::new(PrincipalCache::default()));
    let gate = Gate::builder(auth, MemoryLimiter::new(1000)).plans(plans).build();
    let handler = || async { "pong" };
    let router: Router = match op {
        "bare" => Router::new().route("/ping", get(handler)),
        "noop" => {
            let noop = tower::util::MapRequestLayer::new(|r: Request<Body>| r);
            Router::new().route("/ping", get(handler).layer(noop))
        }
        _ => Router::new().route("/ping", get(handler).layer(gate.layer())),
    };
    // As `axum::serve` does (`into_make_service`): the routes are built once
    // with their state. A router called as it is would build each route, and
    // apply its layers, again for every request.
    let mut router = router.with_state(());
    for _ in 0..n {
        one(Op::Request(&rt, &mut router, &key));
    }
}

/// High enough that every check is admitted: each does the full update.
const RATE: u32 = 1_000_000_000;

fn limiter_checks(op: &str, n: u64) {
    use governor::middleware::StateInformationMiddleware;
    use governor::{Quota, RateLimiter};
    use std::hint::black_box;
    let rate = NonZeroU32::new(RATE).expect("non-zero");
    let plan = [Policy::per_second(rate)];
    let quota = Quota::per_second(rate);
    let check: Box<dyn Fn()> = match op {
        "keyed" => {
            let l = MemoryLimiter::<u64>::new(1024);
            Box::new(move || {
                let d = l.check(&7, &plan, 1).expect("capacity");
                black_box((d.remaining(), d.reset_unix()));
            })
        }
        "keyed_quanta" => {
            let l = MemoryLimiter::<u64, _>::with_clock(1024, QuantaClock::new());
            Box::new(move || {
                let d = l.check(&7, &plan, 1).expect("capacity");
                black_box((d.remaining(), d.reset_unix()));
            })
        }
        "governor_keyed" => {
            let l = RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>();
            Box::new(move || {
                let s = l.check_key(&7_u64).expect("admitted");
                black_box(s.remaining_burst_capacity());
            })
        }
        "direct" => {
            let l = DirectLimiter::new(plan[0].clone());
            Box::new(move || {
                black_box(l.check(1).remaining());
            })
        }
        _ => {
            let l = RateLimiter::direct(quota).with_middleware::<StateInformationMiddleware>();
            Box::new(move || {
                black_box(l.check().expect("admitted").remaining_burst_capacity());
            })
        }
    };
    for _ in 0..n {
        one(Op::Call(&*check));
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let op = args.next().unwrap_or_default();
    let n = args.next().and_then(|n| n.parse().ok()).unwrap_or(10_000);
    match op.as_str() {
        "mint" => portal_ops(false, n),
        "redeem" => portal_ops(true, n),
        "bare" | "noop" | "gated" => requests(&op, n),
        "keyed" | "keyed_quanta" | "governor_keyed" | "direct" | "governor_direct" => {
            limiter_checks(&op, n);
        }
        _ => {
            eprintln!(
                "usage: icount mint|redeem|bare|noop|gated|keyed|keyed_quanta|governor_keyed|direct|governor_direct [N]"
            );
            std::process::exit(2);
        }
    }
}
