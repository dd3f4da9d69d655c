//! The keyed limiter's memory, counted by the allocator: ten million
//! distinct keys through a limiter capped at ten thousand leave it holding
//! what ten thousand need, not what ten million would. Alone in its binary,
//! so no other test's allocations are counted.

use std::alloc::System;
use std::time::Duration;

use keygate::clock::FakeClock;
use keygate::limit::{Algorithm, MemoryLimiter, Policy};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes allocated and not yet freed since `region` began.
fn live(region: &Region<'_, System>) -> i64 {
    let s = region.change();
    let grown = i64::try_from(s.bytes_allocated).unwrap() + s.bytes_reallocated as i64;
    grown - i64::try_from(s.bytes_deallocated).unwrap()
}

#[test]
fn ten_million_distinct_keys_stay_under_the_cap_in_keys_and_bytes() {
    let region = Region::new(GLOBAL);
    let clock = FakeClock::at_2026();
    let l = MemoryLimiter::<u64, _>::with_clock(10_000, clock.clone());
    let cap = l.max_keys();
    let p = [Policy::new("d", 10, Duration::from_millis(1), Algorithm::Gcra).unwrap()];
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let mut refused = 0u64;
    let mut at_first_million = 0;
    for i in 0..10_000_000u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if l.check(&x, &p, 1).is_err() {
            refused += 1;
        }
        if i % 100_000 == 0 {
            assert!(l.len() <= cap, "{} keys tracked, cap {cap}", l.len());
        }
        if i == 1_000_000 {
            at_first_million = live(&region);
        }
        clock.advance(Duration::from_nanos(500));
    }
    assert!(l.len() <= cap);
    // Each key is fresh 100 µs after its request: ~200 live at a time.
    assert_eq!(refused, 0);
    let end = live(&region);
    eprintln!("live bytes: {at_first_million} after 1M keys, {end} after 10M (cap {cap})");
    // Unbounded, ten million keys would hold hundreds of megabytes; the
    // cap's keys take tens of bytes each (and the shards a little more).
    let bound = 64 * i64::try_from(cap).unwrap() + (1 << 20);
    assert!(end < bound, "{end} bytes live after ten million keys (bound {bound})");
    assert!(end <= at_first_million + (1 << 20), "grew from {at_first_million} to {end}");
    drop(l);
}
