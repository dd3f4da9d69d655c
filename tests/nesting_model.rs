//! Random stacks of nested `GateLayer`s of two gates (A, B) against a model
//! of the documented nesting rules, written apart from the layer's code:
//! which layers charge (vouching, take-overs, give-backs), which limiter
//! failures stand, which headers and which `Decision` a request ends with,
//! refusals at any depth (401, 403, 429, 503), and a valid key's 401
//! inside looking exactly like an unknown key's.
//!
//! `CASES=100000 SEED=2 cargo test --test nesting_model -- --nocapture`
//! runs more (2,000 by default).

use std::collections::HashMap;
use std::fmt::Write as _;

use axum::body::Body;
use axum::http::Request;
use axum::routing::get;
use axum::{Extension, Router};
use keygate::auth::Authenticator;
use keygate::backend::FailMode;
use keygate::clock::FakeClock;
use keygate::format::NH;
use keygate::http::BodyStyle;
use keygate::limit::{Decision, HeaderSet, MemoryLimiter, PlanSet};
use keygate::manager::{KeyManager, NewKey};
use keygate::quota::MemoryQuotaStore;
use keygate::store::{MemoryKeyStore, Tenant};
use keygate::tower::{FailedOpen, Gate, GateLayer, Refused};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tower::ServiceExt;

#[path = "support/failing.rs"]
mod failing;
use failing::Failing;

/// A gate on a frozen clock whose limiter fails checks of cost `fail`
/// (`fail` past 1000: of cost `fail - 1000`, and the gate fails closed).
type G = Gate<MemoryKeyStore, Failing<FakeClock>, MemoryQuotaStore, FakeClock>;

/// One layer: its gate and what it is narrowed with.
#[derive(Clone, Copy, Debug)]
#[allow(clippy::struct_excessive_bools)] // A model's flags, read one by one.
struct L {
    gate: usize, // 0 = A, 1 = B
    cost: Option<u32>,
    pro: bool,
    require: bool,
    sk_only: bool,
    cookie: bool,
    style: Option<BodyStyle>,
}

fn gate(keys: &MemoryKeyStore, clock: &FakeClock, fail: u32, refund_down: bool, b: bool) -> G {
    let mut builder = Gate::builder(
        Authenticator::new(keys.clone()).clock(clock.clone()),
        Failing::new(MemoryLimiter::with_clock(100, clock.clone()), move |_, c| c == fail % 1000)
            .refunds_failing(refund_down),
    )
    .plans(PlanSet::presets())
    .default_plan("hobby")
    .limiter_fail_mode(if fail >= 1000 { FailMode::Closed } else { FailMode::Open });
    if b {
        builder = builder
            .rate_limit_headers(HeaderSet { x_ratelimit: false, ietf: true, retry_after: false })
            .body_style(BodyStyle::Flat);
    }
    builder.build()
}

fn layer(
    g: &G,
    l: &L,
) -> GateLayer<MemoryKeyStore, Failing<FakeClock>, MemoryQuotaStore, FakeClock> {
    let mut x = g.layer();
    if let Some(c) = l.cost {
        x = x.cost(c);
    }
    if l.pro {
        x = x.plan("pro");
    }
    if l.require {
        x = x.require("api_keys:read").unwrap();
    }
    if l.sk_only {
        x = x.formats(["nhk"]);
    }
    if l.cookie {
        x = x.cookie("sess");
    }
    if let Some(s) = l.style {
        x = x.body_style(s);
    }
    x
}

fn app(gates: &[G; 2], layers: &[L]) -> Router {
    let handler = |f: Option<Extension<FailedOpen>>, d: Option<Extension<Decision>>| async move {
        format!(
            "fo={} rf={} d={:?}",
            f.as_ref().is_some_and(|Extension(f)| f.limiter.is_some()),
            f.as_ref().is_some_and(|Extension(f)| f.refund.is_some()),
            d.map(|Extension(d)| (d.limit(), d.remaining()))
        )
    };
    let mut r: Router = Router::new().route("/x", get(handler));
    for l in layers.iter().rev() {
        r = r.layer(layer(&gates[l.gate], l));
    }
    r
}

