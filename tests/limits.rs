//! Rate limits and quotas: conformance, properties, concurrency, bounded memory.

use std::sync::Arc;
use std::time::Duration;

use keygate::clock::FakeClock;
use keygate::limit::{Algorithm, MemoryLimiter, Policy};
use keygate::quota::MemoryQuotaStore;
use proptest::prelude::*;

#[tokio::test]
async fn memory_limiter_passes_the_testkit() {
    let l = MemoryLimiter::<String>::new(10_000);
    keygate::testkit::limit::run(&l, "t").await;
}

#[tokio::test]
async fn memory_quota_store_passes_the_testkit() {
    keygate::testkit::quota::run(&MemoryQuotaStore::new(), "t").await;
}

#[test]
fn memory_limiter_and_quota_races_admit_exactly_the_limit() {
    keygate::testkit::limit::race(&MemoryLimiter::<String>::new(10_000), "r", 8, 20);
    keygate::testkit::quota::race(&MemoryQuotaStore::new(), "r", 8, 20);
}

/// Runs `gaps_ms` arrivals against a fresh limiter on a fake clock and
/// returns the admission times in milliseconds.
fn admitted(p: &Policy, gaps_ms: &[u64]) -> Vec<u64> {
    let clock = FakeClock::at_2026();
    let l = MemoryLimiter::<String, _>::with_clock(16, clock.clone());
    let mut t = 0;
    let mut out = Vec::new();
    for &g in gaps_ms {
        clock.advance(Duration::from_millis(g));
        t += g;
        if l.check("k", std::slice::from_ref(p), 1).unwrap().is_allowed() {
            out.push(t);
        }
    }
    out
}

/// Most admissions in any half-open span of `len_ms` starting at an admission.
fn max_in_any_window(times: &[u64], len_ms: u64) -> usize {
    times
        .iter()
        .enumerate()
        .map(|(i, &t)| times[i..].iter().take_while(|&&u| u < t + len_ms).count())
        .max()
        .unwrap_or(0)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn gcra_never_exceeds_limit_plus_burst(limit in 1u32..20, burst in 1u32..20, gaps in prop::collection::vec(0u64..300, 1..400)) {
        let p = Policy::new("d", limit, Duration::from_secs(1), Algorithm::Gcra).unwrap().with_burst(burst).unwrap();
        let a = admitted(&p, &gaps);
        prop_assert!(max_in_any_window(&a, 1000) <= (limit + burst) as usize);
    }

    #[test]
    fn sliding_window_never_exceeds_limit_in_any_window(limit in 1u32..20, gaps in prop::collection::vec(0u64..300, 1..400)) {
        let p = Policy::new("d", limit, Duration::from_secs(1), Algorithm::SlidingWindow).unwrap();
        let a = admitted(&p, &gaps);
        prop_assert!(max_in_any_window(&a, 1000) <= limit as usize);
    }

    #[test]
    fn fixed_window_never_exceeds_limit_per_window(limit in 1u32..20, gaps in prop::collection::vec(0u64..300, 1..400)) {
        let p = Policy::new("d", limit, Duration::from_secs(1), Algorithm::FixedWindow).unwrap();
        let a = admitted(&p, &gaps);
        // Windows are aligned to the clock's origin (t = 0 here).
        for w in 0..=a.last().copied().unwrap_or(0) / 1000 {
            let n = a.iter().filter(|&&t| t / 1000 == w).count();
            prop_assert!(n <= limit as usize, "window {} admitted {}", w, n);
        }
    }

    #[test]
    fn a_steady_client_below_the_rate_is_never_denied(limit in 1u32..50, alg in 0usize..3, n in 1usize..200) {
        let alg = [Algorithm::Gcra, Algorithm::FixedWindow, Algorithm::SlidingWindow][alg];
        let p = Policy::new("d", limit, Duration::from_secs(1), alg).unwrap();
        // One request every period/limit plus 1 ms: just below the rate.
        let gap = 1000 / u64::from(limit) + 1;
        let gaps: Vec<u64> = std::iter::once(0).chain(std::iter::repeat_n(gap, n - 1)).collect();
        prop_assert_eq!(admitted(&p, &gaps).len(), n);
    }
}

/// The policies a key may move between under one name (all `d`): every
/// algorithm, spans from 50 ms to an hour.
fn plan(i: usize) -> Policy {
    let (limit, ms, alg) = [
        (5, 1_000, Algorithm::Gcra),
        (3, 50, Algorithm::Gcra),
        (20, 3_600_000, Algorithm::Gcra),
        (4, 1_000, Algorithm::FixedWindow),
        (2, 100, Algorithm::FixedWindow),
        (30, 3_600_000, Algorithm::FixedWindow),
        (6, 1_000, Algorithm::SlidingWindow),
        (10, 60_000, Algorithm::SlidingWindow),
    ][i];
    Policy::new("d", limit, Duration::from_millis(ms), alg).unwrap()
}

