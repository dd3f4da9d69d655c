//! A proptest strategy for timestamps, shared by the serde round-trip
//! tests of key records and portal sessions.

use jiff::Timestamp;
use proptest::prelude::*;

/// Any time jiff holds, the range's ends most of all.
pub(crate) fn any_time() -> impl Strategy<Value = Timestamp> {
    let (min, max) = (Timestamp::MIN.as_nanosecond(), Timestamp::MAX.as_nanosecond());
    prop_oneof![
        Just(Timestamp::MIN),
        Just(Timestamp::MAX),
        (min..=max).prop_map(|ns| Timestamp::from_nanosecond(ns).unwrap()),
    ]
}
