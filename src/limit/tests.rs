// Short names (clock, limiter, policy, decision) keep the scripted
// sequences readable.
#![allow(clippy::many_single_char_names)]

use std::num::NonZeroU32;
use std::time::Duration;

use super::*;
use crate::clock::{Clock, FakeClock};

fn clock() -> FakeClock {
    FakeClock::at_2026()
}

fn fixed(limit: u32, secs: u64) -> Policy {
    Policy::new("default", limit, Duration::from_secs(secs), Algorithm::FixedWindow).unwrap()
}

fn header<'a>(h: &'a [(&'static str, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

#[test]
fn seed_fixed_window_headers_exactly() {
    let c = clock();
    let start = c.now().as_second();
    let l = MemoryLimiter::<String, _>::with_clock(100, c.clone());
    let p = [fixed(3, 1)];
    let mut seen = Vec::new();
    for _ in 0..4 {
        let d = l.check("k", &p, 1).unwrap();
        seen.push(d.headers(HeaderSet::default()));
        c.advance(Duration::from_millis(100));
    }
    for (i, want) in ["2", "1", "0"].iter().enumerate() {
        assert_eq!(header(&seen[i], "X-RateLimit-Remaining"), Some(*want));
        assert_eq!(header(&seen[i], "X-RateLimit-Limit"), Some("3"));
        assert_eq!(header(&seen[i], "X-RateLimit-Reset"), Some((start + 1).to_string().as_str()));
        assert_eq!(header(&seen[i], "Retry-After"), None);
    }
    assert_eq!(header(&seen[3], "X-RateLimit-Remaining"), Some("0"));
    assert_eq!(header(&seen[3], "Retry-After"), Some("1"));
    assert_eq!(header(&seen[3], "X-RateLimit-Reset"), Some((start + 1).to_string().as_str()));
    // The 429 body carries the limit and the same retry.
    let d = l.check("k", &p, 1).unwrap();
    let r = d.rejection().unwrap();
    assert_eq!(
        r,
        crate::http::Rejection::RateLimited { limit: 3, retry_after: Duration::from_secs(1) }
    );
    // The next window admits again.
    c.advance(Duration::from_millis(600));
    assert!(l.check("k", &p, 1).unwrap().is_allowed());
}

#[test]
fn retry_after_is_never_zero_nor_before_reset() {
    let c = clock();
    // Put wall time 0.9 s into a second (X.9), so rounding could disagree:
    // one unit per 1.05 s, used at X.9, is back at X+1.95 (reset X+2).
    c.advance(Duration::from_millis(900));
    let l = MemoryLimiter::<String, _>::with_clock(100, c.clone());
    let p = [Policy::new("d", 1, Duration::from_millis(1050), Algorithm::Gcra).unwrap()];
    let first = l.check("k", &p, 1).unwrap();
    assert!(first.is_allowed());
    let x = first.at().as_second();
    assert_eq!(first.at().subsec_nanosecond(), 900_000_000);
    // Denials (which change nothing) at these offsets after the first
    // check: the wait shrinks from 1.05 s to 1 ms. `Retry-After` is the
    // wait rounded up, but never points before the reset second (X+2)
    // counted from the whole second the client sees (`Date`): at X.95 the
    // wait is 1.0 s, yet X + 1 would be early, so it says 2.
    let mut at = 0;
    for (offset_ms, want_retry) in [(0, 2), (49, 2), (50, 2), (99, 2), (100, 1), (1049, 1)] {
        c.advance(Duration::from_millis(offset_ms - at));
        at = offset_ms;
        let d = l.check("k", &p, 1).unwrap();
        assert!(!d.is_allowed(), "+{offset_ms} ms");
        assert_eq!(d.retry_after(), Some(Duration::from_millis(1050 - offset_ms)));
        assert_eq!(d.reset_unix(), x + 2, "+{offset_ms} ms");
        assert_eq!(d.retry_after_secs(), Some(want_retry), "+{offset_ms} ms");
    }
    c.advance(Duration::from_millis(1));
    assert!(l.check("k", &p, 1).unwrap().is_allowed(), "back at X+1.95");
}

#[test]
fn ietf_headers_list_every_stacked_policy() {
    let c = clock();
    let l = MemoryLimiter::<String, _>::with_clock(100, c);
    let burst = Policy::new("burst", 100, Duration::from_secs(60), Algorithm::FixedWindow).unwrap();
    let day = Policy::new("day", 1000, Duration::from_secs(86_400), Algorithm::Gcra).unwrap();
    let d = l.check("k", &[burst, day], 50).unwrap();
    let h = d.headers(HeaderSet::all());
    assert_eq!(
        header(&h, "RateLimit-Policy"),
        Some("\"burst\";q=100;w=60, \"day\";q=1000;w=86400")
    );
    assert_eq!(header(&h, "RateLimit"), Some("\"burst\";r=50;t=60, \"day\";r=950;t=4320"));
    let only_ietf = d.headers(HeaderSet { x_ratelimit: false, ietf: true, retry_after: true });
    assert!(header(&only_ietf, "X-RateLimit-Limit").is_none());
}

#[test]
fn a_burst_above_the_limit_is_reported_as_its_bucket() {
    // 10 a second with bursts of 50: 50 can go at once, refilled in 5 s.
    let c = clock();
    let l = MemoryLimiter::<String, _>::with_clock(100, c);
    let p = [Policy::new("api", 10, Duration::from_secs(1), Algorithm::Gcra)
        .unwrap()
        .with_burst(50)
        .unwrap()];
    let d = l.check("k", &p, 1).unwrap();
    let h = d.headers(HeaderSet::all());
    assert_eq!(header(&h, "X-RateLimit-Limit"), Some("50"));
    assert_eq!(header(&h, "X-RateLimit-Remaining"), Some("49"), "never above the limit");
    assert_eq!(header(&h, "RateLimit-Policy"), Some("\"api\";q=50;w=5"));
    let direct = DirectLimiter::with_clock(p[0].clone(), clock()).decide(1);
    assert_eq!((direct.policies()[0].limit, direct.remaining()), (50, 49));
}

#[test]
fn stacked_policies_are_all_or_nothing() {
    let l = MemoryLimiter::<String, _>::with_clock(100, clock());
    let burst = Policy::new("burst", 2, Duration::from_secs(1), Algorithm::FixedWindow).unwrap();
    let sustained =
        Policy::new("sustained", 3, Duration::from_secs(60), Algorithm::FixedWindow).unwrap();
    let plan = [burst, sustained];
    assert!(l.check("k", &plan, 2).unwrap().is_allowed());
    // burst is empty: denied, and sustained must not have been charged.
    let d = l.check("k", &plan, 1).unwrap();
    assert_eq!(d.outcome(), Outcome::Limited);
    assert_eq!(d.policies()[1].remaining, 1);
    assert!(d.policies()[1].allowed && !d.policies()[0].allowed);
    assert_eq!(d.binding().name, "burst");
}

#[test]
fn impossible_peek_refund() {
    let l = MemoryLimiter::<String, _>::with_clock(100, clock());
    let p = [fixed(5, 1)];
    let d = l.check("k", &p, 6).unwrap();
    assert_eq!(d.outcome(), Outcome::Impossible);
    assert_eq!(d.retry_after(), None);
    assert_eq!(d.remaining(), 5, "nothing consumed");
    let peek = l.peek("k", &p, 5).unwrap();
    assert!(peek.is_allowed());
    assert_eq!(l.peek("k", &p, 1).unwrap().remaining(), 4, "peek consumed nothing");
    let mut five = l.check("k", &p, 5).unwrap();
    assert!(five.is_allowed());
    assert!(!l.check("k", &p, 1).unwrap().is_allowed());
    l.refund("k", &p, 2, &mut five);
    assert_eq!(l.check("k", &p, 2).unwrap().remaining(), 0);
    // Peeking an unknown key does not start tracking it.
    assert!(l.peek("new", &p, 1).unwrap().is_allowed());
    assert_eq!(l.len(), 1);
}

#[test]
fn plan_change_keeps_state() {
    let l = MemoryLimiter::<String, _>::with_clock(100, clock());
    assert!(l.check("k", &[fixed(3, 1)], 3).unwrap().is_allowed());
    // Upgraded to 5/s in the same window: 2 more, not 5.
    let d = l.check("k", &[fixed(5, 1)], 1).unwrap();
    assert!(d.is_allowed());
    assert_eq!(d.remaining(), 1);
}

#[test]
fn memory_is_bounded_and_eviction_never_frees_a_limited_key() {
    let c = clock();
    let l = MemoryLimiter::<u64, _>::with_clock(1000, c.clone());
    let p = [Policy::new("d", 1, Duration::from_millis(10), Algorithm::Gcra).unwrap()];
    let cap = l.max_keys();
    let mut refused = 0;
    for i in 0..200_000u64 {
        if l.check(&i, &p, 1).is_err() {
            refused += 1;
        }
        assert!(l.len() <= cap);
        // 500 keys live at any time (10 ms / 20 µs), half the cap.
        c.advance(Duration::from_micros(20));
    }
    assert_eq!(refused, 0, "eviction keeps up when keys go fresh");

    // A full limiter of still-limited keys refuses new keys instead of
    // forgetting old ones.
    let c = clock();
    let l = MemoryLimiter::<u64, _>::with_clock(64, c.clone());
    let slow = [Policy::new("d", 1, Duration::from_secs(3600), Algorithm::Gcra).unwrap()];
    let tracked = fill(&l, &slow);
    assert!(l.len() <= l.max_keys());
    for (i, _) in tracked {
        assert!(!l.check(&i, &slow, 1).unwrap().is_allowed(), "key {i} was forgotten");
    }
}

/// Checks keys 0 to 9,999 once each under `p`: the keys the limiter took
/// on (a full one refuses the rest), each with its decision.
fn fill(l: &MemoryLimiter<u64, FakeClock>, p: &[Policy]) -> Vec<(u64, Decision)> {
    (0..10_000u64).filter_map(|i| l.check(&i, p, 1).ok().map(|d| (i, d))).collect()
}

#[test]
fn a_full_limiter_keeps_fixed_window_keys_to_their_windows_last_nanosecond() {
    // A window's end is kept in steps of about a millisecond (ns >> 20):
    // judged fresh from the step after the end, never from the step that
    // holds it, so eviction cannot free a key still limited.
    let c = clock();
    let l = MemoryLimiter::<u64, _>::with_clock(64, c.clone());
    let p = [fixed(1, 1)];
    let tracked = fill(&l, &p);
    let until_end = tracked.last().map_or(Duration::ZERO, |(_, d)| d.binding().reset_after);
    c.advance(until_end.saturating_sub(Duration::from_nanos(1)));
    for i in 10_000..20_000u64 {
        let _ = l.check(&i, &p, 1);
    }
    for (i, _) in tracked {
        assert!(!l.check(&i, &p, 1).unwrap().is_allowed(), "key {i} freed before its window ended");
    }
}

#[test]
fn a_full_limiter_makes_room_the_instant_its_keys_go_fresh() {
    // GCRA, one per 10 ms: a key checked at t is fresh again from t + 10
    // ms on, that very nanosecond included.
    let c = clock();
    let l = MemoryLimiter::<u64, _>::with_clock(64, c.clone());
    let p = [Policy::new("d", 1, Duration::from_millis(10), Algorithm::Gcra).unwrap()];
    let mut n = 0;
    while l.check(&n, &p, 1).is_ok() {
        n += 1;
    }
    assert!(l.len() <= l.max_keys());
    c.advance(Duration::from_millis(10));
    for i in n..n + 64 {
        assert!(l.check(&i, &p, 1).is_ok_and(|d| d.is_allowed()), "key {i} refused");
    }
}

#[test]
fn direct_limiter() {
    let c = clock();
    let d = DirectLimiter::with_clock(Policy::per_second(NonZeroU32::new(2).unwrap()), c.clone());
    assert!(d.check(1).is_allowed());
    assert_eq!(d.check(1).remaining(), 0);
    let s = d.check(1);
    assert!(!s.is_allowed());
    assert_eq!(s.retry_after(), Some(Duration::from_millis(500)));
    assert_eq!(d.check(3).retry_after(), None, "impossible");
    c.advance(Duration::from_millis(500));
    assert!(d.check(1).is_allowed());
    let dec = d.decide(1);
    assert_eq!(dec.outcome(), Outcome::Limited);
    assert_eq!(dec.retry_after_secs(), Some(1));
}

/// A direct limiter's refusal of a cost above what is left reports the
/// units still left, in whole units; its `Debug` names its policy.
#[test]
fn a_direct_refusal_reports_the_whole_units_left() {
    let c = clock();
    let d = DirectLimiter::with_clock(Policy::per_second(NonZeroU32::new(10).unwrap()), c.clone());
    assert_eq!(d.check(7).remaining(), 3);
    let s = d.check(5);
    assert_eq!((s.is_allowed(), s.remaining()), (false, 3));
    // Half a unit refilled: still three whole ones.
    c.advance(Duration::from_millis(50));
    let s = d.check(5);
    assert_eq!((s.is_allowed(), s.remaining()), (false, 3));
    assert!(format!("{d:?}").starts_with("DirectLimiter { policy: Policy {"), "{d:?}");
}

/// A decision's `Debug` (what a host logs) shows the outcome, each
/// policy's state and the units a refund can still give back; not the
/// store's own clock reading, which means nothing outside the store.
#[test]
fn a_decision_debug_shows_what_a_log_needs() {
    let l = MemoryLimiter::<String, _>::with_clock(100, clock());
    let p = [fixed(1, 1)];
    let mut d = l.check("k", &p, 1).unwrap();
    let shown = format!("{d:?}");
    assert!(shown.starts_with("Decision { outcome: Allowed, at: "), "{shown}");
    assert!(shown.contains("policies: [PolicyDecision { name: \"default\""), "{shown}");
    assert!(shown.contains("refundable: 1, .. }"), "{shown}");
    assert!(!shown.contains("mark"), "{shown}");
    l.refund("k", &p, 1, &mut d);
    assert!(format!("{d:?}").contains("refundable: 0"), "{d:?}");
}

#[test]
fn plans_from_json() {
    let text = r#"{"plans": {
      "tiny": {
        "rate": [{"name": "default", "limit": 1000, "window_seconds": 60, "algorithm": "sliding_window"}],
        "monthly": [{"name": "notifications", "limit": 5, "counts": ["webhook"]}]
      },
      "bursty": {"rate": [{"name": "burst", "limit": 10, "window_seconds": 1, "algorithm": "gcra", "burst": 20},
                          {"name": "hour", "limit": 1000, "window_seconds": 3600, "algorithm": "fixed_window"}]}
    }}"#;
    let set = PlanSet::from_json(text).unwrap();
    let tiny = set.get("tiny").unwrap();
    assert_eq!(tiny.rate()[0].limit(), 1000);
    assert_eq!(tiny.rate()[0].algorithm(), Algorithm::SlidingWindow);
    assert_eq!(tiny.monthly()[0], QuotaRule::new("notifications", 5, &["webhook"]));
    assert_eq!(set.get("bursty").unwrap().rate()[0].capacity(), 20);
    for (bad, field) in [
        (
            r#"{"plans": {"x": {"rate": [{"limit": 0, "window_seconds": 1}]}}}"#,
            "plans.x.rate[0].limit",
        ),
        (
            r#"{"plans": {"x": {"rate": [{"limit": 1, "window_seconds": 0}]}}}"#,
            "plans.x.rate[0].window_seconds",
        ),
        (
            r#"{"plans": {"x": {"rate": [{"limit": 1, "window_seconds": 1, "algorithm": "leaky"}]}}}"#,
            "plans.x.rate[0].algorithm",
        ),
        (
            r#"{"plans": {"x": {"rate": [{"limit": 1, "window_seconds": 1, "algorithm": "fixed_window", "burst": 2}]}}}"#,
            "plans.x.rate[0].burst",
        ),
        (
            r#"{"plans": {"x": {"rate": [{"limit": "1", "window_seconds": 1}]}}}"#,
            "plans.x.rate[0].limit",
        ),
        (r#"{"plans": {"x": {"rate": []}}}"#, "plans.x.rate"),
        (
            r#"{"plans": {"x": {"rate": [{"limit": 1, "window_seconds": 1, "extra": 1}]}}}"#,
            "plans.x.rate[0].extra",
        ),
        (
            r#"{"plans": {"x": {"rate": [{"limit": 1, "window_seconds": 1}], "monthly": [{"limit": 1, "counts": []}]}}}"#,
            "plans.x.monthly[0].counts",
        ),
        (r#"{"plan": {}}"#, "plan"),
        (
            r#"{"plans": {"x": {"rate": [{"limit": 1, "window_seconds": 1}], "monthly": [{"name": "n", "limit": 10, "counts": ["webhook"]}, {"name": "n", "limit": 10, "counts": ["email"]}]}}}"#,
            "plans.x.monthly[1].name",
        ),
        (
            r#"{"plans": {"x": {"rate": [{"limit": 1, "window_seconds": 1}], "monthly": [{"limit": 10, "counts": ["webhook"]}, {"limit": 10, "counts": ["email"]}]}}}"#,
            "plans.x.monthly[1].name",
        ),
        (
            r#"{"plans": {"x": {"rate": [{"limit": 1, "window_seconds": 86400, "burst": 367}]}}}"#,
            "plans.x.rate[0].burst",
        ),
        // Monthly quotas that would refuse everything, or name nothing.
        (
            r#"{"plans": {"x": {"rate": [{"limit": 1, "window_seconds": 1}], "monthly": [{"limit": 0, "counts": ["email"]}]}}}"#,
            "plans.x.monthly[0].limit",
        ),
        (
            r#"{"plans": {"x": {"rate": [{"limit": 1, "window_seconds": 1}], "monthly": [{"name": "", "limit": 1, "counts": ["email"]}]}}}"#,
            "plans.x.monthly[0].name",
        ),
        (
            r#"{"plans": {"x": {"rate": [{"limit": 1, "window_seconds": 1}], "monthly": [{"limit": 1, "counts": [""]}]}}}"#,
            "plans.x.monthly[0].counts",
        ),
        (
            r#"{"plans": {"x": {"rate": [{"limit": 1, "window_seconds": 1}], "monthly": [{"limit": 1, "counts": ["email", "email"]}]}}}"#,
            "plans.x.monthly[0].counts",
        ),
        (r#"{"plans": {"": {"rate": [{"limit": 1, "window_seconds": 1}]}}}"#, r#"plans[""].name"#),
    ] {
        assert_eq!(PlanSet::from_json(bad).unwrap_err().field, field, "{bad}");
    }
    // A plan, or a field, named twice is refused (serde_json alone keeps
    // the last silently).
    for bad in [
        r#"{"plans": {"pro": {"rate": [{"limit": 1, "window_seconds": 1}]}, "pro": {"rate": [{"limit": 9, "window_seconds": 1}]}}}"#,
        r#"{"plans": {"pro": {"rate": [{"limit": 1, "limit": 9, "window_seconds": 1}]}}}"#,
    ] {
        let e = PlanSet::from_json(bad).unwrap_err();
        assert!(e.to_string().contains("duplicate key"), "{e}");
        // The same through serde, as a host's configuration reads it.
        #[cfg(feature = "serde")]
        {
            let e = serde_json::from_str::<PlanSet>(bad).err().unwrap();
            assert!(e.to_string().contains("duplicate key"), "{e}");
        }
    }
    #[cfg(feature = "serde")]
    assert_eq!(serde_json::from_str::<PlanSet>(text).unwrap(), set);
}

#[test]
fn a_count_past_u64_is_too_large_not_a_non_integer() {
    for (window, message) in [
        ("100000000000000000000", "is too large"),
        ("1e20", "is too large"),
        ("1.5", "must be a non-negative integer"),
        ("-1", "must be a non-negative integer"),
    ] {
        let json = format!(
            r#"{{"plans": {{"x": {{"rate": [{{"limit": 1, "window_seconds": {window}}}]}}}}}}"#
        );
        let e = PlanSet::from_json(&json).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("plans.x.rate[0].window_seconds", message),
            "{window}"
        );
    }
}

#[test]
fn presets_match_the_seeds() {
    let s = PlanSet::presets();
    // The seeds: "per-second window" for the ingestion tiers, "1-minute
    // rolling window" for the notification tiers.
    let (fixed, rolling) = (Algorithm::FixedWindow, Algorithm::SlidingWindow);
    for (name, limit, secs, alg) in [
        ("hobby", 3, 1, fixed),
        ("starter", 5, 1, fixed),
        ("pro", 10, 1, fixed),
        ("enterprise", 100, 1, fixed),
        ("free", 5, 60, rolling),
        ("indie", 50, 60, rolling),
        ("startup", 200, 60, rolling),
    ] {
        let rate = s.get(name).unwrap().rate();
        assert_eq!(rate.len(), 1, "{name}");
        let p = &rate[0];
        assert_eq!(
            (p.limit(), p.period(), p.algorithm()),
            (limit, Duration::from_secs(secs), alg),
            "{name}"
        );
    }
    assert_eq!(s.get("free").unwrap().monthly()[0].counts, ["email", "webhook"]);
    assert_eq!(s.get("indie").unwrap().monthly()[0].limit, 4000);
    assert!(!s.get("indie").unwrap().monthly()[0].counts("email"));
    assert_eq!(s.get("startup").unwrap().monthly()[0].limit, 15_000);
}

#[test]
fn backwards_clock_never_admits_extra_through_the_limiter() {
    for alg in [Algorithm::Gcra, Algorithm::FixedWindow, Algorithm::SlidingWindow] {
        let c = clock();
        c.advance(Duration::from_secs(10));
        let l = MemoryLimiter::<String, _>::with_clock(16, c.clone());
        let p = [Policy::new("d", 2, Duration::from_secs(1), alg).unwrap()];
        let mut admitted = 0;
        for back in [0, 0, 1, 2, 5] {
            c.rewind(Duration::from_secs(back));
            if l.check("k", &p, 1).unwrap().is_allowed() {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 2, "{alg:?}");
    }
}

#[test]
fn moving_to_a_stacked_plan_keeps_the_single_policy_state() {
    let l = MemoryLimiter::<String, _>::with_clock(16, clock());
    let single = fixed(3, 60);
    assert!(l.check("k", std::slice::from_ref(&single), 3).unwrap().is_allowed());
    let stacked =
        [single, Policy::new("day", 100, Duration::from_secs(86_400), Algorithm::Gcra).unwrap()];
    let d = l.check("k", &stacked, 1).unwrap();
    assert_eq!(d.outcome(), Outcome::Limited, "the 3 units already used still count");
    assert_eq!(d.binding().name, "default");
}

/// Refunds and peeks find a key wherever the writer put it: in a table
/// rebuilt since the key was first checked, and in the locked form after a
/// move (its old slot dead).
#[test]
fn refund_and_peek_follow_a_key_through_rebuilds_and_moves() {
    let l = MemoryLimiter::<u64, _>::with_clock(100_000, clock());
    let p = [Policy::new("d", 2, Duration::from_secs(3600), Algorithm::Gcra).unwrap()];
    let mut first = l.check(&0, &p, 1).unwrap();
    assert_eq!(first.remaining(), 1);
    // Enough new keys to grow (rebuild) every shard's table many times.
    for k in 1..5_000u64 {
        assert!(l.check(&k, &p, 1).unwrap().is_allowed());
    }
    assert_eq!(l.peek(&0, &p, 1).unwrap().remaining(), 0, "state survived the rebuilds");
    l.refund(&0, &p, 1, &mut first);
    assert_eq!(l.check(&0, &p, 1).unwrap().remaining(), 1, "the refund reached the new table");
    assert_eq!(l.check(&0, &p, 1).unwrap().remaining(), 0);
    assert!(!l.check(&0, &p, 1).unwrap().is_allowed());

    // A key moves to the locked form; a single-policy refund and peek of
    // it must find it there, not in its dead slot.
    let stacked =
        [p[0].clone(), Policy::new("g", 1000, Duration::from_secs(1), Algorithm::Gcra).unwrap()];
    let k = 10_000;
    assert!(l.check(&k, &p, 1).unwrap().is_allowed());
    let mut moved = l.check(&k, &stacked, 1).unwrap();
    assert!(moved.is_allowed());
    assert!(!l.check(&k, &p, 1).unwrap().is_allowed(), "2 of 2 used");
    l.refund(&k, &p, 1, &mut moved);
    assert_eq!(l.peek(&k, &p, 1).unwrap().remaining(), 0);
    assert!(l.check(&k, &p, 1).unwrap().is_allowed());
    assert!(!l.check(&k, &stacked, 1).unwrap().is_allowed());
    assert_eq!(l.len(), 5_001);
}

#[test]
fn keys_bigger_than_a_word_keep_their_state_through_rebuilds() {
    // A slot of a key bigger than a word (a `String`) keeps the key's
    // hash, and a rebuild places the key by it without hashing it again:
    // a hash kept wrong would leave every copied key where no probe finds
    // it, fresh again. (The `u64` keys of
    // `refund_and_peek_follow_a_key_through_rebuilds_and_moves` keep no
    // hash.)
    let l = MemoryLimiter::<String, _>::with_clock(100_000, clock());
    let p = [Policy::new("d", 1, Duration::from_secs(3600), Algorithm::Gcra).unwrap()];
    // Enough keys to grow (rebuild) every shard's table many times.
    let keys: Vec<String> = (0..5_000).map(|i| format!("key_{i}")).collect();
    for k in &keys {
        assert!(l.check(k, &p, 1).unwrap().is_allowed());
    }
    for k in &keys {
        assert!(!l.check(k, &p, 1).unwrap().is_allowed(), "{k} forgotten by a rebuild");
    }
    assert_eq!(l.len(), keys.len());
}

#[test]
fn fixed_windows_follow_wall_clock_seconds_through_drift() {
    let c = clock();
    // Start 0.4 s into a Unix second.
    c.set_wall(c.now().checked_add(Duration::from_millis(400)).unwrap());
    let l = MemoryLimiter::<String, _>::with_clock(16, c.clone());
    let p = [fixed(3, 1)];
    let window_end = |d: &Decision| d.reset_unix();
    let d = l.check("a", &p, 1).unwrap();
    assert_eq!(window_end(&d), d.at().as_second() + 1, "the window ends at the next whole second");
    assert_eq!(d.binding().reset_after, Duration::from_millis(600));
    // The wall clock slews 0.4 ms ahead of the monotonic one over a second
    // (NTP's rate is at most 0.5 ms a second); after the next re-anchor,
    // windows follow the wall clock again, by that amount.
    c.advance(Duration::from_secs(2));
    c.set_wall(c.now().checked_add(Duration::from_micros(400)).unwrap());
    c.advance(Duration::from_millis(1100));
    let d = l.check("b", &p, 1).unwrap();
    let into_second = d.at().subsec_nanosecond();
    assert_eq!(
        d.binding().reset_after,
        Duration::from_nanos(u64::try_from(1_000_000_000 - into_second).unwrap())
    );
    assert_eq!(window_end(&d), d.at().as_second() + 1);
}

#[test]
fn wall_clock_steps_neither_refill_nor_lock_out() {
    let c = clock();
    // Room to spare: with a cap of 16 (two keys a shard on two CPUs), the
    // three keys could hash into one shard and the third be refused.
    let l = MemoryLimiter::<String, _>::with_clock(1024, c.clone());
    let minute = [fixed(3, 60)];
    let gcra = [Policy::new("g", 3, Duration::from_secs(1), Algorithm::Gcra).unwrap()];
    for _ in 0..3 {
        assert!(l.check("spent", &minute, 1).unwrap().is_allowed());
    }
    assert!(l.check("once", &minute, 1).unwrap().is_allowed());
    assert!(l.check("g", &gcra, 3).unwrap().is_allowed());
    // An hour forward (a VM resume, a manual change): no fresh quotas.
    c.set_wall(c.now().checked_add(Duration::from_secs(3600)).unwrap());
    c.advance(Duration::from_millis(1100));
    let d = l.check("spent", &minute, 1).unwrap();
    assert!(!d.is_allowed(), "a step forward does not start a new window");
    assert!(d.retry_after().unwrap() <= Duration::from_secs(60));
    // Headers follow the new wall time: the reset lies within a minute of it.
    assert!(d.reset_unix() - d.at().as_second() <= 60, "{} vs {}", d.reset_unix(), d.at());
    // An hour back: nothing is locked out for the hour.
    c.set_wall(c.now().checked_sub(Duration::from_secs(7200)).unwrap());
    c.advance(Duration::from_millis(1100));
    let d = l.check("once", &minute, 1).unwrap();
    assert!(d.is_allowed(), "a step back locks nobody out");
    assert_eq!(d.remaining(), 1);
    c.advance(Duration::from_secs(1));
    let d = l.check("g", &gcra, 3).unwrap();
    assert!(d.is_allowed(), "GCRA refilled at the monotonic rate: {d:?}");
}

/// A wall clock creeping forward between checks, each step within the
/// drift one anchor follows, moves the limiter's time line no faster than
/// a millisecond per second of monotonic time (one anchor a second): 0.9 s
/// of creep within 10 ms does not end a window early, so it hands out no
/// fresh quota.
#[test]
fn a_wall_clock_creeping_between_checks_ends_no_window_early() {
    let c = clock();
    let l = MemoryLimiter::<String, _>::with_clock(16, c.clone());
    let second = [fixed(3, 1)];
    c.advance(Duration::from_millis(500));
    for _ in 0..3 {
        assert!(l.check("k", &second, 1).unwrap().is_allowed());
    }
    for step in 0..1_000 {
        c.set_wall(c.now().checked_add(Duration::from_micros(900)).unwrap());
        c.advance(Duration::from_micros(10));
        let d = l.check("k", &second, 1).unwrap();
        assert!(!d.is_allowed(), "step {step}: {d:?}");
    }
}

#[test]
fn unix_ceil_matches_exact_arithmetic() {
    let exact = |at: Timestamp, after: Duration| {
        let n = at.as_nanosecond() + i128::try_from(after.as_nanos()).unwrap();
        i64::try_from(n.div_euclid(1_000_000_000) + i128::from(n.rem_euclid(1_000_000_000) != 0))
            .unwrap()
    };
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    for i in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let secs = (x % 4_000_000_000).cast_signed() - 1_000_000_000;
        let sub = (x >> 33) as i32 % 1_000_000_000 * if secs < 0 { -1 } else { 1 };
        let at = Timestamp::new(secs, if i % 7 == 0 { 0 } else { sub }).unwrap();
        let after = Duration::new(x % 100_000, ((x >> 20) % 1_000_000_000) as u32);
        let after = if i % 5 == 0 { Duration::from_secs(after.as_secs()) } else { after };
        let at_ns = i64::try_from(at.as_nanosecond()).unwrap();
        assert_eq!(super::unix_ceil(at_ns, after), exact(at, after), "{at} + {after:?}");
    }
}

#[test]
fn plan_errors_always_name_an_unambiguous_field() {
    // Found by the `plans` fuzz target: an empty key named no field.
    let e = PlanSet::from_json(r#"{"":{}}"#).unwrap_err();
    assert_eq!(e.field, r#"[""]"#);
    let e = PlanSet::from_json(r#"{"plans": {"a.b": {"rate": [], "x": 1}}}"#).unwrap_err();
    assert_eq!(e.field, r#"plans["a.b"].x"#);
    let e = PlanSet::from_json(r#"{"plans": {"tiny": {"rte": []}}}"#).unwrap_err();
    assert_eq!(e.field, "plans.tiny.rte");
    // Underscores and hyphens are plain name characters: no quoting.
    for name in ["my_plan", "my-plan", "a_b-c"] {
        let json = format!(r#"{{"plans": {{"{name}": {{"rte": []}}}}}}"#);
        assert_eq!(PlanSet::from_json(&json).unwrap_err().field, format!("plans.{name}.rte"));
    }
}

#[cfg(feature = "http")]
#[test]
fn small_numbers_are_their_decimal_form() {
    for n in -5..1100_i64 {
        let want = (0..1000).contains(&n).then(|| n.to_string());
        assert_eq!(small_number(n).map(str::to_owned), want, "{n}");
    }
}

#[cfg(feature = "http")]
#[test]
fn a_number_header_is_its_decimal_form_however_recently_rendered() {
    // Repeats, more distinct numbers than the thread remembers, returns
    // after eviction, small and negative numbers, and the same numbers not
    // marked as repeating.
    let numbers = [
        1_764_201_234,
        1_000_000_000,
        1_764_201_234,
        5_000,
        999,
        1_000,
        12_345,
        67_890,
        1_000_000_000,
        -5,
        i64::MAX,
        i64::MIN,
        1_764_201_235,
        1_764_201_234,
    ];
    for repeats in [true, false, true] {
        for n in numbers {
            let v = number_value(n, repeats).unwrap();
            assert_eq!(v.to_str().unwrap(), n.to_string(), "{n} (repeats: {repeats})");
        }
    }
}

#[cfg(feature = "http")]
#[test]
fn an_http_header_map_gets_exactly_the_listed_headers() {
    let l = MemoryLimiter::<String, _>::with_clock(100, clock());
    let burst = Policy::new("burst", 100, Duration::from_secs(60), Algorithm::FixedWindow).unwrap();
    let day = Policy::new("day", 5000, Duration::from_secs(86_400), Algorithm::Gcra).unwrap();
    // Small and large limits, a denial (Retry-After), and the IETF fields.
    let plan = [burst, day];
    let allowed = l.check("k", &plan, 1).unwrap();
    let denied = l.check("k", &plan, 100).unwrap();
    assert!(!denied.is_allowed());
    for d in [allowed, denied] {
        let listed = d.headers(HeaderSet::all());
        let mut map = ::http::HeaderMap::new();
        d.append_headers(HeaderSet::all(), &mut map);
        assert_eq!(map.len(), listed.len());
        for (name, value) in &listed {
            assert_eq!(map.get(*name).unwrap(), value.as_str(), "{name}");
        }
    }
}

#[cfg(feature = "http")]
#[test]
fn an_http_header_map_gets_each_family_it_lacks_small_or_large() {
    use ::http::{HeaderMap, HeaderName, HeaderValue};
    let l = MemoryLimiter::<String, _>::with_clock(100, clock());
    let p = [fixed(1, 1)];
    assert!(l.check("k", &p, 1).unwrap().is_allowed());
    let denied = l.check("k", &p, 1).unwrap();
    let all = denied.headers(HeaderSet::all());
    // Up to eight names are compared one by one, more are looked up: the
    // same answer either way. A family held in part by two of its fields
    // is held as much as by one (the two must not cancel out).
    for others in [0, 1, 7, 8, 20] {
        for (own, stands) in [
            (&["x-ratelimit-reset"][..], &["x-ratelimit-limit", "x-ratelimit-remaining"][..]),
            (&["x-ratelimit-limit", "x-ratelimit-remaining"][..], &["x-ratelimit-reset"][..]),
            (&["ratelimit"][..], &["ratelimit-policy"][..]),
            (&["ratelimit-policy", "ratelimit"][..], &[][..]),
            (&["retry-after"][..], &[][..]),
        ] {
            let mut map = HeaderMap::new();
            for i in 0..others {
                let name = HeaderName::try_from(format!("x-other-{i}")).unwrap();
                map.insert(name, HeaderValue::from_static("1"));
            }
            for name in own {
                map.insert(HeaderName::from_static(name), HeaderValue::from_static("7"));
            }
            denied.rendered_headers(HeaderSet::all()).fill_in(&mut map);
            for name in own {
                let values: Vec<_> = map.get_all(*name).iter().collect();
                assert_eq!(values, ["7"], "{name} of {own:?} among {others}");
            }
            for name in stands {
                assert!(!map.contains_key(*name), "{name} beside {own:?} among {others}");
            }
            let added = all.len() - own.len() - stands.len();
            assert_eq!(map.len(), others + own.len() + added, "{own:?} among {others}: {map:?}");
        }
    }
}

/// Model-based: whatever the keyed limiter does with its tables (growth,
/// purges at a tiny cap, moves between the one-word and the locked form),
/// every decision equals that of a plain map of per-policy slots stepped
/// with the same algorithm. GCRA only, whose steps do not depend on where
/// the time line starts, so the model can count from the fake clock's
/// monotonic time.
mod model {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;
    use crate::limit::algorithm::{self, Slot};

    #[derive(Debug, Clone)]
    enum Op {
        Check { key: u64, plan: usize, cost: u32 },
        Peek { key: u64, plan: usize, cost: u32 },
        Refund { key: u64, plan: usize, cost: u32 },
        Advance { ms: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        let args = (0..40u64, 0..3usize, 1..4u32);
        prop_oneof![
            6 => args.clone().prop_map(|(key, plan, cost)| Op::Check { key, plan, cost }),
            1 => args.clone().prop_map(|(key, plan, cost)| Op::Peek { key, plan, cost }),
            1 => args.prop_map(|(key, plan, cost)| Op::Refund { key, plan, cost }),
            1 => (0..3_000u64).prop_map(|ms| Op::Advance { ms }),
        ]
    }

    fn plans() -> [Vec<Policy>; 3] {
        let gcra = |name, limit, ms| {
            Policy::new(name, limit, Duration::from_millis(ms), Algorithm::Gcra).unwrap()
        };
        let a = gcra("a", 4, 1_000);
        [vec![a.clone()], vec![a, gcra("b", 6, 10_000)], vec![gcra("b", 6, 10_000)]]
    }

    /// What a key's last consume charged: per policy, its name and what
    /// the check left in its state; and the cost.
    /// Per policy of the charged check: its name, and its receipt, or for
    /// GCRA the check's time and emission interval (the receipt is the
    /// end of the check's own share, by the units still charged).
    type Charged = Option<(Vec<(&'static str, Receipt)>, u32)>;

    #[derive(Clone, Copy)]
    enum Receipt {
        At(u64),
        Share { at: u64, interval: u64 },
    }

    /// The reference: per key, per policy name, a slot; and per key what
    /// its last consume charged (the check a refund gives back).
    #[derive(Default)]
    struct Model(HashMap<u64, HashMap<&'static str, Slot>>, HashMap<u64, Charged>);

    impl Model {
        fn check(
            &mut self,
            key: u64,
            policies: &[Policy],
            cost: u32,
            now: u64,
            consume: bool,
        ) -> (Outcome, Vec<u32>) {
            let slots = self.0.entry(key).or_default();
            let steps: Vec<_> = policies
                .iter()
                .map(|p| algorithm::step(p, slots.get(p.name()).unwrap_or(&Slot::Fresh), now, cost))
                .collect();
            let outcome = if steps.iter().any(|(s, _)| s.impossible) {
                Outcome::Impossible
            } else if steps.iter().all(|(s, _)| s.allowed) {
                Outcome::Allowed
            } else {
                Outcome::Limited
            };
            let mut remaining = Vec::new();
            let mut receipts = Vec::new();
            for (p, (s, next)) in policies.iter().zip(steps) {
                let name: &'static str = if p.name() == "a" { "a" } else { "b" };
                receipts.push((
                    name,
                    if p.algorithm() == Algorithm::Gcra {
                        Receipt::Share { at: now, interval: p.emission_interval_nanos() }
                    } else {
                        Receipt::At(now + s.reset_after)
                    },
                ));
                if outcome == Outcome::Allowed
                    && consume
                    && let Some(next) = next
                {
                    next.apply(slots.entry(name).or_default());
                }
                let unconsumed = outcome != Outcome::Allowed && s.allowed;
                remaining.push(if unconsumed { s.remaining + cost } else { s.remaining });
            }
            if consume {
                let charged = (outcome == Outcome::Allowed).then_some((receipts, cost));
                self.1.insert(key, charged);
            }
            (outcome, remaining)
        }

        /// Gives back what the key's last consume charged, policy by
        /// policy where the refund's plan has the check's at that place.
        fn refund(&mut self, key: u64, policies: &[Policy], cost: u32, now: u64) {
            let (Some(slots), Some(Some((receipts, charged)))) =
                (self.0.get_mut(&key), self.1.get_mut(&key))
            else {
                return;
            };
            // What is given back is taken off the charge.
            let give = cost.min(*charged);
            let held = *charged;
            *charged -= give;
            if give == 0 {
                return;
            }
            for (p, (name, receipt)) in policies.iter().zip(receipts.iter()) {
                if p.name() == *name {
                    let receipt = match *receipt {
                        Receipt::At(r) => r,
                        Receipt::Share { at, interval } => at + u64::from(held) * interval,
                    };
                    let slot = slots.entry(name).or_insert(Slot::Fresh);
                    algorithm::refund(p, slot, now, give, Some(receipt));
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn the_keyed_limiter_decides_like_a_plain_map(cap in 1..64usize, ops in prop::collection::vec(op(), 1..400)) {
            let c = clock();
            let l = MemoryLimiter::<u64, _>::with_clock(cap, c.clone());
            let plans = plans();
            let mut model = Model::default();
            let mut last: HashMap<u64, Decision> = HashMap::new();
            for op in ops {
                let now = c.monotonic().as_u64();
                match op {
                    Op::Check { key, plan, cost } | Op::Peek { key, plan, cost } => {
                        let consume = matches!(op, Op::Check { .. });
                        let p = &plans[plan];
                        let got = if consume { l.check(&key, p, cost) } else { l.peek(&key, p, cost) };
                        // A refusal to track a new key changes nothing.
                        let Ok(d) = got else { continue };
                        let want = model.check(key, p, cost, now, consume);
                        if consume {
                            last.insert(key, d.clone());
                        }
                        let remaining: Vec<u32> = d.policies().iter().map(|p| p.remaining).collect();
                        prop_assert_eq!((d.outcome(), remaining), want, "{:?}", op);
                    }
                    Op::Refund { key, plan, cost } => {
                        if let Some(d) = last.get_mut(&key) {
                            l.refund(&key, &plans[plan], cost, d);
                            model.refund(key, &plans[plan], cost, now);
                        }
                    }
                    Op::Advance { ms } => c.advance(Duration::from_millis(ms)),
                }
                prop_assert!(l.len() <= l.max_keys());
            }
        }
    }

    /// A step of a stream of keys at the cap: a new key, an earlier key
    /// again (tracked still, or forgotten: a revival), under any plan (a
    /// move between the one-word and the locked form), a refund, or a
    /// little time (keys going fresh one at a time).
    #[derive(Debug, Clone)]
    enum Stream {
        New {
            plan: usize,
            cost: u32,
        },
        /// The key `back` new keys ago, or if `dead` the `back`-th key
        /// with a dead slot (forgotten in place, or moved to the locked
        /// form): a revival, or a check in the locked form.
        Again {
            back: u64,
            dead: bool,
            plan: usize,
            cost: u32,
            peek: bool,
        },
        Refund {
            back: u64,
            plan: usize,
            cost: u32,
        },
        Advance {
            ms: u64,
        },
    }

    /// Steps for a limiter of `cap` keys: the keys forgotten last are
    /// about `cap` new keys back.
    fn stream(cap: usize) -> impl Strategy<Value = Stream> {
        let plan = prop_oneof![6 => Just(0usize), 1 => Just(1), 1 => Just(2)];
        let cap = cap as u64;
        let back = prop_oneof![0..cap + 1, cap..2 * cap + 16];
        let again = (prop_oneof![back.clone(), 0..8u64], any::<bool>(), plan.clone(), 1..4u32);
        prop_oneof![
            // One unit: keys of one plan go fresh in the order they came.
            5 => plan.clone().prop_map(|plan| Stream::New { plan, cost: 1 }),
            4 => (again, prop::bool::weighted(0.1)).prop_map(|((back, dead, plan, cost), peek)| {
                Stream::Again { back, dead, plan, cost, peek }
            }),
            1 => (back, plan, 1..4u32)
                .prop_map(|(back, plan, cost)| Stream::Refund { back, plan, cost }),
            4 => prop_oneof![16 => 0..4u64, 1 => 0..200u64].prop_map(|ms| Stream::Advance { ms }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// At its cap, with keys going fresh one at a time (each purge
        /// forgets a few in place, and copies a table once a sixteenth of
        /// it is dead), forgotten keys coming back and moving between the
        /// forms, the limiter still decides every check as a map that
        /// forgets nothing, and its bookkeeping stays exact.
        #[test]
        fn a_stream_of_keys_at_the_cap_decides_like_a_plain_map(
            (cap, shards, ops) in (
                prop_oneof![1..8usize, 16..64usize, 100..200usize],
                prop_oneof![Just(1usize), Just(4)],
            ).prop_flat_map(|(cap, shards)| {
                (Just(cap), Just(shards), prop::collection::vec(stream(cap), 1..1_200))
            }),
        ) {
            let c = clock();
            let l = MemoryLimiter::<u64, _>::with_shards(cap, c.clone(), shards);
            let plans = plans();
            let mut model = Model::default();
            let mut last: HashMap<u64, Decision> = HashMap::new();
            let mut next = 0u64;
            for op in ops {
                let now = c.monotonic().as_u64();
                let (key, plan, cost, consume) = match op {
                    Stream::New { plan, cost } => {
                        next += 1;
                        (next, plan, cost, true)
                    }
                    Stream::Again { back, dead: true, plan, cost, peek } => {
                        let dead = l.dead_keys();
                        let Some(&key) = dead.get(back as usize % dead.len().max(1)) else {
                            continue;
                        };
                        (key, plan, cost, !peek)
                    }
                    Stream::Again { back, dead: false, plan, cost, peek } => {
                        (next.saturating_sub(back), plan, cost, !peek)
                    }
                    Stream::Refund { back, plan, cost } => {
                        let key = next.saturating_sub(back);
                        if let Some(d) = last.get_mut(&key) {
                            l.refund(&key, &plans[plan], cost, d);
                            model.refund(key, &plans[plan], cost, now);
                        }
                        continue;
                    }
                    Stream::Advance { ms } => {
                        c.advance(Duration::from_millis(ms));
                        continue;
                    }
                };
                let p = &plans[plan];
                let got = if consume { l.check(&key, p, cost) } else { l.peek(&key, p, cost) };
                if let Ok(d) = got {
                    let want = model.check(key, p, cost, now, consume);
                    if consume {
                        last.insert(key, d.clone());
                    }
                    let remaining: Vec<u32> = d.policies().iter().map(|p| p.remaining).collect();
                    prop_assert_eq!((d.outcome(), remaining), want, "{:?} key {}", op, key);
                }
                if let Err(e) = l.bookkeeping() {
                    return Err(TestCaseError::fail(format!("after {op:?} of key {key}: {e}")));
                }
            }
        }
    }
}

#[test]
fn plan_changes_keep_counts_within_their_own_windows() {
    let c = clock();
    let l = MemoryLimiter::<String, _>::with_clock(64, c.clone());
    let g = Policy::new("g", 1_000, Duration::from_secs(1), Algorithm::Gcra).unwrap();
    for stacked in [false, true] {
        let plan = |p: Policy| if stacked { vec![p, g.clone()] } else { vec![p] };
        let key = format!("k{stacked}");
        // Longer window, same name: the ten counted in the one-second
        // window hold only until it ends, not for the new period's count.
        let second = plan(fixed(10, 1));
        for _ in 0..10 {
            assert!(l.check(&key, &second, 1).unwrap().is_allowed());
        }
        let minute = plan(fixed(100, 60));
        let d = l.check(&key, &minute, 1).unwrap();
        assert!(d.is_allowed(), "stacked {stacked}");
        assert!(d.binding().reset_after <= Duration::from_secs(60), "stacked {stacked}: {d:?}");
        // Shorter window: the minute's count holds for the current second's
        // window only (the key used at least this policy's whole limit; it
        // is not locked out for the rest of the minute), and the decision
        // says so (its reset and retry agree).
        let key = format!("s{stacked}");
        for _ in 0..50 {
            assert!(l.check(&key, &minute, 1).unwrap().is_allowed());
        }
        let d = l.check(&key, &second, 1).unwrap();
        assert!(!d.is_allowed(), "stacked {stacked}");
        let p = &d.policies()[0];
        assert_eq!(p.retry_after, Some(p.reset_after), "stacked {stacked}");
        assert!(p.reset_after <= Duration::from_secs(1), "stacked {stacked}: {p:?}");
        c.advance(p.reset_after);
        assert!(l.check(&key, &second, 1).unwrap().is_allowed(), "stacked {stacked}");
    }
    // A sliding window downgraded below what it holds: no underflow.
    let startup =
        [Policy::new("default", 200, Duration::from_secs(60), Algorithm::SlidingWindow).unwrap()];
    let free =
        [Policy::new("default", 5, Duration::from_secs(60), Algorithm::SlidingWindow).unwrap()];
    let mut last = None;
    for _ in 0..150 {
        let d = l.check("slide", &startup, 1).unwrap();
        assert!(d.is_allowed());
        last = Some(d);
    }
    let d = l.check("slide", &free, 1).unwrap();
    assert!(!d.is_allowed());
    assert_eq!(d.remaining(), 0);
    // A huge refund gives back what the check took, no more.
    l.refund("slide", &free, u32::MAX, &mut last.unwrap());
    assert!(!l.check("slide", &free, 1).unwrap().is_allowed(), "149 still in the minute");
    let big = [Policy::new("big", 200, Duration::from_secs(60), Algorithm::SlidingWindow).unwrap()];
    let mut d = l.check("slide", &big, 150).unwrap();
    l.refund("slide", &big, u32::MAX, &mut d);
    assert!(l.check("slide", &big, 200).unwrap().is_allowed(), "all 150 given back");
}

/// A fixed window's units are gone once it has ended, in the one-word form
/// as in the locked form (and on Redis): a plan change (same name) at the
/// very end of a window does not carry its count into the new policy's
/// window.
#[test]
fn a_window_that_has_ended_carries_nothing_into_a_plan_change() {
    let c = clock();
    let l = MemoryLimiter::<String, _>::with_clock(64, c.clone());
    let g = Policy::new("g", 1_000, Duration::from_secs(1), Algorithm::Gcra).unwrap();
    // 2 s windows end on even seconds after midnight; 2 s is no multiple
    // of 5 s.
    c.advance(Duration::from_millis(500));
    for stacked in [true, false] {
        let plan = |p: Policy| if stacked { vec![p, g.clone()] } else { vec![p] };
        let key = format!("k{stacked}");
        assert!(l.check(&key, &plan(fixed(5, 2)), 5).unwrap().is_allowed());
        // To the window's end: it counts nothing from here on.
        let end = l.check(&key, &plan(fixed(5, 2)), 0).unwrap().policies()[0].reset_after;
        c.advance(end);
        let d = l.check(&key, &plan(fixed(6, 5)), 1).unwrap();
        assert_eq!(d.policies()[0].remaining, 5, "stacked {stacked}: {d:?}");
        // Half a second into a window ending 12 s after midnight.
        c.advance(Duration::from_millis(8_500));
    }
}

/// Windows shorter than a word's resolution (its ends are kept to about a
/// millisecond) are kept exactly: each of 300 one-millisecond windows in a
/// row admits exactly its limit, and the next window starts fresh, at its
/// own end, never a window later.
#[test]
fn windows_shorter_than_a_words_resolution_stay_exact() {
    let c = clock();
    let l = MemoryLimiter::<u64, _>::with_clock(16, c.clone());
    let p = [Policy::new("ms", 2, Duration::from_millis(1), Algorithm::FixedWindow).unwrap()];
    c.advance(Duration::from_micros(250));
    for window in 0..300 {
        let admitted = (0..3).map(|_| l.check(&1, &p, 1).unwrap().is_allowed());
        assert_eq!(admitted.collect::<Vec<_>>(), [true, true, false], "window {window}");
        let reset = l.check(&1, &p, 0).unwrap().policies()[0].reset_after;
        assert_eq!(reset, Duration::from_micros(750), "window {window}");
        c.advance(Duration::from_millis(1));
    }
}

#[test]
fn an_impossible_request_is_not_told_to_retry() {
    let c = clock();
    let l = MemoryLimiter::<String, _>::with_clock(16, c.clone());
    let small = fixed(3, 1);
    let d = l.check("k", std::slice::from_ref(&small), 4).unwrap();
    assert_eq!(d.outcome(), Outcome::Impossible);
    assert_eq!(header(&d.headers(HeaderSet::all()), "Retry-After"), None);
    let r = d.rejection().unwrap();
    assert_eq!(r, crate::http::Rejection::CostExceedsLimit { limit: 3 });
    let res = r.to_response(crate::http::BodyStyle::Flat, c.now());
    assert_eq!(res.status, 429);
    assert_eq!(res.header("Retry-After"), None);
    assert_eq!(res.body, r#"{"error":"Request cost exceeds the rate limit","limit":3}"#);
    // Stacked: one policy would make it wait, another can never fit it.
    let wide = Policy::new("wide", 100, Duration::from_secs(60), Algorithm::FixedWindow).unwrap();
    for _ in 0..100 {
        assert!(l.check("s", std::slice::from_ref(&wide), 1).unwrap().is_allowed());
    }
    let d = l.check("s", &[wide, small.named("small").unwrap()], 4).unwrap();
    assert_eq!(d.outcome(), Outcome::Impossible);
    assert_eq!(d.retry_after(), None);
    assert_eq!(header(&d.headers(HeaderSet::all()), "Retry-After"), None);
    assert_eq!(d.rejection(), Some(crate::http::Rejection::CostExceedsLimit { limit: 3 }));
    assert_eq!(header(&d.headers(HeaderSet::all()), "X-RateLimit-Limit"), Some("3"));
}

#[test]
fn a_plan_change_of_algorithm_carries_what_was_used() {
    let c = clock();
    let l = MemoryLimiter::<String, _>::with_clock(64, c.clone());
    let other = Policy::new("other", 1_000, Duration::from_secs(1), Algorithm::Gcra).unwrap();
    let gcra = Policy::new("default", 3, Duration::from_secs(1), Algorithm::Gcra).unwrap();
    let sliding =
        Policy::new("default", 5, Duration::from_secs(60), Algorithm::SlidingWindow).unwrap();
    for stacked in [false, true] {
        let plan =
            |p: &Policy| if stacked { vec![p.clone(), other.clone()] } else { vec![p.clone()] };
        // Hobby (fixed 3/s) to GCRA 3/s: the three used this second count.
        let key = format!("g{stacked}");
        for _ in 0..3 {
            assert!(l.check(&key, &plan(&fixed(3, 1)), 1).unwrap().is_allowed());
        }
        assert!(!l.check(&key, &plan(&gcra), 1).unwrap().is_allowed(), "stacked {stacked}");
        // Hobby to free (sliding 5/min): two more this minute, not five.
        let key = format!("s{stacked}");
        for _ in 0..3 {
            assert!(l.check(&key, &plan(&fixed(3, 1)), 1).unwrap().is_allowed());
        }
        let admitted = (0..5).filter(|_| l.check(&key, &plan(&sliding), 1).unwrap().is_allowed());
        assert_eq!(admitted.count(), 2, "stacked {stacked}");
        // GCRA 3/s used up, then fixed 3/s: nothing more this second.
        let key = format!("f{stacked}");
        assert!(l.check(&key, &plan(&gcra), 3).unwrap().is_allowed());
        assert!(!l.check(&key, &plan(&fixed(3, 1)), 1).unwrap().is_allowed(), "stacked {stacked}");
    }
}

#[test]
fn a_sliding_log_carries_only_its_units_inside_the_new_period() {
    // Free (sliding 5 a minute) with 2 units 10 s ago and 1 now becomes a
    // fixed 3 per 5 s: only the unit of the last 5 s is carried over, so
    // two more this window, not none.
    let c = clock();
    let l = MemoryLimiter::<String, _>::with_clock(64, c.clone());
    let sliding =
        [Policy::new("default", 5, Duration::from_secs(60), Algorithm::SlidingWindow).unwrap()];
    assert!(l.check("k", &sliding, 2).unwrap().is_allowed());
    c.advance(Duration::from_secs(10));
    assert!(l.check("k", &sliding, 1).unwrap().is_allowed());
    let admitted = (0..4).filter(|_| l.check("k", &[fixed(3, 5)], 1).unwrap().is_allowed());
    assert_eq!(admitted.count(), 2);
}

#[test]
fn converted_states_are_capped_and_kept() {
    let c = clock();
    let l = MemoryLimiter::<String, _>::with_clock(64, c.clone());
    let other = Policy::new("other", 1_000, Duration::from_secs(1), Algorithm::Gcra).unwrap();
    let slow = Policy::new("default", 1, Duration::from_secs(60), Algorithm::Gcra)
        .unwrap()
        .with_burst(5)
        .unwrap();
    for stacked in [false, true] {
        let plan = |p: Policy| if stacked { vec![p, other.clone()] } else { vec![p] };
        let key = format!("k{stacked}");
        // Five minutes of GCRA time borrowed, then a plan of 100 a second:
        // the first window is full, the next one is not.
        assert!(l.check(&key, &plan(slow.clone()), 5).unwrap().is_allowed());
        let fast = plan(fixed(100, 1));
        let d = l.check(&key, &fast, 1).unwrap();
        assert!(!d.is_allowed(), "stacked {stacked}");
        let wait = d.retry_after().unwrap();
        assert!(wait <= Duration::from_secs(1), "stacked {stacked}: {wait:?}");
        c.advance(wait);
        assert!(l.check(&key, &fast, 1).unwrap().is_allowed(), "stacked {stacked}: not locked out");
    }
}

#[test]
fn a_repeated_policy_name_is_charged_once() {
    let c = clock();
    let l = MemoryLimiter::<String, _>::with_clock(64, c);
    let p = Policy::new("x", 10, Duration::from_secs(60), Algorithm::SlidingWindow).unwrap();
    let twice = [p.clone(), p];
    let admitted = (0..12).filter(|_| l.check("k", &twice, 1).unwrap().is_allowed()).count();
    assert_eq!(admitted, 10);
}

#[test]
fn a_sliding_key_whose_period_grew_is_not_evicted_while_it_still_limits() {
    // The plan becomes 5 an hour, and the first call under it is a check
    // (denied: the five count): what stays must outlive the old minute. A
    // refund under the hour instead (of a check under the minute: nothing
    // given back) changes nothing: the key fares as one with no call.
    let mut outcomes = Vec::new();
    for first in ["check", "refund", "none"] {
        let c = clock();
        let l = MemoryLimiter::<String, _>::with_clock(64, c.clone());
        let sliding = |secs| {
            Policy::new("s", 5, Duration::from_secs(secs), Algorithm::SlidingWindow).unwrap()
        };
        let (minute, hour) = ([sliding(60)], [sliding(3600)]);
        let mut last = None;
        for _ in 0..5 {
            let d = l.check("k", &minute, 1).unwrap();
            assert!(d.is_allowed());
            last = Some(d);
        }
        c.advance(Duration::from_secs(30));
        match first {
            "check" => assert!(!l.check("k", &hour, 1).unwrap().is_allowed()),
            "refund" => l.refund("k", &hour, 1, &mut last.unwrap()),
            _ => {}
        }
        // Past the old minute; new keys fill the limiter and purge it.
        c.advance(Duration::from_secs(32));
        let quick = [Policy::new("q", 1, Duration::from_millis(1), Algorithm::Gcra).unwrap()];
        for i in 0..1000 {
            let _ = l.check(&format!("n{i}"), &quick, 1);
            c.advance(Duration::from_millis(2));
        }
        outcomes.push(l.check("k", &hour, 1).unwrap().is_allowed());
    }
    assert!(!outcomes[0], "checked under the hour: evicted while still limiting");
    assert_eq!(outcomes[1], outcomes[2], "the refund that gave nothing changed the key");
}

#[test]
fn a_sliding_key_whose_period_shrank_makes_room_once_the_short_window_passes() {
    // The plan goes from 5 an hour to 5 a second under one name: the
    // state written under the second lasts a second, not the hour it was
    // first kept for, so a full limiter takes a new key once it passes.
    let c = clock();
    let l = MemoryLimiter::<u64, _>::with_clock(1, c.clone());
    let sliding =
        |secs| [Policy::new("s", 5, Duration::from_secs(secs), Algorithm::SlidingWindow).unwrap()];
    let (hour, second) = (sliding(3600), sliding(1));
    assert!(l.check(&0, &hour, 1).unwrap().is_allowed());
    c.advance(Duration::from_secs(2));
    assert!(l.check(&0, &second, 1).unwrap().is_allowed());
    assert!(l.check(&1, &second, 1).is_err(), "full while key 0 still counts");
    c.advance(Duration::from_secs(2));
    assert!(l.peek(&0, &second, 5).unwrap().is_allowed(), "fresh under the second");
    assert!(l.check(&1, &second, 1).is_ok_and(|d| d.is_allowed()), "refused beside a fresh key");
}

#[test]
fn keys_refunded_to_nothing_make_room_for_new_ones() {
    // A day's fixed window on a full limiter, every admission refunded (an
    // upstream outage): the keys count nothing, so new keys take their place
    // instead of being refused until midnight.
    let c = clock();
    let l = MemoryLimiter::<String, _>::with_clock(64, c);
    let day = [Policy::new("d", 100, Duration::from_secs(86_400), Algorithm::FixedWindow).unwrap()];
    let mut refused = 0;
    for i in 0..2_000 {
        let k = format!("k{i}");
        match l.check(&k, &day, 1) {
            Ok(mut d) if d.is_allowed() => l.refund(&k, &day, 1, &mut d),
            Ok(_) => {}
            Err(_) => refused += 1,
        }
    }
    assert_eq!(refused, 0);
}

#[test]
fn a_key_refunded_to_an_earlier_fresh_time_makes_room_from_then() {
    // Two a 10 s period: a check of both borrows 10 s, and a refund of one
    // gives 5 s back. A full limiter that refused a new key while the key
    // was fresh in 10 s makes room from 5 s on.
    let p = [Policy::new("g", 2, Duration::from_secs(10), Algorithm::Gcra).unwrap()];
    for n in [1, 256] {
        let c = clock();
        let l = MemoryLimiter::<u64, _>::with_shards(1, c.clone(), n);
        let mut d = l.check(&1, &p, 2).unwrap();
        assert!(l.check(&2, &p, 1).is_err(), "full");
        l.refund(&1, &p, 1, &mut d);
        c.advance(Duration::from_secs(6));
        assert!(l.peek(&1, &p, 2).unwrap().is_allowed(), "not fresh yet");
        assert!(l.check(&2, &p, 1).is_ok_and(|d| d.is_allowed()), "{n} shards: refused");
    }
}

#[test]
fn extreme_clocks_do_not_panic() {
    // Debug builds check overflow: a wall clock that jumps by five
    // centuries (a custom clock), and a monotonic clock near its end.
    let c = clock();
    let l = MemoryLimiter::<String, _>::with_clock(64, c.clone());
    let p = [fixed(2, 1)];
    assert!(l.check("k", &p, 1).unwrap().is_allowed());
    c.set_wall("2250-01-01T00:00:00Z".parse().unwrap());
    c.advance(Duration::from_secs(2));
    assert!(l.check("k", &p, 1).unwrap().is_allowed());
    c.set_wall("1720-01-01T00:00:00Z".parse().unwrap());
    c.advance(Duration::from_secs(2));
    assert!(l.check("k", &p, 1).unwrap().is_allowed());
    let mono = c.monotonic().as_u64();
    c.advance(Duration::from_nanos(u64::MAX - mono - 5));
    let _ = l.check("k", &p, 1).unwrap();
    let _ = l.check("k", &p, 1).unwrap();
}

#[test]
fn wall_times_beyond_2262_are_held_at_the_nearer_end_not_read_as_1970() {
    use std::sync::{Arc, Mutex};
    // A custom clock may read any time of jiff's range. A decision keeps
    // Unix nanoseconds, held at the nearer end of an i64 (1678 or 2262);
    // the window limiters' wall anchor read a time beyond as an offset of
    // zero, so their headers said 1970: a reset centuries before now.
    struct Wall(FakeClock, Mutex<jiff::Timestamp>);
    impl Clock for Wall {
        fn now(&self) -> jiff::Timestamp {
            *self.1.lock().unwrap()
        }
        fn monotonic(&self) -> crate::clock::Nanos {
            self.0.monotonic()
        }
    }
    for end in [jiff::Timestamp::MAX, jiff::Timestamp::MIN] {
        let held = Decision::from_policies(Outcome::Allowed, [], end).at();
        // Made at the end of time, and moved there after it was made.
        for start in [end, clock().now()] {
            let c = clock();
            let w = Arc::new(Wall(c.clone(), Mutex::new(start)));
            let keyed = MemoryLimiter::<u64, _>::with_clock(8, Arc::clone(&w));
            let direct = DirectLimiter::with_clock(fixed(1, 1), Arc::clone(&w));
            *w.1.lock().unwrap() = end;
            c.advance(Duration::from_secs(2));
            let k = keyed.check(&1, &[fixed(1, 1)], 1).unwrap();
            for d in [k, direct.decide(1)] {
                let off = (d.at().as_second() - held.as_second()).abs();
                assert!(off <= 3, "{end} ({start}): {d:?} is not near {held}");
                assert!(d.reset_unix() >= d.at().as_second(), "{d:?}");
            }
        }
    }
}

#[test]
fn a_stale_clock_reading_does_not_shift_header_times() {
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};
    // A monotonic clock that serves queued (stale) readings first: a thread
    // that read the clock, was descheduled while another re-anchored, and
    // then carried on.
    struct Stale {
        queued: Mutex<VecDeque<u64>>,
        now: AtomicU64,
        base: jiff::Timestamp,
    }
    impl Clock for &'static Stale {
        fn now(&self) -> jiff::Timestamp {
            let ns = i64::try_from(self.now.load(Ordering::SeqCst)).unwrap();
            self.base + jiff::SignedDuration::from_nanos(ns)
        }
        fn monotonic(&self) -> crate::clock::Nanos {
            let queued = self.queued.lock().unwrap().pop_front();
            crate::clock::Nanos::new(queued.unwrap_or_else(|| self.now.load(Ordering::SeqCst)))
        }
    }
    let c: &'static Stale = Box::leak(Box::new(Stale {
        queued: Mutex::new(VecDeque::new()),
        now: AtomicU64::new(0),
        base: "2026-01-01T00:00:00Z".parse().unwrap(),
    }));
    let l = MemoryLimiter::<u64, _>::with_clock(16, c);
    let p = [Policy::per_second(NonZeroU32::new(1000).unwrap())];
    c.now.store(2_000_000_000, Ordering::SeqCst);
    assert_eq!(l.check(&1, &p, 1).unwrap().at(), c.now(), "anchored two seconds in");
    // Half a second stale, read just after that anchor.
    c.queued.lock().unwrap().push_back(1_500_000_000);
    let _ = l.check(&1, &p, 1).unwrap();
    assert_eq!(l.check(&1, &p, 1).unwrap().at(), c.now(), "header times unmoved");
}

#[test]
fn a_full_limiter_is_a_full_store_not_an_unreachable_one() {
    let c = clock();
    let l = MemoryLimiter::<String, _>::with_clock(1, c);
    let p = [fixed(1, 3600)];
    // Fill the limiter with keys still limiting.
    let mut full = None;
    for i in 0..10_000 {
        let key = format!("k{i}");
        let mut f = std::pin::pin!(LimitStore::check(&l, &key, &p, 1, CheckMode::Consume));
        let std::task::Poll::Ready(r) =
            f.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
        else {
            unreachable!("in memory")
        };
        if let Err(e) = r {
            full = Some(e);
            break;
        }
    }
    let e = full.expect("a bounded limiter fills up");
    assert!(matches!(e, crate::backend::BackendError::Full { .. }), "{e}");
    assert!(e.to_string().contains("full"), "{e}");
}

/// Limiters of `max_keys` on this host's shard count and on 256 shards (64
/// CPUs): when keys are refused must not depend on it.
fn on_both_shard_counts<K: std::hash::Hash + Eq + Clone>(
    max_keys: usize,
) -> [MemoryLimiter<K, FakeClock>; 2] {
    [
        MemoryLimiter::with_clock(max_keys, clock()),
        MemoryLimiter::with_shards(max_keys, clock(), 256),
    ]
}

#[test]
fn the_first_key_refused_finds_max_keys_keys_tracked() {
    // Keys do not fill shards evenly: a share of the cap per shard refused
    // new keys of `new(1_000)` on 256 shards at about a quarter of the cap.
    let p = [fixed(1, 3600)];
    for max in [1, 7, 100, 1_000] {
        for l in on_both_shard_counts::<String>(max) {
            let refused = (0u32..).find_map(|i| l.check(&format!("k{i}"), &p, 1).err()).unwrap();
            assert_eq!((l.len(), refused.max, l.max_keys()), (max, max, max), "{l:?}");
            let said = refused.to_string();
            assert!(said.contains(&format!("maximum of {max} keys")), "{said}");
        }
    }
}

#[test]
fn threads_adding_keys_at_once_fill_the_cap_exactly() {
    // Every key limits for an hour, so each admission keeps its place:
    // however the threads interleave, exactly `max_keys` are admitted.
    let p = [fixed(1, 3600)];
    for max in [1, 7, 100, 1_000] {
        for l in on_both_shard_counts::<u64>(max) {
            let start = std::sync::Barrier::new(4);
            let admitted: usize = std::thread::scope(|s| {
                let threads: Vec<_> = (0..4u64)
                    .map(|t| {
                        let (l, p, start) = (&l, &p, &start);
                        s.spawn(move || {
                            start.wait();
                            let keys = (0..u64::try_from(max).unwrap()).map(|i| t << 32 | i);
                            keys.filter(|k| l.check(k, p, 1).is_ok()).count()
                        })
                    })
                    .collect();
                threads.into_iter().map(|t| t.join().unwrap()).sum()
            });
            assert_eq!((admitted, l.len()), (max, max), "{l:?}");
        }
    }
}

#[test]
fn a_huge_capacity_saturates() {
    assert_eq!(MemoryLimiter::<u64>::new(usize::MAX).max_keys(), usize::MAX);
}

#[test]
fn a_monotonic_clock_counting_from_the_unix_epoch_still_limits() {
    // A custom clock whose monotonic time is Unix nanoseconds (past 2^60):
    // the limiter's one-word states count from the limiter's own origin.
    struct UnixMono(FakeClock);
    impl Clock for UnixMono {
        fn now(&self) -> jiff::Timestamp {
            self.0.now()
        }
        fn monotonic(&self) -> crate::clock::Nanos {
            crate::clock::Nanos::new(u64::try_from(self.0.now().as_nanosecond()).unwrap_or(0))
        }
    }
    let c = clock();
    assert!(UnixMono(c.clone()).monotonic().as_u64() > 1 << 60);
    let l = MemoryLimiter::<u64, _>::with_clock(64, UnixMono(c.clone()));
    let gcra = Policy::per_minute(NonZeroU32::new(1).unwrap());
    for (key, p) in [(1, fixed(1, 60)), (2, gcra)] {
        let p = [p];
        assert!(l.check(&key, &p, 1).unwrap().is_allowed(), "{key}");
        assert!(!l.check(&key, &p, 1).unwrap().is_allowed(), "{key}: limited");
        c.advance(Duration::from_secs(61));
        assert!(l.check(&key, &p, 1).unwrap().is_allowed(), "{key}: a new period");
    }
}

#[test]
fn denials_of_new_keys_and_empty_policy_lists_track_nothing() {
    let c = clock();
    let l = MemoryLimiter::<String, _>::with_clock(64, c);
    let p = [fixed(2, 3600)];
    let stacked = [
        fixed(2, 3600),
        Policy::new("m", 5, Duration::from_secs(60), Algorithm::SlidingWindow).unwrap(),
    ];
    // Fill the limiter with keys that still limit.
    let mut i = 0;
    while l.check(&format!("k{i}"), &p, 1).is_ok() {
        i += 1;
        assert!(i < 10_000);
    }
    let full = l.len();
    for (name, policies) in [("word", &p[..]), ("locked", &stacked[..])] {
        // A cost no window can hold: impossible, not a capacity error.
        let d = l.check(&format!("new-{name}"), policies, 3).unwrap();
        assert_eq!(d.outcome(), Outcome::Impossible, "{name}");
    }
    let d = l.check("new-none", &[], 1).unwrap();
    assert!(d.is_allowed() && d.policies().is_empty());
    assert_eq!(l.len(), full, "nothing was tracked");
}

#[test]
fn a_limiter_is_empty_until_it_tracks_a_key() {
    let l = MemoryLimiter::<String, _>::with_clock(64, clock());
    let p = [fixed(2, 3600)];
    assert!(l.is_empty());
    // A peek, an impossible request and an empty policy list track nothing.
    assert!(l.peek("k", &p, 1).unwrap().is_allowed());
    assert_eq!(l.check("k", &p, 3).unwrap().outcome(), Outcome::Impossible);
    assert!(l.check("k", &[], 1).unwrap().is_allowed());
    assert!(l.is_empty());
    assert!(l.check("k", &p, 1).unwrap().is_allowed());
    assert!(!l.is_empty());
    assert_eq!(l.len(), 1);
}

#[test]
fn a_sliding_refund_gives_back_the_refunded_checks_entry() {
    // 2 a minute: A at 0 s, B at 30 s; A is refunded at 31 s. Giving back
    // B's entry (the newest) would keep A's, which expires at 60 s and lets
    // a third request into B's minute.
    let c = clock();
    let l = MemoryLimiter::<String, _>::with_clock(64, c.clone());
    let p = [Policy::new("s", 2, Duration::from_secs(60), Algorithm::SlidingWindow).unwrap()];
    let mut a = l.check("k", &p, 1).unwrap(); // A at 0
    assert!(a.is_allowed());
    c.advance(Duration::from_secs(30));
    assert!(l.check("k", &p, 1).unwrap().is_allowed()); // B at 30
    c.advance(Duration::from_secs(1));
    l.refund("k", &p, 1, &mut a); // A fails
    assert!(l.check("k", &p, 1).unwrap().is_allowed()); // C at 31
    c.advance(Duration::from_secs(29));
    // At 60 s the last minute holds B and C.
    assert!(!l.check("k", &p, 1).unwrap().is_allowed(), "a third in (0, 60]");
}

#[test]
fn gcra_admits_at_most_two_bursts_less_one_in_any_period() {
    // 3 a second: a burst of 3 at 0, then one every third of a second. In
    // [0, 1 s) GCRA allows 2L - 1 = 5; a rounded-down emission interval
    // (333,333,333 ns) let a sixth in at 999,999,999 ns.
    let c = clock();
    let l = MemoryLimiter::<String, _>::with_clock(64, c.clone());
    let p = [Policy::new("g", 3, Duration::from_secs(1), Algorithm::Gcra).unwrap()];
    let mut admitted = (0..3).filter(|_| l.check("k", &p, 1).unwrap().is_allowed()).count();
    for _ in 0..3 {
        c.advance(Duration::from_nanos(333_333_333));
        admitted += usize::from(l.check("k", &p, 1).unwrap().is_allowed());
    }
    assert_eq!(admitted, 5, "at most 2L - 1 within one period");
}

#[test]
fn a_stacked_denial_reports_the_policy_that_makes_the_client_wait_longest() {
    let c = clock();
    let l = MemoryLimiter::<String, _>::with_clock(64, c.clone());
    let burst = Policy::new("burst", 10, Duration::from_secs(1), Algorithm::FixedWindow).unwrap();
    let hour = Policy::new("hour", 100, Duration::from_secs(3600), Algorithm::FixedWindow).unwrap();
    let p = [burst, hour];
    // Ten a second for ten seconds: the hour is used up as the tenth
    // second's burst is.
    for s in 0..10 {
        for _ in 0..10 {
            assert!(l.check("k", &p, 1).unwrap().is_allowed(), "second {s}");
        }
        if s < 9 {
            c.advance(Duration::from_secs(1));
        }
    }
    let d = l.check("k", &p, 1).unwrap();
    assert!(!d.is_allowed());
    assert!(d.policies().iter().all(|p| !p.allowed), "both deny");
    assert_eq!(d.binding().name.as_str(), "hour");
    assert_eq!(d.limit(), 100);
    assert!(d.retry_after().unwrap() > Duration::from_secs(60));
}

#[test]
fn stacked_policies_used_up_together_report_the_later_reset() {
    // Both policies reach zero in one admitted request: the headers name
    // the one that resets last, when the client can send again; the
    // first one's reset would be a time the next request is still refused.
    let c = clock();
    let start = c.now().as_second();
    let l = MemoryLimiter::<String, _>::with_clock(64, c.clone());
    let p = [
        fixed(2, 1),
        Policy::new("hour", 2, Duration::from_secs(3600), Algorithm::FixedWindow).unwrap(),
    ];
    assert!(l.check("k", &p, 1).unwrap().is_allowed());
    let d = l.check("k", &p, 1).unwrap();
    assert!(d.is_allowed());
    assert_eq!(d.binding().name.as_str(), "hour");
    let h = d.headers(HeaderSet::default());
    assert_eq!(header(&h, "X-RateLimit-Remaining"), Some("0"));
    let reset: i64 = header(&h, "X-RateLimit-Reset").unwrap().parse().unwrap();
    assert_eq!(reset, start + 3600);
    c.advance(Duration::from_secs((reset - start).unsigned_abs()));
    assert!(l.check("k", &p, 1).unwrap().is_allowed(), "admitted at the advertised reset");
}

#[test]
fn shortcut_policies_stack() {
    // Each shortcut is named by its period, so a stack of them keeps one
    // state per policy: the hourly limit binds, the per-second one too.
    let c = clock();
    let l = MemoryLimiter::<String, _>::with_clock(16, c.clone());
    let nz = |n| NonZeroU32::new(n).unwrap();
    let p = [Policy::per_second(nz(10)), Policy::per_hour(nz(20))];
    let mut admitted = 0;
    for _ in 0..5 {
        for _ in 0..12 {
            admitted += usize::from(l.check("k", &p, 1).unwrap().is_allowed());
        }
        c.advance(Duration::from_secs(1));
    }
    assert_eq!(admitted, 20, "the hourly limit binds across seconds");
    // Within one second, the per-second limit binds first.
    let fresh = MemoryLimiter::<String, _>::with_clock(16, c.clone());
    let in_one_second = (0..12).filter(|_| fresh.check("k", &p, 1).unwrap().is_allowed()).count();
    assert_eq!(in_one_second, 10);
}

#[test]
fn a_plan_change_to_a_shorter_gcra_horizon_does_not_lock_the_key_out() {
    // Same name, same algorithm, a shorter horizon: a key that used the
    // hourly burst has used the new policy's whole burst, no more.
    let c = clock();
    let l = MemoryLimiter::<String, _>::with_clock(16, c.clone());
    let hourly = [Policy::new("default", 100, Duration::from_secs(3600), Algorithm::Gcra).unwrap()];
    let per_second = [Policy::new("default", 10, Duration::from_secs(1), Algorithm::Gcra).unwrap()];
    for _ in 0..100 {
        assert!(l.check("k", &hourly, 1).unwrap().is_allowed());
    }
    let d = l.check("k", &per_second, 1).unwrap();
    assert!(!d.is_allowed());
    assert_eq!(d.remaining(), 0);
    let retry = d.retry_after().unwrap();
    assert!(retry <= Duration::from_millis(100), "one unit's interval, not an hour: {retry:?}");
    c.advance(retry);
    assert!(l.check("k", &per_second, 1).unwrap().is_allowed());
    // ...and it is limited by the new policy from there: no full burst.
    assert!(!l.check("k", &per_second, 1).unwrap().is_allowed());
}

#[test]
fn a_check_with_a_slightly_stale_clock_reading_never_erases_units() {
    // Another thread read the clock later and wrote first: this check's
    // `now` lags the state by a little. The state is the policy's own, not
    // a longer policy's, and nothing it counted is forgotten.
    for alg in [Algorithm::Gcra, Algorithm::FixedWindow] {
        let c = clock();
        c.advance(Duration::from_millis(1_001));
        let l = MemoryLimiter::<String, _>::with_clock(16, c.clone());
        let p = [Policy::new("d", 100, Duration::from_secs(1), alg).unwrap()];
        for _ in 0..50 {
            assert!(l.check("k", &p, 1).unwrap().is_allowed());
        }
        c.rewind(Duration::from_millis(2));
        let _ = l.check("k", &p, 1).unwrap();
        c.advance(Duration::from_millis(52));
        let admitted = (0..100).filter(|_| l.check("k", &p, 1).unwrap().is_allowed()).count();
        // Fixed: 49 left in the window. GCRA: 49, plus the 5.2 units the
        // 52 ms regenerated at 10 ms each, rounded down.
        let want = if alg == Algorithm::Gcra { 54 } else { 49 };
        assert_eq!(admitted, want, "{alg:?}: after 51 of 100");
    }
}

#[test]
fn a_repeated_name_keeps_the_first_policys_state() {
    // One name twice: the state is the first policy's, and a later one of a
    // shorter span never converts it (as in the Lua script).
    let c = clock();
    let l = MemoryLimiter::<String, _>::with_clock(16, c.clone());
    let hourly = Policy::new("x", 3, Duration::from_secs(3600), Algorithm::FixedWindow).unwrap();
    let second = Policy::new("x", 100, Duration::from_secs(1), Algorithm::FixedWindow).unwrap();
    let both = [hourly, second];
    let mut admitted = 0;
    for _ in 0..5 {
        for _ in 0..3 {
            admitted += usize::from(l.check("k", &both, 1).unwrap().is_allowed());
        }
        c.advance(Duration::from_millis(1_500));
    }
    assert_eq!(admitted, 3, "the hourly limit holds across seconds");
}

fn gcra_named(name: &'static str, limit: u32, period: Duration) -> Policy {
    Policy::new(name, limit, period, Algorithm::Gcra).unwrap()
}

#[test]
fn a_key_converted_to_a_shorter_plan_makes_room_when_fresh() {
    // An hour's state converted to a one-second plan of the same name (a
    // plan change) is fresh within seconds: a new key must find room then,
    // in the one-word form and in the locked one (the purge that makes it
    // must not wait for the hour its shard's next purge was due at).
    let mut refused = Vec::new();
    for (long, short) in [
        (
            vec![gcra_named("a", 1, Duration::from_secs(3600))],
            vec![gcra_named("a", 1, Duration::from_secs(1))],
        ),
        (
            vec![
                gcra_named("a", 1, Duration::from_secs(3600)),
                gcra_named("b", 1, Duration::from_secs(3600)),
            ],
            vec![
                gcra_named("a", 1, Duration::from_secs(1)),
                gcra_named("b", 1, Duration::from_secs(1)),
            ],
        ),
    ] {
        let c = clock();
        let l = MemoryLimiter::<u64, _>::with_clock(1, c.clone());
        assert!(l.check(&0, &long, 1).unwrap().is_allowed());
        // The one place is `a`'s.
        let b = 1;
        assert!(l.check(&b, &short, 1).is_err(), "a new key beside a");
        assert!(!l.check(&0, &short, 1).unwrap().is_allowed(), "converted: the burst is used");
        c.advance(Duration::from_secs(3));
        assert!(l.peek(&0, &short, 1).unwrap().is_allowed(), "fresh under the new plan");
        assert!(l.peek(&0, &long, 1).unwrap().is_allowed(), "and under the old one");
        if l.check(&b, &short, 1).is_err() {
            refused.push(long.len());
        }
    }
    assert!(refused.is_empty(), "refused while the only key is fresh, policies: {refused:?}");
}

#[test]
fn locked_keys_refunded_to_nothing_make_room_for_new_ones() {
    // As `keys_refunded_to_nothing_make_room_for_new_ones`, for the states
    // that do not fit a word: stacked windows and a sliding window.
    for plan in [
        vec![
            Policy::new("d", 100, Duration::from_secs(86_400), Algorithm::FixedWindow).unwrap(),
            Policy::new("h", 100, Duration::from_secs(3_600), Algorithm::FixedWindow).unwrap(),
        ],
        vec![Policy::new("s", 100, Duration::from_secs(86_400), Algorithm::SlidingWindow).unwrap()],
    ] {
        let l = MemoryLimiter::<String, _>::with_clock(64, clock());
        let mut refused = 0;
        for i in 0..2_000 {
            let k = format!("k{i}");
            match l.check(&k, &plan, 1) {
                Ok(mut d) if d.is_allowed() => l.refund(&k, &plan, 1, &mut d),
                Ok(_) => {}
                Err(_) => refused += 1,
            }
        }
        assert_eq!(refused, 0, "{:?}", plan.iter().map(Policy::name).collect::<Vec<_>>());
    }
}

#[test]
fn a_direct_gcra_after_a_step_back_decides_as_the_keyed_one() {
    // `DirectLimiter` decides as `MemoryLimiter` does for one key: after a
    // monotonic clock stepped back (a fake clock rewound) the state is
    // converted (the burst used), not a lock-out for the whole step.
    let p = gcra_named("a", 1, Duration::from_secs(1));
    let (c, keyed, direct) = used_up_then_rewound(&p, Duration::from_secs(10));
    for _ in 0..3 {
        let k = keyed.check("k", std::slice::from_ref(&p), 1).unwrap();
        let d = direct.check(1);
        assert_eq!((d.is_allowed(), d.retry_after()), (k.is_allowed(), k.retry_after()));
        assert!(k.retry_after() <= Some(Duration::from_secs(1)), "a second at most: {k:?}");
        c.advance(Duration::from_millis(400));
    }
}

#[test]
fn a_direct_gcra_late_on_its_time_line_converts_a_step_back_to_a_used_burst() {
    // The same after 2^63 ns on the monotonic clock (a custom clock, or a
    // fake one advanced that far): the converted arrival time is kept
    // whole, not cut to a one-word state's 63 bits, which put it in the
    // distant past and handed out a fresh burst.
    let p = gcra_named("a", 1, Duration::from_secs(1));
    let c = clock();
    c.advance(Duration::from_nanos(1 << 63) + Duration::from_secs(100));
    let direct = DirectLimiter::with_clock(p, c.clone());
    assert!(direct.check(1).is_allowed());
    c.rewind(Duration::from_secs(10));
    let d = direct.check(1);
    assert!(!d.is_allowed(), "the burst was used before the step back: {d:?}");
    assert_eq!(d.retry_after(), Some(Duration::from_secs(1)));
}

#[test]
fn a_repeated_name_keeps_its_state_for_the_longest_period() {
    // One name twice, sliding: the first policy (3 a second) writes the
    // log, the second (3 a minute) still counts it after the first's
    // second: the key is not forgotten while it does.
    let c = clock();
    let l = MemoryLimiter::<u64, _>::with_clock(1, c.clone());
    let both = [
        Policy::new("x", 3, Duration::from_secs(1), Algorithm::SlidingWindow).unwrap(),
        Policy::new("x", 3, Duration::from_secs(60), Algorithm::SlidingWindow).unwrap(),
    ];
    for _ in 0..3 {
        assert!(l.check(&0, &both, 1).unwrap().is_allowed());
    }
    c.advance(Duration::from_secs(2));
    for k in 1..200u64 {
        let _ = l.check(&k, &both, 1);
    }
    c.advance(Duration::from_secs(2));
    let d = l.check(&0, &both, 1).unwrap();
    assert!(!d.is_allowed(), "a fourth unit within the minute: {d:?}");
}

/// Repeated quota names and categories are found in linear time: a plan
/// file may list any number of them, and the pairwise check it replaced
/// took quadratic time (release build, `PlanSet::from_json`: a `counts`
/// array of 64 KiB took 92 ms, of 512 KiB 4.1 s, ratio 45 for 8× the
/// input; 8k quotas 4 ms, 64k quotas 169 ms). No timing is asserted: at
/// these sizes the pairwise check (5·10⁹ comparisons) would not finish in
/// any test run's patience, the sets take milliseconds.
#[test]
fn many_quotas_and_categories_are_checked_in_linear_time() {
    const N: usize = 100_000;
    let rate = || vec![Policy::new("d", 1, Duration::from_secs(1), Algorithm::Gcra).unwrap()];
    let quota = |counts: &[String]| {
        vec![QuotaRule::new("q", 1, &counts.iter().map(String::as_str).collect::<Vec<_>>())]
    };
    let mut counts: Vec<String> = (0..N).map(|i| format!("c{i}")).collect();
    assert!(Plan::new("p", rate(), quota(&counts)).is_ok());
    counts.push("c0".to_owned());
    let e = Plan::new("p", rate(), quota(&counts)).unwrap_err();
    assert_eq!(e.field, "monthly[0].counts");
    let mut quotas: Vec<QuotaRule> =
        (0..N).map(|i| QuotaRule::new(format!("q{i}"), 1, &["c"])).collect();
    assert!(Plan::new("p", rate(), quotas.clone()).is_ok());
    quotas.push(QuotaRule::new("q0", 1, &["c"]));
    let e = Plan::new("p", rate(), quotas).unwrap_err();
    assert_eq!(e.field, format!("monthly[{N}].name"));
}

/// `distinct_counts` runs on every quota check: past a handful of
/// categories it uses a set (pairwise, a rule of 8k categories cost 100 ms
/// a request in the memory store, 64k 5.3 s; now 0.36 ms and 3.3 ms). Both
/// ways give each category once, in first-listed order.
#[test]
fn distinct_counts_short_and_long_lists_agree() {
    for n in [3, 16, 17, 5_000] {
        let mut counts: Vec<String> = (0..n).map(|i| format!("c{}", i % (n / 2 + 1))).collect();
        counts.push("c0".to_owned());
        let refs: Vec<&str> = counts.iter().map(String::as_str).collect();
        let rule = QuotaRule::new("q", 1, &refs);
        let want: Vec<String> = (0..=n / 2).take(n).map(|i| format!("c{i}")).collect();
        assert_eq!(rule.distinct_counts().collect::<Vec<_>>(), want, "{n}");
    }
}

/// Every shape of path an entry's error is joined to its plan's with
/// (entries are read with an empty path, see `under`): the object itself,
/// a plain field, a quoted one.
#[test]
fn plan_entry_errors_name_their_path() {
    for (bad, field) in [
        (r#"{"plans": {"x": {"rate": [1]}}}"#, "plans.x.rate[0]"),
        (
            r#"{"plans": {"a.b": {"rate": [{"limit": 1, "window_seconds": 1, "c.d": 1}]}}}"#,
            r#"plans["a.b"].rate[0]["c.d"]"#,
        ),
        (
            r#"{"plans": {"x": {"rate": [{"limit": 1, "window_seconds": 1}], "monthly": [{"limit": 1, "counts": ["a"]}, "q"]}}}"#,
            "plans.x.monthly[1]",
        ),
        (
            r#"{"plans": {"x": {"rate": [{"limit": 1, "window_seconds": 1}], "monthly": [{"name": 1, "limit": 1, "counts": ["a"]}]}}}"#,
            "plans.x.monthly[0].name",
        ),
    ] {
        assert_eq!(PlanSet::from_json(bad).unwrap_err().field, field, "{bad}");
    }
}

/// A check of no units (a peek, or a policy's view of a stacked denial)
/// reports a sliding window as restored once its newest entry leaves, not
/// a whole period from now; an empty window has nothing to wait for.
#[test]
fn a_sliding_windows_view_without_units_resets_when_its_newest_entry_leaves() {
    let c = clock();
    let l = MemoryLimiter::<String, _>::with_clock(64, c.clone());
    let minute =
        Policy::new("minute", 5, Duration::from_secs(60), Algorithm::SlidingWindow).unwrap();
    let empty = l.peek("k", std::slice::from_ref(&minute), 0).unwrap();
    assert_eq!(empty.policies()[0].reset_after, Duration::ZERO, "nothing used");
    let burst = fixed(1, 10);
    let p = [burst, minute];
    assert!(l.check("k", &p, 1).unwrap().is_allowed());
    c.advance(Duration::from_secs(5));
    let peek = l.peek("k", &p[1..], 0).unwrap();
    assert_eq!(peek.policies()[0].reset_after, Duration::from_secs(55), "peek");
    // Denied by the 10 s window: the minute's entry of 5 s ago leaves in 55 s.
    let d = l.check("k", &p, 1).unwrap();
    assert_eq!(d.outcome(), Outcome::Limited);
    assert_eq!(d.policies()[1].reset_after, Duration::from_secs(55), "{d:?}");
    let h = d.headers(HeaderSet::all());
    assert_eq!(header(&h, "RateLimit"), Some("\"default\";r=0;t=5, \"minute\";r=4;t=55"));
    c.advance(Duration::from_secs(55));
    assert_eq!(l.peek("k", &p[1..], 0).unwrap().remaining(), 5, "restored then");
}

/// `RateLimit`'s `t=` counts whole seconds as `Retry-After` does, from the
/// whole second the client sees: for the same wait they never disagree,
/// nor point before `X-RateLimit-Reset`.
#[test]
fn ietf_reset_seconds_agree_with_retry_after_and_the_reset_header() {
    let c = clock();
    // Wall time X.95: one unit per 1.05 s, used at X.9, back at X+1.95.
    c.advance(Duration::from_millis(900));
    let l = MemoryLimiter::<String, _>::with_clock(100, c.clone());
    let p = [Policy::new("d", 1, Duration::from_millis(1050), Algorithm::Gcra).unwrap()];
    let first = l.check("k", &p, 1).unwrap();
    let x = first.at().as_second();
    let h = first.headers(HeaderSet::all());
    // Restored at X+1.95: the reset second is X+2, two from X.
    assert_eq!(header(&h, "X-RateLimit-Reset"), Some((x + 2).to_string().as_str()));
    assert_eq!(header(&h, "RateLimit"), Some("\"d\";r=0;t=2"));
    c.advance(Duration::from_millis(50));
    let d = l.check("k", &p, 1).unwrap();
    assert!(!d.is_allowed());
    let h = d.headers(HeaderSet::all());
    assert_eq!(header(&h, "X-RateLimit-Reset"), Some((x + 2).to_string().as_str()));
    assert_eq!(header(&h, "Retry-After"), Some("2"));
    assert_eq!(header(&h, "RateLimit"), Some("\"d\";r=0;t=2"), "as Retry-After");
}

#[test]
fn a_jump_of_years_with_the_wall_clock_a_day_behind_does_not_stop_time() {
    // Monotonic time jumps 1,001 days while the wall clock moves a day and
    // a second less: a drift within 1,000 ppm of the jump, so the phase
    // follows it, a day back. The limiter's time line must still run (and
    // headers tell the wall time), not stand still at its end with every
    // window full for good.
    let c = clock();
    let keyed = MemoryLimiter::<String, _>::with_clock(64, c.clone());
    let direct = DirectLimiter::with_clock(fixed(3, 1), c.clone());
    let p = [fixed(3, 1)];
    assert!(keyed.check("k", &p, 1).unwrap().is_allowed());
    assert!(direct.check(1).is_allowed());
    c.advance(Duration::from_secs(1_001 * 86_400));
    c.set_wall(c.now().checked_sub(Duration::from_secs(86_401)).unwrap());
    for second in 0..3 {
        let keyed_admitted = (0..4).filter(|_| keyed.check("k", &p, 1).unwrap().is_allowed());
        assert_eq!(keyed_admitted.count(), 3, "keyed, second {second}");
        let direct_admitted = (0..4).filter(|_| direct.check(1).is_allowed());
        assert_eq!(direct_admitted.count(), 3, "direct, second {second}");
        for d in [keyed.check("k", &p, 1).unwrap(), direct.decide(1)] {
            assert!(!d.is_allowed());
            let lag = c.now().as_millisecond() - d.at().as_millisecond();
            assert!(lag.abs() <= 1_000, "decided at {}, the wall clock reads {}", d.at(), c.now());
            assert!(d.reset_unix() <= c.now().as_second() + 1, "{}", d.reset_unix());
        }
        c.advance(Duration::from_secs(1));
    }
}

/// A keyed and a direct limiter on one fake clock, key `k` of the keyed
/// one and the direct one each charged `p`'s whole limit (one at a time,
/// 100 s in), then the clock stepped back by `by`.
fn used_up_then_rewound(
    p: &Policy,
    by: Duration,
) -> (FakeClock, MemoryLimiter<String, FakeClock>, DirectLimiter<FakeClock>) {
    let c = clock();
    let keyed = MemoryLimiter::<String, _>::with_clock(16, c.clone());
    let direct = DirectLimiter::with_clock(p.clone(), c.clone());
    c.advance(Duration::from_secs(100));
    for _ in 0..p.limit() {
        assert!(keyed.check("k", std::slice::from_ref(p), 1).unwrap().is_allowed());
        assert!(direct.check(1).is_allowed());
    }
    c.rewind(by);
    (c, keyed, direct)
}

#[test]
fn a_step_back_holds_a_sliding_window_for_one_window_not_the_step() {
    // Two used, then the monotonic clock steps back 50 s: the two still
    // count, but for one window (and the slack) from the step, as in the
    // Redis limiter and as fixed windows and GCRA convert, not until the
    // clock has caught up with the entries.
    let p = Policy::new("s", 2, Duration::from_secs(1), Algorithm::SlidingWindow).unwrap();
    let (c, keyed, direct) = used_up_then_rewound(&p, Duration::from_secs(50));
    let p = [p];
    let mut waited = Duration::ZERO;
    loop {
        let (k, d) = (keyed.check("k", &p, 1).unwrap(), direct.check(1));
        assert_eq!((k.is_allowed(), k.retry_after()), (d.is_allowed(), d.retry_after()));
        if k.is_allowed() {
            break;
        }
        assert!(k.retry_after().unwrap() <= Duration::from_secs(2), "{:?}", k.retry_after());
        assert!(waited < Duration::from_secs(2), "still limited {waited:?} after the step");
        c.advance(Duration::from_millis(500));
        waited += Duration::from_millis(500);
    }
    assert!(waited >= Duration::from_secs(1), "the two still counted for a window: {waited:?}");
}

#[test]
fn a_direct_window_too_big_for_a_word_after_a_step_back_decides_as_the_keyed_one() {
    // A fixed window of 1 ms does not fit a word: its state is kept under
    // a lock. After a step back it is converted, and the conversion kept
    // even when the check is denied, so the next window admits again.
    let p = Policy::new("f", 2, Duration::from_millis(1), Algorithm::FixedWindow).unwrap();
    let (c, keyed, direct) = used_up_then_rewound(&p, Duration::from_secs(10));
    let p = [p];
    for _ in 0..3 {
        let (k, d) = (keyed.check("k", &p, 1).unwrap(), direct.check(1));
        assert_eq!((k.is_allowed(), k.retry_after()), (d.is_allowed(), d.retry_after()));
        c.advance(Duration::from_millis(1));
    }
}

#[test]
fn a_plain_header_list_gets_each_family_it_lacks_once() {
    let c = clock();
    let l = MemoryLimiter::<String, _>::with_clock(100, c.clone());
    let p = [fixed(1, 1)];
    assert!(l.check("k", &p, 1).unwrap().is_allowed());
    let denied = l.check("k", &p, 1).unwrap();
    // A 429 rendered by its rejection carries its own `Retry-After`: the
    // decision's trio joins it, its `Retry-After` does not.
    let mut res = denied.rejection().unwrap().to_response(crate::http::BodyStyle::Flat, c.now());
    denied.fill_in(HeaderSet::all(), &mut res.headers);
    let count = |h: &[(&'static str, String)], name: &str| {
        h.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).count()
    };
    assert_eq!(count(&res.headers, "Retry-After"), 1, "{:?}", res.headers);
    for name in ["X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"] {
        assert_eq!(count(&res.headers, name), 1, "{name}");
    }
    assert_eq!(count(&res.headers, "RateLimit-Policy"), 1);
    assert_eq!(count(&res.headers, "RateLimit"), 1);
    // A host's own list, with one field of the trio in another casing (a
    // handler's own limit): that family stands whole, the others join.
    let mut own = vec![("x-ratelimit-limit".to_owned(), "7".to_owned())];
    denied.fill_in(HeaderSet::all(), &mut own);
    let names: Vec<&str> = own.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["x-ratelimit-limit", "RateLimit-Policy", "RateLimit", "Retry-After"]);
    // An empty list gets exactly the decision's headers.
    let mut empty: Vec<(&'static str, String)> = Vec::new();
    denied.fill_in(HeaderSet::all(), &mut empty);
    assert_eq!(empty, denied.headers(HeaderSet::all()));
}
