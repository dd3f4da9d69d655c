//! The [`LimitStore`] contract. Checks use long windows so they hold on a
//! store with its own real clock (Redis uses the server's time).

use std::time::{Duration, Instant};

use crate::limit::{Algorithm, CheckMode, Decision, LimitStore, Outcome, Policy};

/// Every algorithm: the checks that hold whatever the algorithm run under
/// each.
const ALGORITHMS: [Algorithm; 3] =
    [Algorithm::Gcra, Algorithm::FixedWindow, Algorithm::SlidingWindow];

fn policy(name: &'static str, limit: u32, algorithm: Algorithm) -> Policy {
    Policy::new(name, limit, Duration::from_secs(3600), algorithm).expect("valid policy")
}

/// The checks use hour-long windows on the real clock, and fixed windows
/// start on the hour: a check that crossed it would see every window reset.
/// Waits out the last 30 seconds of an hour (room for one check, or one
/// race, on a store a round trip away) (which also covers a few
/// seconds of skew between this host and a store's server clock).
fn clear_of_the_hour() {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let left = 3600 - secs % 3600;
    if left < 30 {
        std::thread::sleep(Duration::from_secs(left + 5));
    }
}

/// How many of `n` one-unit checks of `key` against `policies` are admitted.
async fn count_admitted<S: LimitStore>(store: &S, key: &str, policies: &[Policy], n: u32) -> u32 {
    admitted_last(store, key, policies, n).await.0
}

/// [`count_admitted`], and the last admitted check's decision (to refund).
async fn admitted_last<S: LimitStore>(
    store: &S,
    key: &str,
    policies: &[Policy],
    n: u32,
) -> (u32, Option<Decision>) {
    let (mut admitted, mut last) = (0, None);
    for _ in 0..n {
        let d = store.check(key, policies, 1, CheckMode::Consume).await.unwrap();
        if d.is_allowed() {
            admitted += 1;
            last = Some(d);
        }
    }
    (admitted, last)
}

/// Runs every check against `store`, using keys that start with `prefix`
/// (so runs against a shared backend do not collide).
///
/// # Panics
///
/// When the store breaks the [`LimitStore`] contract.
pub async fn run<S: LimitStore>(store: &S, prefix: &str) {
    // Each check starts clear of the hour's end, not only the run: on a
    // store a round trip away a run takes longer than the margin (a minute
    // at 100 ms a call), and one crossing the hour failed a correct store.
    let fresh = |name: &str| {
        clear_of_the_hour();
        format!("{prefix}:{name}")
    };
    for alg in ALGORITHMS {
        exact_limit(store, &fresh(alg.as_str()), alg).await;
        peek_refund_impossible(store, &fresh(&format!("{}:p", alg.as_str())), alg).await;
    }
    stacked(store, &fresh("stacked")).await;
    sliding_views(store, &fresh("views")).await;
    gcra_interval(store, &fresh("interval")).await;
    gcra_burst(store, &fresh("burst")).await;
    period_change(store, &fresh("period")).await;
    shorter_span(store, &fresh("shorter")).await;
    longer_window(store, &fresh("longer")).await;
    longer_window_denied(store, &fresh("longer-denied")).await;
    longer_window_refund_peek(store, &fresh("longer-refund")).await;
    algorithm_change(store, &fresh("algorithm")).await;
    repeated_name(store, &fresh("repeated")).await;
    over_refund(store, &fresh("over")).await;
    late_refund(store, &fresh("late")).await;
    sliding_refund_own(store, &fresh("own")).await;
    refund_twice(store, &fresh("twice")).await;
    refund_after_plan_change(store, &fresh("replanned")).await;
    refund_after_algorithm_change(store, &fresh("realg")).await;
    refund_under_another_algorithm(store, &fresh("otheralg")).await;
    refund_under_another_name(store, &fresh("othername")).await;
    refund_under_a_shorter_plan(store, &fresh("shorter")).await;
    let none = store.check(&format!("{prefix}:none"), &[], 1, CheckMode::Consume).await.unwrap();
    assert!(none.is_allowed() && none.policies().is_empty(), "no policy is no limit");
    assert_eq!((none.remaining(), none.retry_after()), (u32::MAX, None));
}

/// Policies share a key's state by name: a list naming one twice (a host
/// stacking lists by hand) is charged once per check.
async fn repeated_name<S: LimitStore>(store: &S, key: &str) {
    for alg in ALGORITHMS {
        let key = format!("{key}:{}", alg.as_str());
        let twice = [policy("x", 10, alg), policy("x", 10, alg)];
        let (admitted, last) = admitted_last(store, &key, &twice, 12).await;
        assert_eq!(admitted, 10, "{}: one state, charged once per check", alg.as_str());
        // Given back once, too: one unit refunded admits one check.
        store.refund(&key, &twice, 1, &mut last.unwrap()).await.unwrap();
        let admitted = count_admitted(store, &key, &twice, 3).await;
        assert_eq!(admitted, 1, "{}: refunded once", alg.as_str());
    }
}

