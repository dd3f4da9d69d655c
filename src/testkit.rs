//! Conformance suites for implementations of keygate's storage traits.
//!
//! Run them from your own tests against your backend; the shipped in-memory
//! (and Redis) stores pass exactly the same suites. Each suite panics with a
//! message naming the broken rule. The `run` suites are sequential: run the
//! `race` suites too ([`keys::race`], [`portal::race`], [`limit::race`],
//! [`quota::race`]), or a store whose checks are not atomic passes.
//!
//! ```
//! # async fn demo() {
//! keygate::testkit::keys::run(keygate::store::MemoryKeyStore::new).await;
//! # }
//! ```

pub mod keys;
pub mod limit;
pub mod portal;
pub mod quota;