/// Whether `times` (ms, ascending) keep `p`'s bound while it is the plan:
/// GCRA at most `limit + burst - 1` in any span of its period, a fixed
/// window at most `limit` in each of its windows (aligned to `t = 0`, the
/// fake clock's midnight, which every span here divides), a sliding
/// window at most `limit` in any span of its period.
fn within_bound(p: &Policy, times: &[u64]) -> bool {
    let span = u64::try_from(p.period().as_millis()).unwrap();
    let limit = p.limit() as usize;
    match p.algorithm() {
        Algorithm::FixedWindow => {
            let mut per_window = std::collections::HashMap::new();
            times.iter().all(|t| {
                let n = per_window.entry(t / span).or_insert(0usize);
                *n += 1;
                *n <= limit
            })
        }
        Algorithm::SlidingWindow => max_in_any_window(times, span) <= limit,
        _ => max_in_any_window(times, span) < limit + p.capacity() as usize,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Plan changes under one name keep (and convert) state, and never let
    /// a policy admit more than its own bound while it is the plan: what
    /// was carried over only counts as used. Consecutive steps of one
    /// policy are one stretch. Half the runs stack a never-binding policy
    /// of another name, so the locked form is checked as well as the
    /// one-word form.
    #[test]
    fn plan_changes_never_let_a_policy_exceed_its_bound(
        steps in prop::collection::vec((0usize..8, 1usize..30, 0u64..400), 1..40),
        stacked in any::<bool>(),
    ) {
        let clock = FakeClock::at_2026();
        let l = MemoryLimiter::<String, _>::with_clock(16, clock.clone());
        let loose = Policy::new("loose", 1_000_000, Duration::from_secs(1), Algorithm::Gcra).unwrap();
        let mut t = 0u64;
        let mut stretch: (usize, Vec<u64>) = (usize::MAX, Vec::new());
        for (which, n, gap) in steps {
            let p = plan(which);
            if which != stretch.0 {
                stretch = (which, Vec::new());
            }
            let policies = if stacked { vec![p.clone(), loose.clone()] } else { vec![p.clone()] };
            for _ in 0..n {
                clock.advance(Duration::from_millis(gap));
                t += gap;
                if l.check("k", &policies, 1).unwrap().is_allowed() {
                    stretch.1.push(t);
                }
            }
            prop_assert!(
                within_bound(&p, &stretch.1),
                "{:?} {} per {:?} admitted {:?}", p.algorithm(), p.limit(), p.period(), stretch.1
            );
        }
    }
}

#[test]
fn two_threads_never_get_more_than_the_quota() {
    for alg in [Algorithm::Gcra, Algorithm::FixedWindow, Algorithm::SlidingWindow] {
        // The clock is frozen, so exactly `limit` units exist to be won.
        let clock = FakeClock::at_2026();
        let l = Arc::new(MemoryLimiter::<String, _>::with_clock(100, clock));
        let p = Arc::new([Policy::new("d", 1000, Duration::from_secs(60), alg).unwrap()]);
        let wins: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|_| {
                    let (l, p) = (Arc::clone(&l), Arc::clone(&p));
                    s.spawn(move || {
                        (0..5000)
                            .filter(|_| l.check("hot", &p[..], 1).unwrap().is_allowed())
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(wins, 1000, "{alg:?}");
    }
}

/// Readers probe the shards' tables without a lock while writers grow them,
/// forget fresh keys and move keys between the one-word and the locked
/// form. Whatever interleaving happens, every key admits exactly its limit
/// under each policy name on a frozen clock: an update lost in a table swap
/// would admit more, a key lost in one would admit its limit again, and
/// names sharing a state would admit less.
#[test]
fn table_rebuilds_and_moves_lose_no_update_under_concurrent_checks() {
    const KEYS: u64 = 3000;
    const LIMIT: u32 = 4;
    let clock = FakeClock::at_2026();
    // A cap above the number of states, so no key is refused: the tables
    // grow from empty. (The limiter-wide count never reaches the cap here,
    // so nothing is purged: see
    // `purges_at_the_cap_lose_no_update_of_keys_still_limiting`.)
    let l = MemoryLimiter::<u64, _>::with_clock(3 * KEYS as usize, clock);
    let gcra = |name, limit, secs| {
        Policy::new(name, limit, Duration::from_secs(secs), Algorithm::Gcra).unwrap()
    };
    let search = [gcra("d", LIMIT, 3600)];
    let upload = [gcra("e", LIMIT, 3600)];
    let stacked = [search[0].clone(), gcra("g", 1_000_000, 1)];
    let threads = 4u64;
    let wins: Vec<Vec<[u32; 2]>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (limiter, search, upload, stacked) = (&l, &search, &upload, &stacked);
                s.spawn(move || {
                    let mut wins = vec![[0u32; 2]; KEYS as usize];
                    for round in 0..6 * u64::from(LIMIT) {
                        for i in 0..KEYS {
                            // Each thread walks the keys in its own order.
                            let k = (i * 7919 + t * 1013 + round * 31) % KEYS;
                            // Two names alternate; every 16th key moves to
                            // the locked form for "d".
                            let (p, name): (&[Policy], usize) = match (round + t) % 3 {
                                0 => (upload, 1),
                                _ if k.is_multiple_of(16) && round % 2 == 1 => (stacked, 0),
                                _ => (search, 0),
                            };
                            if limiter.check(&k, p, 1).unwrap().is_allowed() {
                                wins[k as usize][name] += 1;
                            }
                        }
                    }
                    wins
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for k in 0..KEYS as usize {
        for name in 0..2 {
            let total: u32 = wins.iter().map(|w| w[k][name]).sum();
            assert_eq!(total, LIMIT, "key {k}, name {name}");
        }
    }
    // Each key: one state per name (in words or in the locked form).
    assert!(l.len() >= KEYS as usize && l.len() <= 2 * KEYS as usize, "{}", l.len());
}

/// Two threads checking keys `0..keys` under `policies`, each in its own
/// order, pass after pass, until `done` is set by the caller's churn (and
/// at least `4 * limit` passes): the units each thread won per key.
fn race_checks<C: keygate::clock::Clock>(
    l: &MemoryLimiter<u64, C>,
    policies: &[Policy],
    keys: u64,
    limit: u32,
    churn: impl FnOnce() + Send,
) -> Vec<Vec<u32>> {
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let checkers: Vec<_> = (0..2u64)
            .map(|t| {
                let done = &done;
                s.spawn(move || {
                    let mut wins = vec![0u32; usize::try_from(keys).unwrap()];
                    let mut pass = 0u64;
                    while pass < 4 * u64::from(limit)
                        || !done.load(std::sync::atomic::Ordering::Relaxed)
                    {
                        pass += 1;
                        for i in 0..keys {
                            let k = (i * 7919 + t * 1013 + pass * 31) % keys;
                            // A key still limiting is never refused room.
                            wins[usize::try_from(k).unwrap()] +=
                                u32::from(l.check(&k, policies, 1).unwrap().is_allowed());
                        }
                    }
                    wins
                })
            })
            .collect();
        let done = &done;
        s.spawn(move || {
            churn();
            done.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        checkers.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn a_key_in_both_forms_is_not_decided_on_the_locked_form_while_its_table_is_copied() {
    // Keys with a live one-word state under "d" that are also in the locked
    // form (for a stacked plan not naming "d"). While a rebuild has retired
    // a key's word and not yet published the new table, a check under "d"
    // must wait for the copy, not decide on the locked form (where "d" looks
    // fresh).
    const KEYS: u64 = 2000;
    const LIMIT: u32 = 3;
    for round in 0..4u64 {
        let clock = FakeClock::at_2026();
        let l = MemoryLimiter::<u64, _>::with_clock(1 << 20, clock);
        let gcra = |name, limit| {
            Policy::new(name, limit, Duration::from_secs(3600), Algorithm::Gcra).unwrap()
        };
        let d = [gcra("d", LIMIT)];
        let other = [gcra("h", 1_000_000), gcra("g", 1_000_000)];
        for k in 0..KEYS {
            assert!(l.check(&k, &d, 1).unwrap().is_allowed());
            assert!(l.check(&k, &other, 1).unwrap().is_allowed());
        }
        // Meanwhile new keys under "d" grow the tables again and again.
        let wins = race_checks(&l, &d, KEYS, LIMIT, || {
            for k in 0..400_000u64 {
                let _ = l.check(&(1_000_000 + round * 1_000_000 + k), &d, 1);
            }
        });
        for k in 0..KEYS as usize {
            let total: u32 = wins.iter().map(|w| w[k]).sum();
            // One of the LIMIT units was used before the race.
            assert_eq!(total, LIMIT - 1, "round {round}, key {k}");
        }
    }
}

/// At the cap, every new key purges a shard (its own, or one a walk finds
/// due) and so copies that shard's tables, while other threads check the
/// keys in them without a lock. Keys still limiting keep every update
/// through those copies: each admits exactly its limit.
#[test]
fn purges_at_the_cap_lose_no_update_of_keys_still_limiting() {
    const KEYS: u64 = 1000;
    const LIMIT: u32 = 4;
    let clock = FakeClock::at_2026();
    // The keys under test, and a few places for keys that limit for a
    // millisecond: each new one finds the limiter full and a key gone fresh.
    let l = MemoryLimiter::<u64, _>::with_clock(KEYS as usize + 8, clock.clone());
    let gcra = |limit, period| Policy::new("d", limit, period, Algorithm::Gcra).unwrap();
    // One unit back in 900 s: more than the clock moves in this test.
    let hour = [gcra(LIMIT, Duration::from_secs(3600))];
    let brief = [gcra(1, Duration::from_millis(1))];
    for k in 0..KEYS {
        assert!(l.check(&k, &hour, 1).unwrap().is_allowed());
    }
    let wins = race_checks(&l, &hour, KEYS, LIMIT, || {
        for k in 0..50_000u64 {
            let _ = l.check(&(1_000_000 + k), &brief, 1);
            clock.advance(Duration::from_millis(1));
        }
    });
    for k in 0..KEYS as usize {
        let total: u32 = wins.iter().map(|w| w[k]).sum();
        // One unit was used before the race.
        assert_eq!(total, LIMIT - 1, "key {k}");
    }
    assert!(l.len() <= l.max_keys());
}

/// Hot keys that two threads check under 1 per 10 ms while a third streams
/// new keys at the cap, a millisecond apart: each new key's purge forgets
/// the hot keys gone fresh (in place, in tables of 400 keys still limiting,
/// or by a copy), racing the checks that would admit them again, and the
/// next check brings them back. Every hot key's admissions stay 10 ms
/// apart on the times they were judged at: a state lost while it still
/// limited would admit sooner. Two of the keys also live in the locked
/// form (a stacked plan of other names), where a check lands once their
/// word is forgotten.
#[test]
fn hot_keys_forgotten_and_brought_back_at_the_cap_keep_their_rate() {
    const HOT: u64 = 4;
    const LIMITING: u64 = 400;
    let clock = FakeClock::at_2026();
    let gcra = |name, limit, period| Policy::new(name, limit, period, Algorithm::Gcra).unwrap();
    let rate = [gcra("d", 1, Duration::from_millis(10))];
    let hour = [gcra("d", 1, Duration::from_secs(3600))];
    let brief = [gcra("d", 1, Duration::from_millis(1))];
    let other = [gcra("h", 1, Duration::from_secs(3600)), gcra("g", 1, Duration::from_secs(3600))];
    // The keys still limiting, both forms of two hot keys, and a few
    // places: every new key finds the limiter full.
    let l = MemoryLimiter::<u64, _>::with_clock((LIMITING + HOT + 2 + 2) as usize, clock.clone());
    for k in 1_000..1_000 + LIMITING {
        assert!(l.check(&k, &hour, 1).unwrap().is_allowed());
    }
    for k in 0..2 {
        assert!(l.check(&k, &other, 1).unwrap().is_allowed());
    }
    let done = std::sync::atomic::AtomicBool::new(false);
    // Passes of the checkers over the hot keys: the stream waits for one
    // every 25 ms, so the checks keep up on a busy host.
    let passes = std::sync::atomic::AtomicU64::new(0);
    let admitted: Vec<Vec<(u64, jiff::Timestamp)>> = std::thread::scope(|s| {
        let checkers: Vec<_> = (0..2u64)
            .map(|t| {
                let (l, rate, done, passes) = (&l, &rate, &done, &passes);
                s.spawn(move || {
                    let mut admitted = Vec::new();
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        for i in 0..HOT {
                            let k = (i + t) % HOT;
                            // Forgotten, a hot key is a new key: it may
                            // find no room (the stream took it).
                            if let Ok(d) = l.check(&k, rate, 1)
                                && d.is_allowed()
                            {
                                admitted.push((k, d.at()));
                            }
                        }
                        passes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    admitted
                })
            })
            .collect();
        for k in 0..10_000u64 {
            if k % 25 == 0 {
                let seen = passes.load(std::sync::atomic::Ordering::Relaxed);
                while passes.load(std::sync::atomic::Ordering::Relaxed) == seen {
                    std::thread::yield_now();
                }
            }
            let _ = l.check(&(1_000_000 + k), &brief, 1);
            clock.advance(Duration::from_millis(1));
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        checkers.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for k in 0..HOT {
        let mut at: Vec<_> = admitted.iter().flatten().filter(|a| a.0 == k).map(|a| a.1).collect();
        at.sort();
        // Non-vacuous: the key came back again and again (about 500 times
        // when last run).
        assert!(at.len() >= 50, "key {k}: {} admissions in 10 s", at.len());
        for w in at.windows(2) {
            let gap = w[1].duration_since(w[0]);
            assert!(
                gap >= jiff::SignedDuration::from_millis(10),
                "key {k}: admitted at {} and {}, {gap:?} apart",
                w[0],
                w[1]
            );
        }
    }
    assert!(l.len() <= l.max_keys());
}

/// On the real clock, a fixed window runs from one whole Unix second to the
/// next (as on Redis): the seed's 3 req/s sequence is denied with
/// `Retry-After: 1` and `X-RateLimit-Reset` the second the window ends.
#[test]
fn fixed_windows_align_with_unix_seconds() {
    let p = [Policy::new("default", 3, Duration::from_secs(1), Algorithm::FixedWindow).unwrap()];
    let limiter = MemoryLimiter::<String>::new(10);
    for attempt in 0.. {
        let key = format!("k{attempt}");
        let d: Vec<_> = (0..4).map(|_| limiter.check(&key, &p, 1).unwrap()).collect();
        let denied = &d[3];
        if denied.is_allowed() {
            // The burst straddled a second boundary; only that may admit a 4th.
            assert!(attempt < 5, "every burst straddled a second boundary");
            continue;
        }
        assert_eq!(denied.reset_unix(), denied.at().as_second() + 1);
        assert_eq!(denied.retry_after_secs(), Some(1));
        assert_eq!(
            d.iter().map(keygate::limit::Decision::remaining).collect::<Vec<_>>(),
            [2, 1, 0, 0]
        );
        break;
    }
}

/// One step of [`refunds_match_a_plain_window_model`].
#[derive(Debug, Clone)]
enum RefundOp {
    Check(u32),
    /// Refund `cost` of the `pick`-th earlier check (modulo their number).
    Refund {
        pick: usize,
        cost: u32,
    },
    Advance(u64),
}

fn refund_op() -> impl Strategy<Value = RefundOp> {
    prop_oneof![
        4 => (1..3u32).prop_map(RefundOp::Check),
        2 => (any::<usize>(), 1..4u32).prop_map(|(pick, cost)| RefundOp::Refund { pick, cost }),
        2 => (0..700u64).prop_map(RefundOp::Advance),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Checks and refunds (late, repeated, partial) against a model written
    /// from the windows' definitions, not from the limiter's code: a fixed
    /// window counts the units admitted in it less those given back while
    /// it was the current one; a sliding window counts the entries of the
    /// last period, and a refund removes its check's own entries (any of a
    /// check at the same instant). A refund gives back at most what its
    /// check charged, over all its refunds. Every check must agree.
    #[test]
    fn refunds_match_a_plain_window_model(
        sliding: bool,
        ops in prop::collection::vec(refund_op(), 1..60),
    ) {
        const LIMIT: u32 = 3;
        const PERIOD_MS: u64 = 1_000;
        let alg = if sliding { Algorithm::SlidingWindow } else { Algorithm::FixedWindow };
        let p = [Policy::new("w", LIMIT, Duration::from_millis(PERIOD_MS), alg).unwrap()];
        let clock = FakeClock::at_2026();
        let l = MemoryLimiter::<u64, _>::with_clock(16, clock.clone());
        let mut t = 0u64; // ms since the start, a whole second (window edge)
        // The model: per check, its time, units still refundable; per
        // fixed window, units held; for sliding, one entry time per unit.
        let mut checks: Vec<(keygate::limit::Decision, u64, u32)> = Vec::new();
        let mut held: std::collections::HashMap<u64, u32> = std::collections::HashMap::new();
        let mut entries: Vec<u64> = Vec::new();
        for op in ops {
            match op {
                RefundOp::Check(cost) => {
                    let fits = if sliding {
                        let live = entries.iter().filter(|&&e| e + PERIOD_MS > t).count();
                        live as u32 + cost <= LIMIT
                    } else {
                        held.get(&(t / PERIOD_MS)).copied().unwrap_or(0) + cost <= LIMIT
                    };
                    let d = l.check(&1, &p, cost).unwrap();
                    prop_assert_eq!(d.is_allowed(), fits, "check of {} at {} ms", cost, t);
                    if fits {
                        if sliding {
                            entries.extend(std::iter::repeat_n(t, cost as usize));
                        } else {
                            *held.entry(t / PERIOD_MS).or_default() += cost;
                        }
                    }
                    checks.push((d, t, if fits { cost } else { 0 }));
                }
                RefundOp::Refund { pick, cost } => {
                    if checks.is_empty() {
                        continue;
                    }
                    let n = checks.len();
                    let (d, at, left) = &mut checks[pick % n];
                    let give = cost.min(*left);
                    *left -= give;
                    l.refund(&1, &p, cost, d);
                    if sliding {
                        // Its own entries, while still in the last period.
                        let mut n = give;
                        entries.retain(|&e| {
                            let mine = n > 0 && e == *at && e + PERIOD_MS > t;
                            n -= u32::from(mine);
                            !mine
                        });
                    } else if *at / PERIOD_MS == t / PERIOD_MS {
                        let h = held.entry(t / PERIOD_MS).or_default();
                        *h = h.saturating_sub(give);
                    }
                }
                RefundOp::Advance(ms) => {
                    clock.advance(Duration::from_millis(ms));
                    t += ms;
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// GCRA refunds (late, repeated, partial, in any order, on the one-word
    /// and the locked form) never make the limiter more permissive than a
    /// world where the refunded units were never asked for: the model
    /// replays every admitted check at its own time with its cost less what
    /// was refunded of it, on GCRA's definition (the arrival time moves to
    /// `max(tat, t) + cost * T`; a check fits while that stays within the
    /// burst's horizon of now). A check the limiter admits, that world
    /// admits too.
    #[test]
    fn gcra_refunds_never_beat_a_world_without_the_refunded_units(
        stacked: bool,
        ops in prop::collection::vec(refund_op(), 1..60),
    ) {
        // T = 1 s exactly (3 per 3 s), horizon 3 s: no rounding in the model.
        const T_MS: u64 = 1_000;
        const CAP: u64 = 3;
        let g = Policy::new("g", 3, Duration::from_secs(3), Algorithm::Gcra).unwrap();
        // A second, never binding policy puts the key in the locked form.
        let loose = Policy::per_second(std::num::NonZeroU32::new(1_000).unwrap());
        let p: Vec<Policy> = if stacked { vec![g, loose] } else { vec![g] };
        let clock = FakeClock::at_2026();
        let l = MemoryLimiter::<u64, _>::with_clock(16, clock.clone());
        let mut t = 0u64; // ms since the start
        // Per admitted check: its decision, time, cost, units refunded.
        let mut checks: Vec<(keygate::limit::Decision, u64, u32, u32)> = Vec::new();
        for op in ops {
            match op {
                RefundOp::Check(cost) => {
                    let d = l.check(&1, &p, cost).unwrap();
                    if d.is_allowed() {
                        let world = checks.iter().fold(0u64, |tat, (_, at, c, r)| {
                            tat.max(*at) + u64::from(c - r) * T_MS
                        });
                        let need = world.max(t) + u64::from(cost) * T_MS - t;
                        prop_assert!(
                            need <= CAP * T_MS,
                            "admitted {} at {} ms where the world's arrival time is {} ms",
                            cost, t, world
                        );
                        checks.push((d, t, cost, 0));
                    }
                }
                RefundOp::Refund { pick, cost } => {
                    if checks.is_empty() {
                        continue;
                    }
                    let n = checks.len();
                    let (d, _, c, r) = &mut checks[pick % n];
                    l.refund(&1, &p, cost, d);
                    *r = (*r + cost).min(*c);
                }
                RefundOp::Advance(ms) => {
                    clock.advance(Duration::from_millis(ms));
                    t += ms;
                }
            }
        }
    }
}

/// The case the property above first found, by name: refunds of two
/// earlier checks move a third check's share of the arrival time to start
/// at its own time; a later refund of it, measured from the arrival time it
/// left, gave back the time of it that had passed since, and the key then
/// admitted three where a world without the three refunded checks admits
/// two.
#[test]
fn a_gcra_refund_after_refunds_of_earlier_checks_gives_back_no_passed_time() {
    let p = [Policy::new("g", 3, Duration::from_secs(3), Algorithm::Gcra).unwrap()];
    let clock = FakeClock::at_2026();
    let limiter = MemoryLimiter::<u64, _>::with_clock(16, clock.clone());
    let mut first = limiter.check(&1, &p, 1).unwrap();
    let mut second = limiter.check(&1, &p, 1).unwrap();
    let mut third = limiter.check(&1, &p, 1).unwrap();
    assert!(first.is_allowed() && second.is_allowed() && third.is_allowed());
    limiter.refund(&1, &p, 1, &mut first);
    limiter.refund(&1, &p, 1, &mut second);
    clock.advance(Duration::from_millis(600));
    assert!(limiter.check(&1, &p, 1).unwrap().is_allowed(), "y");
    // 600 ms of the third's second have passed: 400 ms of it are left to give back.
    limiter.refund(&1, &p, 1, &mut third);
    clock.advance(Duration::from_millis(400));
    // Without the three: y at 0.6 s leaves its arrival time at 1.6 s, so
    // at 1 s two more fit in the 3 s horizon, not three.
    let admitted = (0..3).filter(|_| limiter.check(&1, &p, 1).unwrap().is_allowed()).count();
    assert_eq!(admitted, 2);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A `DirectLimiter` decides as a `MemoryLimiter` does for one key, for
    /// every algorithm: GCRA and a fixed window in one word, a sliding
    /// window (and a fixed window too large for a word) under a lock.
    #[test]
    fn the_direct_limiter_decides_as_the_keyed_one(
        alg in 0..4u8,
        steps in prop::collection::vec((0..400u64, 1..4u32), 1..80),
    ) {
        let p = match alg {
            0 => Policy::new("d", 3, Duration::from_secs(1), Algorithm::Gcra).unwrap(),
            1 => Policy::new("d", 3, Duration::from_secs(1), Algorithm::FixedWindow).unwrap(),
            2 => Policy::new("d", 3, Duration::from_secs(1), Algorithm::SlidingWindow).unwrap(),
            // Past a word's count: the locked form of a fixed window.
            _ => Policy::new("d", 5_000_000, Duration::from_secs(1), Algorithm::FixedWindow)
                .unwrap(),
        };
        let clock = FakeClock::at_2026();
        let keyed = MemoryLimiter::<u64, _>::with_clock(16, clock.clone());
        let direct = keygate::limit::DirectLimiter::with_clock(p.clone(), clock.clone());
        for (gap_ms, cost) in steps {
            clock.advance(Duration::from_millis(gap_ms));
            let cost = if alg == 3 { cost * 2_000_000 } else { cost };
            let k = keyed.check(&1, std::slice::from_ref(&p), cost).unwrap();
            let d = direct.check(cost);
            prop_assert_eq!(
                (d.is_allowed(), d.remaining(), d.reset_after(), d.retry_after()),
                (k.is_allowed(), k.remaining(), k.binding().reset_after, k.retry_after()),
                "{:?} cost {}", p.algorithm(), cost
            );
        }
    }
}

/// The issue's scripted sequence on a `DirectLimiter` with a fixed window
/// (3 a second): at 0.0, 0.1, 0.2 and 0.3 s, remaining 2, 1, 0, then a
/// denial with `Retry-After: 1` and the window's end as the reset; the
/// next window admits three again. (It ran fixed windows as GCRA before,
/// which admitted a fifth unit within one window.)
#[test]
fn a_direct_fixed_window_counts_per_window() {
    let p = Policy::new("w", 3, Duration::from_secs(1), Algorithm::FixedWindow).unwrap();
    let clock = FakeClock::at_2026();
    let l = keygate::limit::DirectLimiter::with_clock(p, clock.clone());
    let mut remaining = Vec::new();
    for _ in 0..3 {
        remaining.push(l.check(1).remaining());
        clock.advance(Duration::from_millis(100));
    }
    assert_eq!(remaining, [2, 1, 0]);
    let d = l.decide(1);
    assert!(!d.is_allowed());
    assert_eq!(d.retry_after_secs(), Some(1));
    assert_eq!(d.reset_unix(), 1_767_225_601);
    clock.advance(Duration::from_millis(699));
    assert!(!l.check(1).is_allowed(), "still the first window at 0.999 s");
    clock.advance(Duration::from_millis(1));
    let admitted = (0..5).filter(|_| l.check(1).is_allowed()).count();
    assert_eq!(admitted, 3, "a new window, three more");
}

/// A clock whose next `now()`, once armed, blocks until released (and
/// answers what it read on entry): a thread preempted in the middle of a
/// check.
struct StallClock {
    inner: FakeClock,
    armed: std::sync::atomic::AtomicBool,
    stalled: std::sync::atomic::AtomicBool,
    release: std::sync::atomic::AtomicBool,
}

impl keygate::clock::Clock for StallClock {
    fn now(&self) -> jiff::Timestamp {
        use std::sync::atomic::Ordering::SeqCst;
        let v = self.inner.now();
        if self.armed.swap(false, SeqCst) {
            self.stalled.store(true, SeqCst);
            while !self.release.load(SeqCst) {
                std::thread::yield_now();
            }
        }
        v
    }

    fn monotonic(&self) -> keygate::clock::Nanos {
        self.inner.monotonic()
    }
}

/// A fixed window's check that read the clock and then stalled past the
/// window's end, while another thread moved the key on to the next window:
/// the stale reading must not take the newer window's word for a longer
/// window's and fold it back into the old one (its units would be lost).
/// 5 per 10 s: one check reads the time at 8.5 s (its re-anchoring read
/// stalls); 3 are used at 10.1 s; then the window [10, 20) has 2 left, for
/// `DirectLimiter` as for `MemoryLimiter`.
#[test]
fn a_stalled_window_check_keeps_the_next_windows_units() {
    use std::sync::atomic::Ordering::SeqCst;
    let p = Policy::new("w", 5, Duration::from_secs(10), Algorithm::FixedWindow).unwrap();
    for direct in [true, false] {
        let clock = Arc::new(StallClock {
            inner: FakeClock::at_2026(),
            armed: false.into(),
            stalled: false.into(),
            release: false.into(),
        });
        let d = Arc::new(keygate::limit::DirectLimiter::with_clock(p.clone(), Arc::clone(&clock)));
        let k = Arc::new(MemoryLimiter::<u64, _>::with_clock(16, Arc::clone(&clock)));
        let check = {
            let (d, k, p) = (Arc::clone(&d), Arc::clone(&k), p.clone());
            move |cost: u32| {
                if direct {
                    d.check(cost).is_allowed()
                } else {
                    k.check(&1, std::slice::from_ref(&p), cost).unwrap().is_allowed()
                }
            }
        };
        clock.inner.advance(Duration::from_millis(8_500));
        clock.armed.store(true, SeqCst);
        let stalled = {
            let check = check.clone();
            std::thread::spawn(move || check(1))
        };
        while !clock.stalled.load(SeqCst) {
            std::thread::yield_now();
        }
        clock.inner.advance(Duration::from_millis(1_600));
        assert!(check(3));
        clock.release.store(true, SeqCst);
        let _ = stalled.join().unwrap();
        let more = (0..10).filter(|_| check(1)).count();
        assert!(more <= 2, "direct {direct}: {more} more admitted in [10, 20) after 3 (or 4) of 5");
    }
}

/// A fixed window's check that read the clock in a full window and then
/// stalled past its end, while another thread used a unit of the next
/// window and refunded it (that window now counts nothing): the stale
/// reading must not take the emptied next window for a fresh key and start
/// its own, already ended, window again. 3 per 10 s: 3 used at 8.5 s, one
/// check reads the time at 9.6 s and stalls; at 10.7 s one unit is used and
/// refunded; then [0, 10) must still have admitted 3 only, in the one-word
/// form as in the locked one (a stacked plan).
#[test]
fn a_stalled_check_does_not_reopen_its_window_after_a_refund_empties_the_next() {
    use std::sync::atomic::Ordering::SeqCst;
    let p = Policy::new("w", 3, Duration::from_secs(10), Algorithm::FixedWindow).unwrap();
    let big = Policy::new("g", 1_000_000, Duration::from_secs(3600), Algorithm::Gcra).unwrap();
    for policies in [vec![p.clone(), big], vec![p.clone()]] {
        let clock = Arc::new(StallClock {
            inner: FakeClock::at_2026(),
            armed: false.into(),
            stalled: false.into(),
            release: false.into(),
        });
        let l = Arc::new(MemoryLimiter::<u64, _>::with_clock(16, Arc::clone(&clock)));
        let policies = Arc::new(policies);
        clock.inner.advance(Duration::from_millis(8_500));
        for _ in 0..3 {
            assert!(l.check(&1, &policies, 1).unwrap().is_allowed());
        }
        assert!(!l.check(&1, &policies, 1).unwrap().is_allowed());
        // 1.1 s after the last anchor: the next check re-anchors, and stalls.
        clock.inner.advance(Duration::from_millis(1_100));
        clock.armed.store(true, SeqCst);
        let stalled = {
            let (l, policies) = (Arc::clone(&l), Arc::clone(&policies));
            std::thread::spawn(move || l.check(&1, &policies, 1).unwrap())
        };
        while !clock.stalled.load(SeqCst) {
            std::thread::yield_now();
        }
        clock.inner.advance(Duration::from_millis(1_100));
        let mut next = l.check(&1, &policies, 1).unwrap();
        assert!(next.is_allowed());
        l.refund(&1, &policies, 1, &mut next);
        clock.release.store(true, SeqCst);
        let late = stalled.join().unwrap();
        // Judged at 9.6 s: admitted into [0, 10), it resets in 0.4 s.
        let in_first = late.policies()[0].reset_after < Duration::from_secs(1);
        assert!(
            !(late.is_allowed() && in_first),
            "{} policies: a fourth unit admitted in the full window [0, 10): {late:?}",
            policies.len()
        );
    }
}

/// A check that read the clock and then stalled while a purge forgot its
/// key's one-word state as fresh at a later time: the key is judged again
/// no earlier than that purge, which judged it fresh, not at the stale
/// reading, where its old state still counted. 1 per 10 s under "d",
/// admitted at 0 s; a check reads 5 s and stalls; at 10 s a new key at
/// the cap purges (the key's "d" state is fresh then, and forgotten); the
/// stalled check and one at 15 s cannot both be admitted (two units in
/// 10 s). Whether or not the key also lives in the locked form (a stacked
/// plan of other names, which a purge keeps while it limits), and whether
/// the purge copies the key's table or forgets the word in place (a table
/// holding more keys, still limiting).
#[test]
fn a_stalled_check_is_not_judged_before_a_purge_that_forgot_its_key() {
    use std::sync::atomic::Ordering::SeqCst;
    let gcra = |name, limit, secs| {
        Policy::new(name, limit, Duration::from_secs(secs), Algorithm::Gcra).unwrap()
    };
    let d = [gcra("d", 1, 10)];
    // Limiting for an hour: a purge keeps the key's locked form.
    let other = [gcra("h", 1, 3600), gcra("g", 1, 3600)];
    // The new key's: fresh again at once, so a later check finds room.
    let brief = [Policy::new("d", 1, Duration::from_millis(1), Algorithm::Gcra).unwrap()];
    let hour = [gcra("d", 1, 3600)];
    for (both_forms, extra) in [(false, 0), (true, 0), (false, 200), (true, 200)] {
        let clock = Arc::new(StallClock {
            inner: FakeClock::at_2026(),
            armed: false.into(),
            stalled: false.into(),
            release: false.into(),
        });
        // The cap is the keys' states: the next key makes room.
        let l = Arc::new(MemoryLimiter::<u64, _>::with_clock(
            extra + 1 + usize::from(both_forms),
            Arc::clone(&clock),
        ));
        for k in 1_000..1_000 + extra as u64 {
            assert!(l.check(&k, &hour, 1).unwrap().is_allowed());
        }
        assert!(l.check(&1, &d, 1).unwrap().is_allowed());
        if both_forms {
            assert!(l.check(&1, &other, 1).unwrap().is_allowed());
        }
        // 1 s after the last anchor: the next check re-anchors, and stalls.
        clock.inner.advance(Duration::from_secs(5));
        clock.armed.store(true, SeqCst);
        let stalled = {
            let (l, d) = (Arc::clone(&l), d.clone());
            std::thread::spawn(move || l.check(&1, &d, 1))
        };
        while !clock.stalled.load(SeqCst) {
            std::thread::yield_now();
        }
        clock.inner.advance(Duration::from_secs(5));
        assert!(l.check(&2, &brief, 1).unwrap().is_allowed(), "key 1's \"d\" was fresh");
        clock.release.store(true, SeqCst);
        // Refused is not admitted: the stalled check may find no room.
        let late = stalled.join().unwrap();
        clock.inner.advance(Duration::from_secs(5));
        let next = l.check(&1, &d, 1).unwrap();
        assert!(
            !(late.as_ref().is_ok_and(keygate::limit::Decision::is_allowed) && next.is_allowed()),
            "both forms {both_forms}, {extra} more keys: admitted at 0 s, at the stalled 5 s and at 15 s: {late:?}"
        );
    }
}

/// `DirectLimiter::decide`'s reset for a fixed window is the window's end
/// on the real clock too: the wall time of the reading the check was
/// judged at, not a later one (a window ending on a whole second then read
/// as ending a second later).
#[test]
fn a_direct_fixed_windows_reset_is_its_end_on_the_system_clock() {
    let p = Policy::new("w", 1_000_000, Duration::from_secs(1), Algorithm::FixedWindow).unwrap();
    let direct = keygate::limit::DirectLimiter::new(p);
    for _ in 0..50 {
        let d = direct.decide(1);
        assert_eq!(d.reset_unix(), d.at().as_second() + 1, "{d:?}");
        std::thread::sleep(Duration::from_millis(3));
    }
}

/// A refund under the plan before a change reads a fixed window that ends
/// inside its own current window as its own (carried over), keeping every
/// unit: such a window may be a longer one's this period does not divide.
/// 3 per 2 s, then 100 per 3 s with 50 used at 2.5 s (its window [0, 3)
/// ends inside the 2 s plan's [2, 4)); a refund of the first check under
/// the 2 s plan; the 3 s window has 50 left, no more. And a sliding window
/// refund gives back only the check's own entry, dropping none the longer
/// plan still counts: 1 of 3 a second, 3 of 4 an hour, then after 1.1 s
/// the first refunded: one more fits.
#[test]
fn refunds_under_an_older_plan_keep_what_the_newer_plan_counts() {
    let clock = FakeClock::at_2026();
    let l = MemoryLimiter::<u64, _>::with_clock(16, clock.clone());
    let short = [Policy::new("x", 3, Duration::from_secs(2), Algorithm::FixedWindow).unwrap()];
    let long = [Policy::new("x", 100, Duration::from_secs(3), Algorithm::FixedWindow).unwrap()];
    clock.advance(Duration::from_millis(50));
    let mut first = l.check(&1, &short, 1).unwrap();
    clock.advance(Duration::from_millis(2_450));
    assert!(l.check(&1, &long, 50).unwrap().is_allowed());
    l.refund(&1, &short, 1, &mut first);
    let admitted = (0..120).filter(|_| l.check(&1, &long, 1).unwrap().is_allowed()).count();
    assert_eq!(admitted, 50, "fixed windows");
    // Nor does the refund reach into the newer plan's next window [3, 6).
    clock.advance(Duration::from_millis(600));
    let admitted = (0..120).filter(|_| l.check(&1, &long, 1).unwrap().is_allowed()).count();
    assert_eq!(admitted, 100, "fixed windows, the next window");

    let short = [Policy::new("y", 3, Duration::from_secs(1), Algorithm::SlidingWindow).unwrap()];
    let hour = [Policy::new("y", 4, Duration::from_secs(3600), Algorithm::SlidingWindow).unwrap()];
    let mut first = l.check(&2, &short, 1).unwrap();
    assert!(l.check(&2, &hour, 3).unwrap().is_allowed());
    clock.advance(Duration::from_millis(1_100));
    l.refund(&2, &short, 1, &mut first);
    let admitted = (0..6).filter(|_| l.check(&2, &hour, 1).unwrap().is_allowed()).count();
    assert_eq!(admitted, 1, "sliding windows");
}

/// Limits at the edges of the arithmetic never saturate into "unlimited".
mod edges {
    use std::num::NonZeroU32;
    use std::time::Duration;

    use keygate::clock::{Clock, FakeClock};
    use keygate::limit::{Algorithm, DirectLimiter, MemoryLimiter, Policy};

    const YEAR: u64 = 365 * 86_400;

    fn admitted_of_ten(check: impl Fn() -> bool) -> usize {
        (0..10).filter(|_| check()).count()
    }

    #[test]
    fn a_full_fixed_window_of_u32_max_admits_no_more() {
        let p =
            Policy::new("w", u32::MAX, Duration::from_secs(60), Algorithm::FixedWindow).unwrap();
        let keyed = MemoryLimiter::<String, _>::with_clock(1000, FakeClock::at_2026());
        let d = keyed.check("k", std::slice::from_ref(&p), u32::MAX).unwrap();
        assert!(d.is_allowed() && d.remaining() == 0);
        let ps = std::slice::from_ref(&p);
        assert_eq!(admitted_of_ten(|| keyed.check("k", ps, 1).unwrap().is_allowed()), 0);
        let direct = DirectLimiter::with_clock(p, FakeClock::at_2026());
        assert!(direct.check(u32::MAX).is_allowed());
        assert_eq!(admitted_of_ten(|| direct.check(1).is_allowed()), 0);
    }

    #[test]
    fn decades_on_the_time_line_keep_one_word_states_exact() {
        let fixed = [Policy::new("w", 1, Duration::from_secs(60), Algorithm::FixedWindow).unwrap()];
        let gcra = [Policy::per_second(NonZeroU32::new(1).unwrap())];
        for (years, p) in [(37, &fixed), (300, &gcra), (300, &fixed)] {
            let clock = FakeClock::at_2026();
            let l = MemoryLimiter::<String, _>::with_clock(1000, clock.clone());
            clock.advance(Duration::from_secs(years * YEAR));
            let n = admitted_of_ten(|| l.check("k", p, 1).unwrap().is_allowed());
            assert_eq!(n, 1, "{years} years on, {:?}", p[0].algorithm());
        }
    }

    #[test]
    fn a_direct_gcra_at_the_end_of_the_clock_admits_its_burst_only() {
        let clock = FakeClock::at_2026();
        let l = DirectLimiter::with_clock(
            Policy::per_second(NonZeroU32::new(1).unwrap()),
            clock.clone(),
        );
        clock.advance(Duration::MAX);
        assert_eq!(clock.monotonic().as_u64(), u64::MAX);
        assert_eq!(admitted_of_ten(|| l.check(1).is_allowed()), 1);
    }
}