/// A refund of units never consumed (a peek's; more than the check took;
/// the same check twice) leaves no extra room beyond a fresh state.
async fn over_refund<S: LimitStore>(store: &S, key: &str) {
    for alg in ALGORITHMS {
        let key = format!("{key}:{}", alg.as_str());
        let p = [policy("x", 3, alg)];
        let mut peek = store.check(&key, &p, 1, CheckMode::Peek).await.unwrap();
        store.refund(&key, &p, 5, &mut peek).await.unwrap();
        let mut d = store.check(&key, &p, 1, CheckMode::Consume).await.unwrap();
        assert!(d.is_allowed());
        store.refund(&key, &p, 5, &mut d).await.unwrap();
        store.refund(&key, &p, 5, &mut d).await.unwrap();
        let admitted = count_admitted(store, &key, &p, 5).await;
        assert_eq!(admitted, 3, "{}: never more than the limit", alg.as_str());
        // On a used key: a refund of more than the check took gives back
        // only what it took, not other checks' units.
        let key = format!("{key}:used");
        assert!(store.check(&key, &p, 2, CheckMode::Consume).await.unwrap().is_allowed());
        let mut d = store.check(&key, &p, 1, CheckMode::Consume).await.unwrap();
        assert!(d.is_allowed());
        store.refund(&key, &p, 3, &mut d).await.unwrap();
        let admitted = count_admitted(store, &key, &p, 3).await;
        assert_eq!(admitted, 1, "{}: a refund gives back at most its charge", alg.as_str());
    }
}

/// A check refunded twice gives back once: the second refund must not take
/// back a unit a later check used.
async fn refund_twice<S: LimitStore>(store: &S, key: &str) {
    for alg in ALGORITHMS {
        let key = format!("{key}:{}", alg.as_str());
        let p = [policy("x", 1, alg)];
        let mut first = store.check(&key, &p, 1, CheckMode::Consume).await.unwrap();
        assert!(first.is_allowed());
        store.refund(&key, &p, 1, &mut first).await.unwrap();
        let second = store.check(&key, &p, 1, CheckMode::Consume).await.unwrap();
        assert!(second.is_allowed(), "{}: the refunded unit", alg.as_str());
        store.refund(&key, &p, 1, &mut first).await.unwrap();
        let d = store.check(&key, &p, 1, CheckMode::Consume).await.unwrap();
        assert!(!d.is_allowed(), "{}: refunded twice, credited twice", alg.as_str());
    }
}

/// A refund under a policy the check did not run (the same name and
/// algorithm at another rate) gives nothing back: in the new terms a unit
/// is worth more time, and giving that back would free other checks'
/// units. 999 + 1 of 1,000 an hour used, then 1 an hour: whether or not
/// the one is refunded, the hour's unit is used.
async fn refund_after_plan_change<S: LimitStore>(store: &S, key: &str) {
    let fast = [policy("x", 1000, Algorithm::Gcra)];
    let slow = [policy("x", 1, Algorithm::Gcra)];
    assert!(store.check(key, &fast, 999, CheckMode::Consume).await.unwrap().is_allowed());
    let mut one = store.check(key, &fast, 1, CheckMode::Consume).await.unwrap();
    assert!(one.is_allowed());
    store.refund(key, &slow, 1, &mut one).await.unwrap();
    let d = store.check(key, &slow, 1, CheckMode::Consume).await.unwrap();
    assert!(!d.is_allowed(), "the refund freed the other 999's time: {d:?}");
}

/// A refund under the plan a check ran, after the plan moved the name to
/// another algorithm, gives nothing back and leaves the new state as it is:
/// three of a fixed window's three used, one more of a sliding window's
/// four, then the first three refunded under the old plan: the key stays
/// used up.
async fn refund_after_algorithm_change<S: LimitStore>(store: &S, key: &str) {
    let fixed = [policy("x", 3, Algorithm::FixedWindow)];
    let sliding = [Policy::new("x", 4, Duration::from_secs(7200), Algorithm::SlidingWindow)
        .expect("valid policy")];
    let mut three = store.check(key, &fixed, 3, CheckMode::Consume).await.unwrap();
    assert!(three.is_allowed());
    assert!(store.check(key, &sliding, 1, CheckMode::Consume).await.unwrap().is_allowed());
    store.refund(key, &fixed, 3, &mut three).await.unwrap();
    let d = store.check(key, &sliding, 1, CheckMode::Consume).await.unwrap();
    assert!(!d.is_allowed(), "the old plan's refund freed the new plan's units: {d:?}");
}

/// Three units checked under `ran`, `used` more under `other`, then the
/// three refunded under `other`: the next unit's decision under `other`
/// (a refund in terms the check did not run under gives nothing back, so
/// a store keeping the contract refuses it).
async fn refund_elsewhere<S: LimitStore>(
    store: &S,
    key: &str,
    ran: &[Policy],
    other: &[Policy],
    used: u32,
) -> Decision {
    let mut three = store.check(key, ran, 3, CheckMode::Consume).await.unwrap();
    assert!(three.is_allowed());
    assert!(store.check(key, other, used, CheckMode::Consume).await.unwrap().is_allowed());
    store.refund(key, other, 3, &mut three).await.unwrap();
    store.check(key, other, 1, CheckMode::Consume).await.unwrap()
}