/// What a request ended with, as the model predicts or the layer did.
#[derive(Debug, PartialEq, Clone)]
#[allow(clippy::struct_excessive_bools)] // Each flag is one place compared.
struct Outcome {
    status: u16,
    /// `FailedOpen::limiter` is reported (request side for 200, Refused for refusals).
    fo: bool,
    /// The response extension's `FailedOpen::limiter`.
    resp_fo: bool,
    /// `FailedOpen::refund` reported (same places as `fo`), and on the response.
    refund: bool,
    resp_refund: bool,
    /// Gate A's (`X-RateLimit-*`) and B's (IETF) headers: (limit, remaining).
    hdr: [Option<(u32, u32)>; 2],
    /// The handler's decision.
    decision: Option<(u32, u32)>,
}

fn cap(plan: &str) -> u32 {
    if plan == "pro" { 10 } else { 3 }
}

/// One charge: a layer's, and the layers of its gate that vouch on it.
struct Chain {
    gate: usize,
    failed: bool,
    /// (plan, cost, limit, remaining) of the standing allowed check.
    decision: Option<(&'static str, u32, u32, u32)>,
}

/// The model: the outcome of one request of the valid key, and the layer a
/// 401 came from (if any).
fn model(
    layers: &[L],
    fails: [u32; 2],
    refund_down: [bool; 2],
    consumed: &mut HashMap<(usize, &'static str), u32>,
    by_cookie: bool,
) -> (Outcome, Option<usize>) {
    let mut chains: Vec<Chain> = Vec::new();
    let mut refund = false;
    // The previous layer: (gate, plan, chain)
    let mut prev: Option<(usize, &'static str, usize)> = None;
    let mut status = 200;
    let mut denied: Option<(usize, (u32, u32))> = None; // chain idx, headers
    let mut four01 = None;
    // The request's one `Decision`: the innermost layer's that charged; a
    // take-over removes its gate's before its own check.
    let mut slot: Option<(u32, u32)> = None;
    for (i, l) in layers.iter().enumerate() {
        let vouch = prev.filter(|p| p.0 == l.gate);
        if l.sk_only || (by_cookie && !l.cookie) {
            status = 401;
            four01 = Some(i);
            break;
        }
        let plan: &'static str = if l.pro {
            "pro"
        } else if let Some(p) = vouch {
            p.1
        } else {
            "hobby"
        };
        let limit = vouch.is_none_or(|p| l.cost.is_some() || p.1 != plan);
        let ci = if let Some(p) = vouch {
            p.2
        } else {
            chains.push(Chain { gate: l.gate, failed: false, decision: None });
            chains.len() - 1
        };
        if limit {
            if vouch.is_some() && chains[ci].decision.is_some() {
                slot = None;
            }
            if let Some((p, c, _, _)) = chains[ci].decision.take() {
                if refund_down[l.gate] {
                    refund = true;
                } else {
                    *consumed.get_mut(&(l.gate, p)).unwrap() -= c;
                }
            }
            let c = l.cost.unwrap_or(1);
            let used = consumed.entry((l.gate, plan)).or_insert(0);
            if fails[l.gate] >= 1000 && fails[l.gate] - 1000 == c {
                chains[ci].failed = false;
                status = 503;
                break;
            } else if fails[l.gate] == c {
                chains[ci].failed = true;
            } else if *used + c <= cap(plan) {
                *used += c;
                chains[ci].failed = false;
                chains[ci].decision = Some((plan, c, cap(plan), cap(plan) - *used));
                slot = Some((cap(plan), cap(plan) - *used));
            } else {
                chains[ci].failed = false;
                status = 429;
                denied = Some((ci, (cap(plan), cap(plan) - *used)));
                break;
            }
        }
        prev = Some((l.gate, plan, ci));
        if l.require {
            status = 403;
            break;
        }
    }
    let fo = chains.iter().any(|c| c.failed);
    let mut hdr = [None, None];
    if status != 401 {
        for (ci, c) in chains.iter().enumerate() {
            let d = match denied {
                Some((di, h)) if di == ci => Some(h),
                _ => c.decision.map(|d| (d.2, d.3)),
            };
            if let Some(d) = d {
                hdr[c.gate] = Some(d);
            }
        }
    }
    let decision = if status == 200 { slot } else { None };
    (Outcome { status, fo, resp_fo: fo, refund, resp_refund: refund, hdr, decision }, four01)
}

fn num(s: &str, key: &str) -> Option<u32> {
    let at = s.find(key)? + key.len();
    s[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

async fn run(app: &Router, key: &str, by_cookie: bool) -> (Outcome, (Option<String>, String)) {
    let req = if by_cookie {
        Request::get("/x").header("cookie", format!("sess={key}"))
    } else {
        Request::get("/x").header("x-api-key", key)
    };
    let req = req.body(Body::empty()).unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let h = |n: &str| res.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
    let a = match (h("x-ratelimit-limit"), h("x-ratelimit-remaining")) {
        (Some(l), Some(r)) => Some((l.parse().unwrap(), r.parse().unwrap())),
        (None, None) => None,
        other => panic!("half a set {other:?}"),
    };
    let b = match (h("ratelimit-policy"), h("ratelimit")) {
        (Some(p), Some(s)) => Some((num(&p, "q=").unwrap(), num(&s, "r=").unwrap())),
        (None, None) => None,
        other => panic!("half a set {other:?}"),
    };
    let www = h("www-authenticate");
    let status = res.status().as_u16();
    let resp_fo = res.extensions().get::<FailedOpen>().is_some_and(|f| f.limiter.is_some());
    let resp_refund = res.extensions().get::<FailedOpen>().is_some_and(|f| f.refund.is_some());
    let refused_fo = res.extensions().get::<Refused>().map(|r| {
        (
            r.failed_open().is_some_and(|f| f.limiter.is_some()),
            r.failed_open().is_some_and(|f| f.refund.is_some()),
        )
    });
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap();
    let body = String::from_utf8(bytes.to_vec()).unwrap();
    let (fo, refund, decision) = if status == 200 {
        let fo = body.contains("fo=true");
        let refund = body.contains("rf=true");
        let d = body.split("d=").nth(1).unwrap();
        let decision = if d == "None" {
            None
        } else {
            let inner = d.trim_start_matches("Some((").trim_end_matches("))");
            let mut it = inner.split(", ").map(|n| n.parse().unwrap());
            Some((it.next().unwrap(), it.next().unwrap()))
        };
        (fo, refund, decision)
    } else {
        let (fo, refund) = refused_fo.expect("a refusal carries Refused");
        (fo, refund, None)
    };
    (Outcome { status, fo, resp_fo, refund, resp_refund, hdr: [a, b], decision }, (www, body))
}

fn random_layer(rng: &mut StdRng) -> L {
    L {
        gate: rng.random_range(0..2),
        cost: match rng.random_range(0..6) {
            0 => Some(0),
            1 => Some(1),
            2 => Some(2),
            3 => Some(3),
            _ => None,
        },
        pro: rng.random_range(0..3) == 0,
        require: rng.random_range(0..6) == 0,
        sk_only: rng.random_range(0..8) == 0,
        cookie: rng.random_range(0..2) == 0,
        style: match rng.random_range(0..4) {
            0 => Some(BodyStyle::Flat),
            1 => Some(BodyStyle::Nested),
            _ => None,
        },
    }
}

/// The key store and the two keys every case uses.
#[derive(Debug)]
struct Fix {
    keys: MemoryKeyStore,
    clock: FakeClock,
    key: String,
    sk: String,
}

async fn fix() -> Fix {
    let keys = MemoryKeyStore::new();
    let clock = FakeClock::at_2026();
    let ws = Tenant::workspace("ws_t".parse().unwrap());
    let new = NewKey::new("t", NH, ws).scopes(&["events:read"]).unwrap();
    let key =
        KeyManager::new(keys.clone()).create(new).await.unwrap().key().expose_secret().to_owned();
    let new = NewKey::new("s", keygate::format::SK, Tenant::workspace("ws_t".parse().unwrap()))
        .scopes(&["events:read"])
        .unwrap();
    let sk =
        KeyManager::new(keys.clone()).create(new).await.unwrap().key().expose_secret().to_owned();
    Fix { keys, clock, key, sk }
}

/// Runs one case (`reqs` requests in a row); `Err` describes the mismatch.
async fn case(
    f: &Fix,
    layers: &[L],
    fails: [u32; 2],
    refund_down: [bool; 2],
    reqs: usize,
    by_cookie: bool,
) -> Result<(), String> {
    let gates = [
        gate(&f.keys, &f.clock, fails[0], refund_down[0], false),
        gate(&f.keys, &f.clock, fails[1], refund_down[1], true),
    ];
    let app = app(&gates, layers);
    let mut consumed = HashMap::new();
    let mut out = String::new();
    for r in 0..reqs {
        let (want, four01) = model(layers, fails, refund_down, &mut consumed, by_cookie);
        let (got, answer) = run(&app, if by_cookie { &f.sk } else { &f.key }, by_cookie).await;
        // Compare everything but the handler's decision first.
        let strip = |o: &Outcome| Outcome { decision: None, ..o.clone() };
        if strip(&got) != strip(&want) {
            let _ = write!(out, "MAIN req {r}\n     want {want:?}\n     got  {got:?}\n");
        } else if got.decision != want.decision {
            let _ =
                writeln!(out, "DECISION req {r} want {:?} got {:?}", want.decision, got.decision);
        }
        if four01.is_some() {
            let unknown = if by_cookie {
                format!("sk_live_{}", "A".repeat(32))
            } else {
                format!("nh_{}", "0".repeat(64))
            };
            let (u, uanswer) = run(&app, &unknown, by_cookie).await;
            if u.status != 401 || uanswer != answer || got.hdr != [None, None] {
                let _ =
                    write!(out, "401 valid {answer:?} {:?}\n    unknown {uanswer:?}\n", got.hdr);
            }
        }
        if !out.is_empty() {
            return Err(out);
        }
    }
    Ok(())
}

#[tokio::test]
async fn random_stacks_follow_the_rules() {
    let f = fix().await;
    let seed: u64 = std::env::var("SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let n: usize = std::env::var("CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(2000);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut kinds: HashMap<String, (usize, String, usize)> = HashMap::new();
    let mut bad = 0;
    for _ in 0..n {
        let depth = rng.random_range(1..=4);
        let layers: Vec<L> = (0..depth).map(|_| random_layer(&mut rng)).collect();
        let fails = [
            [1, 2, 3, 99][rng.random_range(0..4)],
            [1, 2, 99, 99, 1001, 1002][rng.random_range(0..6)],
        ];
        let refund_down = [rng.random_range(0..4) == 0, rng.random_range(0..4) == 0];
        let reqs = rng.random_range(1..=3);
        let by_cookie = rng.random_range(0..3) == 0;
        if let Err(e) = case(&f, &layers, fails, refund_down, reqs, by_cookie).await {
            bad += 1;
            let kind = e.split_whitespace().next().unwrap().to_owned();
            let entry = kinds.entry(kind).or_insert((0, String::new(), usize::MAX));
            entry.0 += 1;
            if layers.len() < entry.2 {
                entry.2 = layers.len();
                entry.1 = format!(
                    "cookie={by_cookie} fails={fails:?} refund_down={refund_down:?} reqs={reqs}\n{layers:?}\n{e}"
                );
            }
        }
    }
    for (k, (c, ex, _)) in &kinds {
        println!("=== {k}: {c} cases; smallest:\n{ex}");
    }
    println!("{n} cases, {bad} mismatches");
    assert_eq!(bad, 0);
}
