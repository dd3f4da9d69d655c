//! Plan files never panic the loader; an accepted plan set holds only valid
//! policies (the limiter can run every plan without panicking, and a fresh
//! key is admitted), and it re-serialises to JSON that loads to the same set.
#![no_main]

use std::time::Duration;

use keygate::clock::FakeClock;
use keygate::limit::{
    Algorithm, DirectLimiter, HeaderSet, MAX_STACKED, MemoryLimiter, Outcome, Plan, PlanSet, Policy,
};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

const YEAR: Duration = Duration::from_secs(366 * 86_400);

fn valid_policy_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 32
        && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn check_policy(p: &Policy) {
    assert!(valid_policy_name(p.name()), "{p:?}");
    assert!(p.limit() >= 1);
    assert!(!p.period().is_zero() && p.period() <= YEAR);
    assert_eq!(p.period().subsec_nanos(), 0, "plan files give whole seconds");
    assert!(p.emission_interval_nanos() >= 1);
    assert!(p.capacity() >= 1);
    match p.algorithm() {
        Algorithm::Gcra => assert!(p.burst().is_none_or(|b| b >= 1)),
        Algorithm::SlidingWindow => {
            assert!(p.limit() <= Policy::MAX_SLIDING_LIMIT);
            assert!(p.burst().is_none());
        }
        _ => assert!(p.burst().is_none()),
    }
}

fn policy_json(p: &Policy) -> Value {
    let mut o = json!({
        "name": p.name(),
        "limit": p.limit(),
        "window_seconds": p.period().as_secs(),
        "algorithm": p.algorithm().as_str(),
    });
    if let Some(b) = p.burst() {
        o["burst"] = json!(b);
    }
    o
}

fn plan_json(plan: &Plan) -> Value {
    let rate: Vec<Value> = plan.rate().iter().map(policy_json).collect();
    let monthly: Vec<Value> = plan
        .monthly()
        .iter()
        .map(|q| json!({"name": q.name, "limit": q.limit, "counts": q.counts}))
        .collect();
    json!({"rate": rate, "monthly": monthly})
}

fn visible_ascii(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// Runs a short schedule of checks through the limiters: must not panic, a
/// fresh key is admitted, and a cost above a policy's capacity never is.
fn exercise(plan: &Plan) {
    let rate = plan.rate();
    let min_cap = rate.iter().map(Policy::capacity).min().unwrap();
    let clock = FakeClock::at_2026();
    let limiter: MemoryLimiter<String, FakeClock> = MemoryLimiter::with_clock(4, clock.clone());
    let first = limiter.check("k", rate, 1).unwrap();
    assert_eq!(first.outcome(), Outcome::Allowed, "{plan:?}");
    assert_eq!(first.policies().len(), rate.len());
    let max_period = rate.iter().map(Policy::period).max().unwrap();
    let steps = [
        (Duration::ZERO, min_cap),
        (Duration::ZERO, min_cap.saturating_add(1)),
        (max_period / 2, 1),
        (max_period, u32::MAX),
        (YEAR, min_cap),
        (Duration::from_nanos(1), 1),
    ];
    for (advance, cost) in steps {
        clock.advance(advance);
        for d in [limiter.peek("k", rate, cost).unwrap(), limiter.check("k", rate, cost).unwrap()] {
            assert_eq!(d.policies().len(), rate.len());
            if cost > min_cap {
                assert!(!d.is_allowed(), "cost {cost} > capacity {min_cap}: {plan:?}");
            }
            for (name, value) in d.headers(HeaderSet::all()) {
                assert!(!value.is_empty() && visible_ascii(&value), "{name}: {value:?}");
            }
            let _ = d.rejection();
        }
    }
    for p in rate {
        let direct = DirectLimiter::with_clock(p.clone(), clock.clone());
        assert!(direct.check(1).is_allowed(), "{p:?}");
        let _ = direct.check(u32::MAX);
        let _ = direct.decide(p.capacity());
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Through serde (a host's configuration crate), the same set or an
    // error: duplicate keys refused alike.
    let via_serde = serde_json::from_str::<PlanSet>(text);
    assert_eq!(via_serde.is_ok(), PlanSet::from_json(text).is_ok(), "{via_serde:?}");
    if let (Ok(a), Ok(b)) = (&via_serde, PlanSet::from_json(text)) {
        assert_eq!(*a, b);
    }
    let set = match PlanSet::from_json(text) {
        Ok(set) => set,
        Err(e) => {
            assert!(!e.message.is_empty());
            // The path is built from the input's own keys plus a short suffix.
            assert!(e.field.len() <= text.len() + 64, "{e:?}");
            // Every error names where it went wrong, even for an empty key
            // (fuzz/regressions/plans/empty-root-key).
            assert!(!e.field.is_empty(), "{e:?}");
            let _ = e.to_string();
            return;
        }
    };
    let mut plans = serde_json::Map::new();
    for plan in set.iter() {
        assert_eq!(set.get(plan.name()), Some(plan));
        let rate = plan.rate();
        assert!((1..=MAX_STACKED).contains(&rate.len()), "{plan:?}");
        for (i, p) in rate.iter().enumerate() {
            check_policy(p);
            assert!(rate[..i].iter().all(|q| q.name() != p.name()), "duplicate policy name");
        }
        for q in plan.monthly() {
            assert!(!q.counts.is_empty());
            for c in &q.counts {
                assert!(q.counts(c));
            }
        }
        exercise(plan);
        plans.insert(plan.name().to_owned(), plan_json(plan));
    }
    // Round trip: what was loaded, written back out, loads to the same set.
    let out = json!({ "plans": plans }).to_string();
    let again = PlanSet::from_json(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(again, set);
});