/// A refund under the plan now, after the plan moved the name to another
/// algorithm at the same limit and window (any pair of the three), gives
/// nothing back: the check's receipt is in its own algorithm's terms, and
/// read in another's it could free units the check never took. Three of
/// four used under the old algorithm, then one of four under the new (the
/// three count there), then the three refunded under the new plan: the key
/// stays used up.
async fn refund_under_another_algorithm<S: LimitStore>(store: &S, key: &str) {
    let pairs = ALGORITHMS.into_iter().flat_map(|a| ALGORITHMS.map(|b| (a, b)));
    for (old, new) in pairs.filter(|(a, b)| a != b) {
        let key = format!("{key}:{}:{}", old.as_str(), new.as_str());
        let (before, after) = ([policy("x", 4, old)], [policy("x", 4, new)]);
        let d = refund_elsewhere(store, &key, &before, &after, 1).await;
        assert!(
            !d.is_allowed(),
            "{} to {}: a refund under the new algorithm gave units back: {d:?}",
            old.as_str(),
            new.as_str()
        );
    }
}

/// A refund under a list naming another policy (same algorithm, limit and
/// window) gives nothing back to that policy: a key's states are by name,
/// and the check never charged the other one. Three of `x`'s four and all
/// four of `y`'s used, then the three refunded under `y`: `y` stays used
/// up.
async fn refund_under_another_name<S: LimitStore>(store: &S, key: &str) {
    for alg in ALGORITHMS {
        let key = format!("{key}:{}", alg.as_str());
        let (x, y) = ([policy("x", 4, alg)], [policy("y", 4, alg)]);
        let d = refund_elsewhere(store, &key, &x, &y, 4).await;
        assert!(!d.is_allowed(), "{}: x's refund freed y's units: {d:?}", alg.as_str());
    }
}

/// A refund under the plan a check ran, after the plan moved the name to
/// a longer span of the same algorithm, gives nothing back and leaves the
/// new state as it is (read in the old plan's terms, it would be capped at
/// the old capacity, and the units the new plan counted lost): one unit of
/// 3 an hour, then 30 of 60 in 20 hours (GCRA), or 50 of 100 in a day and
/// a second (fixed windows, after one of 3 an hour), then the first unit
/// refunded under the old plan: the new plan admits what it has left, no
/// more.
///
/// The long window must end after the hour's: one ending with it, or
/// before it, leaves the units counted in the hour's window (the hour's is
/// not a shorter window's then), which reads as the refunded check's own —
/// the one case [`LimitStore::refund`] may give back a unit the new plan
/// counted. No fixed period avoids that at every instant (a day's ends
/// with the hour's in the last hour of every UTC day; a day and a second's,
/// on Unix-aligned windows, falls inside an hour about once a day), so the
/// long window is one of two periods whose windows never both end within
/// the same hour (in 2026 to 2046), chosen by where they end now.
async fn refund_under_a_shorter_plan<S: LimitStore>(store: &S, key: &str) {
    let gcra_long = Policy::new("x", 60, Duration::from_secs(72_000), Algorithm::Gcra);
    let day = long_fixed_window(store, &format!("{key}:probe")).await;
    for (alg, long, used) in
        [(Algorithm::Gcra, gcra_long, 30), (Algorithm::FixedWindow, Ok(day), 50)]
    {
        let key = format!("{key}:{}", alg.as_str());
        let short = [policy("x", 3, alg)];
        let long = [long.expect("valid policy")];
        let mut first = store.check(&key, &short, 1, CheckMode::Consume).await.unwrap();
        assert!(first.is_allowed());
        assert!(store.check(&key, &long, used, CheckMode::Consume).await.unwrap().is_allowed());
        store.refund(&key, &short, 1, &mut first).await.unwrap();
        let left = 100.min(long[0].limit()) - used - 1;
        let admitted = count_admitted(store, &key, &long, long[0].limit()).await;
        assert!(admitted <= left, "{}: {admitted} admitted, {left} left", alg.as_str());
    }
}

/// A fixed window of 100 in a day and a second, or in a day and two
/// seconds, whichever (on `store`'s clock, peeked at fresh keys under
/// `probe`) ends more than a second after the current hour's window.
async fn long_fixed_window<S: LimitStore>(store: &S, probe: &str) -> Policy {
    let ends_in = |p: Policy, key: String| async move {
        let d = store.check(&key, &[p], 1, CheckMode::Peek).await.unwrap();
        d.binding().reset_after
    };
    let hour = ends_in(policy("x", 3, Algorithm::FixedWindow), format!("{probe}:hour")).await;
    let mut long = None;
    for secs in [86_401, 86_402] {
        let p = Policy::new("x", 100, Duration::from_secs(secs), Algorithm::FixedWindow)
            .expect("valid policy");
        if ends_in(p.clone(), format!("{probe}:{secs}")).await > hour + Duration::from_secs(1) {
            long = Some(p);
            break;
        }
    }
    long.expect("one of the two windows ends well after the hour's")
}

