//! The tower layer's cost per request, in process (no sockets): the same
//! axum handler bare and behind a `Gate` layer that authenticates an `nh`
//! key, rate-limits it and adds the headers.

use std::hint::black_box;

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use axum::routing::get;
use criterion::{Criterion, criterion_group, criterion_main};
use keygate::auth::{Authenticator, PrincipalCache};
use keygate::limit::{MemoryLimiter, PlanSet};
use keygate::manager::{KeyManager, NewKey};
use keygate::store::{MemoryKeyStore, Tenant};
use keygate::tower::Gate;
use tower::Service;

const PLANS: &str = r#"{"plans": {"load": {"rate": [{"name": "default", "limit": 1000000000, "window_seconds": 1, "algorithm": "gcra"}]}}}"#;

/// Polls a future that in-memory stores always complete at once.
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => unreachable!("in-memory stores are always ready"),
    }
}

/// Routers are always ready; call without `poll_ready`.
async fn call(router: &mut Router, req: Request<Body>) -> axum::response::Response {
    let res = <Router as Service<Request<Body>>>::call(router, req).await;
    res.unwrap_or_else(|e| match e {})
}

fn bench(crit: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let keys = MemoryKeyStore::new();
    let ws = Tenant::workspace("ws_bench".parse().unwrap());
    let key = rt
        .block_on(
            KeyManager::new(keys.clone())
                .create(NewKey::new("b", keygate::format::NH, ws).plan("load")),
        )
        .unwrap();
    let key = key.key().expose_secret().to_owned();
    let mut plans = PlanSet::presets();
    plans.extend(PlanSet::from_json(PLANS).unwrap());
    let cache = std::sync::Arc::new(PrincipalCache::default());
    let gate = Gate::builder(Authenticator::new(keys).cache(cache), MemoryLimiter::new(1000))
        .plans(plans)
        .build();
    let handler = || async { "pong" };
    let mut bare: Router = Router::new().route("/ping", get(handler));
    let mut gated: Router = Router::new().route("/ping", get(handler).layer(gate.layer()));
    let mut noop: Router = Router::new().route(
        "/ping",
        get(handler).layer(tower::util::MapRequestLayer::new(|r: Request<Body>| r)),
    );

    let mut g = crit.benchmark_group("tower");
    g.bench_function("bare_handler", |b| {
        b.iter(|| {
            let req = Request::get("/ping").header("x-api-key", &key).body(Body::empty()).unwrap();
            rt.block_on(async { black_box(call(&mut bare, req).await) })
        });
    });
    g.bench_function("noop_layer", |b| {
        b.iter(|| {
            let req = Request::get("/ping").header("x-api-key", &key).body(Body::empty()).unwrap();
            rt.block_on(async { black_box(call(&mut noop, req).await) })
        });
    });
    g.bench_function("gated_handler", |b| {
        b.iter(|| {
            let req = Request::get("/ping").header("x-api-key", &key).body(Body::empty()).unwrap();
            let res = rt.block_on(async { call(&mut gated, req).await });
            assert_eq!(res.status(), 200);
            black_box(res)
        });
    });
    // The layer's checks alone (authenticate, limit, headers not built):
    // the rest of the gated time is request plumbing.
    let layer = gate.layer();
    let mut headers = axum::http::HeaderMap::new();
    headers.insert("x-api-key", key.parse().unwrap());
    let any = keygate::auth::Target::any();
    g.bench_function("admit_only", |b| {
        b.iter(|| black_box(ready(gate.admit(layer.route(), &headers, &any))));
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