/// A refund that comes after the refunded check's window has ended (or,
/// for GCRA, after its time was earned back) gives nothing to the checks
/// made since: a one-a-second key with a unit used before that and one
/// after stays used up.
async fn late_refund<S: LimitStore>(store: &S, key: &str) {
    let span = Duration::from_secs(1);
    for alg in ALGORITHMS {
        let name = format!("late_refund ({})", alg.as_str());
        premised(&name, &format!("{key}:{}", alg.as_str()), |key| async move {
            let p = [Policy::new("x", 1, span, alg).expect("valid policy")];
            let mut first = store.check(&key, &p, 1, CheckMode::Consume).await.unwrap();
            assert!(first.is_allowed(), "{}: {first:?}", alg.as_str());
            // Past the first unit's window (or its interval), then the next
            // one: a fixed window starts it at that window's beginning, so
            // the checks below land in it.
            let wait = first.binding().reset_after + Duration::from_millis(20);
            std::thread::sleep(wait);
            let before_second = Instant::now();
            let mut second = store.check(&key, &p, 1, CheckMode::Consume).await.unwrap();
            assert!(second.is_allowed(), "{}: {second:?}", alg.as_str());
            store.refund(&key, &p, 1, &mut first).await.unwrap();
            let d = store.check(&key, &p, 1, CheckMode::Consume).await.unwrap();
            // The second unit holds the key for its `reset_after` from its
            // call at the earliest: a stall past that proves nothing.
            if before_second.elapsed() >= second.binding().reset_after {
                return None;
            }
            assert!(!d.is_allowed(), "{}: the late refund admitted a second unit", alg.as_str());
            // A prompt refund of the second gives its unit back.
            store.refund(&key, &p, 1, &mut second).await.unwrap();
            let d = store.check(&key, &p, 1, CheckMode::Consume).await.unwrap();
            assert!(d.is_allowed(), "{}: the prompt refund gave nothing: {d:?}", alg.as_str());
            Some(())
        })
        .await;
    }
}

/// A sliding-window refund gives back the refunded check's own entry, not
/// the key's newest: of 2 a second, A, then B half a second later, A
/// refunded, then C. Once A's time has left the window, B and C are still
/// in it, and D is denied (with B's entry dropped instead, A's expired
/// entry would admit D: three within a second).
async fn sliding_refund_own<S: LimitStore>(store: &S, key: &str) {
    premised("sliding_refund_own", key, |key| async move {
        let p = [Policy::new("x", 2, Duration::from_secs(1), Algorithm::SlidingWindow)
            .expect("valid policy")];
        let mut a = store.check(&key, &p, 1, CheckMode::Consume).await.unwrap();
        let after_a = Instant::now();
        assert!(a.is_allowed(), "{a:?}");
        std::thread::sleep(Duration::from_millis(500));
        let before_b = Instant::now();
        assert!(store.check(&key, &p, 1, CheckMode::Consume).await.unwrap().is_allowed());
        store.refund(&key, &p, 1, &mut a).await.unwrap();
        let c = store.check(&key, &p, 1, CheckMode::Consume).await.unwrap();
        assert!(c.is_allowed(), "the refunded unit: {c:?}");
        // Past A's time in the window, well within B's.
        let past_a = Duration::from_millis(1050);
        std::thread::sleep(past_a.saturating_sub(after_a.elapsed()));
        let d = store.check(&key, &p, 1, CheckMode::Consume).await.unwrap();
        // B's entry is still in the window only if D came within a second
        // of B's call: a stall that long proves nothing either way.
        (before_b.elapsed() < Duration::from_secs(1)).then(|| {
            assert!(!d.is_allowed(), "a sliding refund gave back a later check's entry: {d:?}");
        })
    })
    .await;
}

/// A key whose plan changes a policy's algorithm under one name keeps what
/// it used: three used under a fixed window leave two of a sliding window's
/// five, and a used-up GCRA policy leaves nothing of a fixed window's.
async fn algorithm_change<S: LimitStore>(store: &S, key: &str) {
    let fixed = [policy("default", 3, Algorithm::FixedWindow)];
    for _ in 0..3 {
        assert!(store.check(key, &fixed, 1, CheckMode::Consume).await.unwrap().is_allowed());
    }
    let sliding = [policy("default", 5, Algorithm::SlidingWindow)];
    let admitted = count_admitted(store, key, &sliding, 5).await;
    assert_eq!(admitted, 2, "the three used under the fixed window count");
    let key = format!("{key}:g");
    let gcra = [policy("default", 3, Algorithm::Gcra)];
    assert!(store.check(&key, &gcra, 3, CheckMode::Consume).await.unwrap().is_allowed());
    let d = store.check(&key, &fixed, 1, CheckMode::Consume).await.unwrap();
    assert!(!d.is_allowed(), "the three used under GCRA count");
    assert!(d.retry_after().unwrap() <= Duration::from_secs(3600), "within one window");
    let again = store.check(&key, &fixed, 1, CheckMode::Consume).await.unwrap();
    assert!(!again.is_allowed(), "the converted state was kept, not forgotten");
}

/// A key whose fixed window grows (a plan change) keeps what it counted no
/// longer than the window it counted it in: never a lockout, never a reset
/// time beyond either window.
async fn period_change<S: LimitStore>(store: &S, key: &str) {
    let hourly = [policy("default", 2, Algorithm::FixedWindow)];
    for _ in 0..2 {
        assert!(store.check(key, &hourly, 1, CheckMode::Consume).await.unwrap().is_allowed());
    }
    assert!(!store.check(key, &hourly, 1, CheckMode::Consume).await.unwrap().is_allowed());
    let two_hours = Duration::from_secs(7200);
    let longer = [Policy::new("default", 100, two_hours, Algorithm::FixedWindow).unwrap()];
    let d = store.check(key, &longer, 1, CheckMode::Consume).await.unwrap();
    assert!(d.is_allowed(), "the new plan's room is there at once");
    let reset = d.binding().reset_after;
    assert!(reset <= two_hours, "reset {reset:?} lies within one of the windows");
}

/// A plan change to a shorter span under one name (an hourly GCRA burst to
/// a per-second rate, an hourly fixed window to a short one): what the key
/// used holds for the new policy's burst or window at most — it is not
/// locked out for the rest of the hour — and it is kept, so the next
/// window or interval admits.
async fn shorter_span<S: LimitStore>(store: &S, key: &str) {
    for (alg, short) in [
        (Algorithm::Gcra, Policy::new("default", 1000, Duration::from_secs(1), Algorithm::Gcra)),
        (
            Algorithm::FixedWindow,
            Policy::new("default", 5, Duration::from_millis(50), Algorithm::FixedWindow),
        ),
    ] {
        let key = format!("{key}:{}", alg.as_str());
        let short = [short.expect("valid policy")];
        let hourly = [policy("default", 10, alg)];
        for _ in 0..10 {
            assert!(store.check(&key, &hourly, 1, CheckMode::Consume).await.unwrap().is_allowed());
        }
        // GCRA: 10 hourly units are 6 minutes ahead, past a one-second
        // horizon; fixed: 10 in the hour, over a limit of 5.
        let d = store.check(&key, &short, 1, CheckMode::Consume).await.unwrap();
        let span = Duration::from_millis(50);
        let wait = d.retry_after().unwrap_or(Duration::ZERO);
        assert!(wait <= span, "{}: waits {wait:?}, not the hour", alg.as_str());
        // Past that wait (plus a little clock skew), it admits again.
        std::thread::sleep(wait + Duration::from_millis(10));
        let d = store.check(&key, &short, 1, CheckMode::Consume).await.unwrap();
        assert!(d.is_allowed(), "{}: admitted after the new span: {d:?}", alg.as_str());
    }
}

/// A plan change to a longer fixed window under one name while the short
/// window is open: its units count in the long window, not only until the
/// short one ends (which would admit them again there).
async fn longer_window<S: LimitStore>(store: &S, key: &str) {
    // A short window of a second, started at its beginning (`use_up`): a
    // store a network round trip away (tens of milliseconds) makes the
    // three checks in it. (In a 50 ms window, such a store never did, and
    // from about 16 ms a round trip the wait for a window's beginning
    // never ended.)
    let span = Duration::from_secs(1);
    premised("longer_window", key, |key| async move {
        let short =
            [Policy::new("default", 2, span, Algorithm::FixedWindow).expect("valid policy")];
        let hourly = [policy("default", 3, Algorithm::FixedWindow)];
        let (_, held) = use_up(store, &key, &short).await;
        assert!(store.check(&key, &hourly, 1, CheckMode::Consume).await.unwrap().is_allowed());
        // Checks that all came back before `held` landed in the short window.
        let in_one_window = Instant::now() < held;
        // The short window has ended; the hour's three are used.
        std::thread::sleep(span + Duration::from_millis(50));
        let d = store.check(&key, &hourly, 1, CheckMode::Consume).await.unwrap();
        in_one_window.then(|| {
            assert!(!d.is_allowed(), "the short window's units count in the hour: {d:?}");
        })
    })
    .await;
}

/// Runs a check whose verdict holds only if its calls came within some
/// span of real time (`check` returns `None` when they did not: a stalled
/// thread or a slow store on a loaded machine), on a fresh key each time,
/// until one run could judge. A host's CI is no quieter than ours: a stall
/// is not the store's fault.
async fn premised<'s, F, Fut>(name: &str, key: &str, check: F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Option<()>> + 's,
{
    const RUNS: u32 = 5;
    for run in 0..RUNS {
        if check(format!("{key}:{run}")).await.is_some() {
            return;
        }
    }
    panic!(
        "{name}: {RUNS} runs in a row stalled past their timing; the machine is too loaded to judge"
    );
}

/// Uses up `short`'s one policy (a fixed or sliding window of about a
/// second, or GCRA) for `key`, one unit at a time. A fixed window is
/// started at its beginning, so the units and the checks that follow land
/// in one window. Returns the last decision, and an instant (on this
/// host's clock) until which the store still counts every unit used (a
/// check that comes back before it saw them all); a stalled thread or a
/// slow store may pass it.
async fn use_up<S: LimitStore>(store: &S, key: &str, short: &[Policy; 1]) -> (Decision, Instant) {
    let p = &short[0];
    let asked = Instant::now();
    let d = store.check(key, short, 1, CheckMode::Peek).await.unwrap();
    let left = d.binding().reset_after;
    // The peek's window ends `left` after the peek was asked for, at the
    // earliest; the next one a period later.
    let mut window_end = asked + left;
    if p.algorithm() == Algorithm::FixedWindow && left < p.period() * 7 / 10 {
        std::thread::sleep(left + Duration::from_millis(2));
        window_end += p.period();
    }
    let first = Instant::now();
    let mut last = d;
    for _ in 0..p.limit() {
        last = store.check(key, short, 1, CheckMode::Consume).await.unwrap();
        assert!(last.is_allowed());
    }
    let held = match p.algorithm() {
        Algorithm::FixedWindow => window_end,
        // The first unit's entry leaves, or its time is earned back.
        Algorithm::SlidingWindow => first + p.period(),
        _ => first + p.period() / p.limit(),
    };
    (last, held)
}

/// A plan change to a longer window under one name whose first check is a
/// denial (the units the short window counted already fill the long one):
/// the state outlives the short window, although the denial consumed
/// nothing, so the long window still denies once the short one is over.
async fn longer_window_denied<S: LimitStore>(store: &S, key: &str) {
    // A short window long enough that the checks below fit in it on a
    // loaded machine (a store a network round trip away).
    let span = Duration::from_secs(1);
    for alg in [Algorithm::FixedWindow, Algorithm::SlidingWindow] {
        let name = format!("longer_window_denied ({})", alg.as_str());
        premised(&name, &format!("{key}:{}", alg.as_str()), |key| async move {
            let short = [Policy::new("default", 2, span, alg).expect("valid policy")];
            let hourly = [policy("default", 2, alg)];
            let (_, held) = use_up(store, &key, &short).await;
            let d = store.check(&key, &hourly, 1, CheckMode::Consume).await.unwrap();
            // Past `held`, the store may have forgotten the short window's
            // units (it need not keep a state no policy counts any more),
            // and the check rightly admitted: that proves nothing.
            if Instant::now() >= held {
                return None;
            }
            assert!(!d.is_allowed(), "{}: the two count in the hour: {d:?}", alg.as_str());
            std::thread::sleep(span + Duration::from_millis(50));
            let d = store.check(&key, &hourly, 1, CheckMode::Consume).await.unwrap();
            assert!(
                !d.is_allowed(),
                "{}: still counted after the short window ended: {d:?}",
                alg.as_str()
            );
            Some(())
        })
        .await;
    }
}

/// As [`longer_window_denied`], but the only call under the long window
/// before the short one ends is a peek: it may not let the state expire
/// on the short window's schedule.
async fn longer_window_refund_peek<S: LimitStore>(store: &S, key: &str) {
    let span = Duration::from_secs(1);
    let alg = Algorithm::SlidingWindow;
    let key = format!("{key}:{}:peek", alg.as_str());
    premised("longer_window_refund_peek", &key, |key| async move {
        let short = [Policy::new("default", 3, span, alg).expect("valid policy")];
        let hourly = [policy("default", 3, alg)];
        let (_, held) = use_up(store, &key, &short).await;
        // Three used in the hour; a peek changes nothing: one more never fits.
        let d = store.check(&key, &hourly, 1, CheckMode::Peek).await.unwrap();
        // A peek past `held` may find the short window's units forgotten.
        if Instant::now() >= held {
            return None;
        }
        assert!(!d.is_allowed(), "a peek sees the three");
        std::thread::sleep(span + Duration::from_millis(50));
        let d = store.check(&key, &hourly, 1, CheckMode::Consume).await.unwrap();
        assert!(!d.is_allowed(), "3 still used in the hour after the short window: {d:?}");
        Some(())
    })
    .await;
    noop_refund(store, &key).await;
    // GCRA: an hour's burst used up, then a shorter policy of the same name
    // (3 per 30 s: a unit every 10 s, far apart for a slow store). A check
    // reads the long state as this burst used up; a refund of the hourly
    // check under the short policy gives nothing back (in the short
    // policy's terms a unit is worth less time) and leaves the long state
    // as it is.
    let key = format!("{key}:gcra");
    let hourly = [policy("default", 100, Algorithm::Gcra)];
    let short =
        [Policy::new("default", 3, Duration::from_secs(30), Algorithm::Gcra)
            .expect("valid policy")];
    let mut d = store.check(&key, &hourly, 100, CheckMode::Consume).await.unwrap();
    assert!(d.is_allowed());
    store.refund(&key, &short, 1, &mut d).await.unwrap();
    let admitted = count_admitted(store, &key, &short, 3).await;
    assert_eq!(admitted, 0, "gcra: the short burst is used up");
}

/// A refund under a policy the check did not run (the plan changed before
/// it) gives nothing back and changes nothing: a key refunded so and a key
/// not refunded are read alike by the next checks, under every algorithm.
async fn noop_refund<S: LimitStore>(store: &S, key: &str) {
    let span = Duration::from_secs(1);
    for alg in [Algorithm::FixedWindow, Algorithm::SlidingWindow, Algorithm::Gcra] {
        let short = [Policy::new("default", 3, span, alg).expect("valid policy")];
        let hourly = [policy("default", 3, alg)];
        let (a, b) =
            (format!("{key}:noop:{}:a", alg.as_str()), format!("{key}:noop:{}:b", alg.as_str()));
        let (mut last, _) = use_up(store, &a, &short).await;
        let _ = use_up(store, &b, &short).await;
        store.refund(&a, &hourly, 1, &mut last).await.unwrap();
        std::thread::sleep(span + Duration::from_millis(50));
        let refunded = count_admitted(store, &a, &hourly, 4).await;
        let kept = count_admitted(store, &b, &hourly, 4).await;
        assert_eq!(
            refunded,
            kept,
            "{}: the refund that gave nothing changed the key",
            alg.as_str()
        );
    }
}

/// A decision is dated on the store's clock, when the check was made
/// ([`Decision::from_policies`]): `X-RateLimit-Reset` counts from it. Up
/// to a minute of skew from this host's clock is allowed.
fn dated_now(d: &Decision, what: &str) {
    let now = jiff::Timestamp::now();
    let skew = d.at().duration_since(now).unsigned_abs();
    assert!(
        skew <= Duration::from_secs(60),
        "{what}: a decision is dated when it was made on the store's clock: {} (now {now})",
        d.at()
    );
}

async fn exact_limit<S: LimitStore>(store: &S, key: &str, alg: Algorithm) {
    let p = [policy("default", 5, alg)];
    let (started, mut first) = (std::time::Instant::now(), Duration::ZERO);
    for i in 0..5u32 {
        let d = store.check(key, &p, 1, CheckMode::Consume).await.unwrap();
        assert!(d.is_allowed(), "{alg:?}: request {i} of 5 admitted");
        if i == 0 {
            first = d.binding().reset_after;
        }
        assert_eq!(d.remaining(), 4 - i, "{alg:?}: remaining after request {i}");
        assert_eq!(d.limit(), 5);
        dated_now(&d, "an admission");
    }
    let d = store.check(key, &p, 1, CheckMode::Consume).await.unwrap();
    assert_eq!(d.outcome(), Outcome::Limited, "{alg:?}: sixth request denied");
    dated_now(&d, "a denial");
    let wait = d.retry_after().expect("a denial says when to retry");
    assert!(wait > Duration::ZERO && wait <= Duration::from_secs(3600), "{alg:?}: retry {wait:?}");
    // The sixth fits once the first unit is given back (its window ended,
    // its entry left, its interval earned back): not before the first's
    // reset less the time since (and a second of slack).
    assert!(
        wait + started.elapsed() + Duration::from_secs(1) >= first,
        "{alg:?}: a denial waits until the request fits: retry {wait:?}, first unit's reset {first:?}"
    );
    assert!(d.retry_after_secs().unwrap() >= 1);
    let other = store.check(&format!("{key}:other"), &p, 1, CheckMode::Consume).await.unwrap();
    assert!(other.is_allowed(), "{alg:?}: keys are independent");
}

async fn peek_refund_impossible<S: LimitStore>(store: &S, key: &str, alg: Algorithm) {
    let p = [policy("default", 3, alg)];
    let d = store.check(key, &p, 4, CheckMode::Consume).await.unwrap();
    assert_eq!(d.outcome(), Outcome::Impossible, "{alg:?}: cost above capacity");
    assert_eq!(d.retry_after(), None);
    dated_now(&d, "an impossible check");
    let d = store.check(key, &p, 2, CheckMode::Peek).await.unwrap();
    assert!(d.is_allowed(), "{alg:?}: peek");
    dated_now(&d, "a peek");
    let mut d = store.check(key, &p, 3, CheckMode::Consume).await.unwrap();
    assert!(d.is_allowed(), "{alg:?}: neither peek nor impossible consumed anything");
    assert!(!store.check(key, &p, 1, CheckMode::Consume).await.unwrap().is_allowed());
    store.refund(key, &p, 1, &mut d).await.unwrap();
    let d = store.check(key, &p, 1, CheckMode::Consume).await.unwrap();
    assert!(d.is_allowed(), "{alg:?}: a refunded unit can be used again");
    assert_eq!(d.remaining(), 0);
}

async fn stacked<S: LimitStore>(store: &S, key: &str) {
    let plan =
        [policy("burst", 2, Algorithm::FixedWindow), policy("sustained", 3, Algorithm::Gcra)];
    assert!(store.check(key, &plan, 2, CheckMode::Consume).await.unwrap().is_allowed());
    let d = store.check(key, &plan, 1, CheckMode::Consume).await.unwrap();
    assert_eq!(d.outcome(), Outcome::Limited);
    assert_eq!(d.policies().len(), 2, "the decision reports every stacked policy");
    assert!(!d.policies()[0].allowed && d.policies()[1].allowed);
    assert_eq!(d.policies()[1].remaining, 1, "the denied check charged no policy");
    // Two units of a unit per 20 minutes borrowed: restored in 40 minutes,
    // not the hour the denied unit would have made it.
    let reset = d.policies()[1].reset_after;
    assert!(reset <= Duration::from_secs(2400), "sustained resets in {reset:?}");
    assert_eq!(d.binding().name, "burst");
    // All or nothing: the denial left the sustained policy's last unit.
    let sustained = [plan[1].clone()];
    let d = store.check(key, &sustained, 1, CheckMode::Consume).await.unwrap();
    assert!(d.is_allowed(), "the denied check charged the admitting policy: {d:?}");
}

/// A sliding window's view without units of its own (a check of cost 0,
/// or an admitting policy's view of a stacked denial) is restored when its
/// newest entry leaves the window, not a whole period from now, and an
/// empty window has nothing to wait for.
async fn sliding_views<S: LimitStore>(store: &S, key: &str) {
    let hour = Duration::from_secs(3600);
    let sliding = [policy("sliding", 5, Algorithm::SlidingWindow)];
    let plan = [policy("burst", 1, Algorithm::FixedWindow), sliding[0].clone()];
    // Empty: a peek of no units, and the view of a denial by the burst.
    let empty = format!("{key}:empty");
    let d = store.check(&empty, &sliding, 0, CheckMode::Peek).await.unwrap();
    assert_eq!(
        (d.remaining(), d.binding().reset_after),
        (5, Duration::ZERO),
        "an empty window has nothing to wait for: {d:?}"
    );
    assert!(store.check(&empty, &plan[..1], 1, CheckMode::Consume).await.unwrap().is_allowed());
    let d = store.check(&empty, &plan, 1, CheckMode::Consume).await.unwrap();
    assert_eq!(d.outcome(), Outcome::Limited, "{d:?}");
    assert_eq!(
        (d.policies()[1].remaining, d.policies()[1].reset_after),
        (5, Duration::ZERO),
        "an empty window has nothing to wait for (stacked denial): {d:?}"
    );
    // One entry, then 50 ms: both views see it leave within the hour less
    // those 50 ms (25 ms of them, for clock skew), not an hour from now.
    let used = format!("{key}:used");
    assert!(store.check(&used, &plan, 1, CheckMode::Consume).await.unwrap().is_allowed());
    std::thread::sleep(Duration::from_millis(50));
    let in_bounds = |r: Duration| r + Duration::from_millis(25) <= hour && r >= hour / 2;
    let d = store.check(&used, &sliding, 0, CheckMode::Peek).await.unwrap();
    let reset = d.binding().reset_after;
    assert!(in_bounds(reset), "a peek of no units is restored when its newest entry leaves: {d:?}");
    let d = store.check(&used, &plan, 1, CheckMode::Consume).await.unwrap();
    assert_eq!(d.outcome(), Outcome::Limited, "{d:?}");
    assert!(
        in_bounds(d.policies()[1].reset_after),
        "a stacked denial's sliding view is restored when its newest entry leaves: {d:?}"
    );
}

/// GCRA's emission interval is rounded up
/// ([`Policy::emission_interval_nanos`]): 7 an hour, used at once, are
/// restored an hour later at the earliest. Rounded down (514,285,714,285
/// ns), they are back 5 ns early, and a key is admitted more than GCRA's
/// `2L - 1` in some period.
async fn gcra_interval<S: LimitStore>(store: &S, key: &str) {
    let p = [policy("default", 7, Algorithm::Gcra)];
    let d = store.check(key, &p, 7, CheckMode::Consume).await.unwrap();
    assert!(d.is_allowed(), "{d:?}");
    let reset = d.binding().reset_after;
    assert!(
        reset >= Duration::from_secs(3600),
        "the emission interval is rounded up: restored in {reset:?}"
    );
}

/// GCRA's burst ([`Policy::with_burst`]) is its capacity: 5 at once of 3
/// an hour, not one more, a cost above 5 impossible; and a unit of it
/// refunded can be used again (the decision reports the policy as the
/// refund reads it: [`Decision::refund_receipts`]).
async fn gcra_burst<S: LimitStore>(store: &S, key: &str) {
    let p = [policy("default", 3, Algorithm::Gcra).with_burst(5).expect("valid burst")];
    let d = store.check(key, &p, 6, CheckMode::Consume).await.unwrap();
    assert_eq!(d.outcome(), Outcome::Impossible, "a cost above the burst: {d:?}");
    let mut d = store.check(key, &p, 5, CheckMode::Consume).await.unwrap();
    assert!(d.is_allowed(), "the burst admits 5 at once: {d:?}");
    assert_eq!((d.remaining(), d.limit()), (0, 5), "the burst is the limit reported");
    assert!(!store.check(key, &p, 1, CheckMode::Consume).await.unwrap().is_allowed());
    store.refund(key, &p, 1, &mut d).await.unwrap();
    let d = store.check(key, &p, 1, CheckMode::Consume).await.unwrap();
    assert!(d.is_allowed(), "a refunded unit of a burst can be used again: {d:?}");
}

/// Races `threads` threads, each checking `per_thread` units one at a time
/// on one key, under each algorithm and a stacked plan (all with long
/// windows, so time does not refill them during the race): exactly the
/// limit is admitted. Threads drive the futures with
/// [`block_on`](super::portal::block_on); see [`super::keys::race`].
///
/// # Panics
///
/// When more or fewer units are admitted than the limit.
pub fn race<S: LimitStore + Sync>(store: &S, prefix: &str, threads: usize, per_thread: usize) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let plans = [
        vec![policy("default", 50, Algorithm::Gcra)],
        vec![policy("default", 50, Algorithm::FixedWindow)],
        vec![policy("default", 50, Algorithm::SlidingWindow)],
        vec![policy("burst", 50, Algorithm::FixedWindow), policy("sustained", 80, Algorithm::Gcra)],
    ];
    for (i, plan) in plans.iter().enumerate() {
        clear_of_the_hour();
        let key = format!("{prefix}:race{i}");
        let admitted = AtomicUsize::new(0);
        let barrier = std::sync::Barrier::new(threads);
        std::thread::scope(|sc| {
            for _ in 0..threads {
                let (key, admitted, barrier) = (&key, &admitted, &barrier);
                sc.spawn(move || {
                    barrier.wait();
                    for _ in 0..per_thread {
                        let check = store.check(key, plan, 1, CheckMode::Consume);
                        if super::portal::block_on(check).expect("check").is_allowed() {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let want = 50.min(threads * per_thread);
        assert_eq!(admitted.into_inner(), want, "plan {i}: exactly the limit is admitted");
    }
}
