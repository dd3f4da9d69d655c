#![doc = include_str!("../README.md")]
//!
//! # Architecture
//!
//! One request, end to end; each arrow hands a typed value to the next, and
//! a failure at any stage becomes one [`Rejection`](http::Rejection):
//!
//! ```text
//! headers ──► credentials ──► FormatSet::parse ──► format checks ──► hash ──► PrincipalCache ──► KeyStore lookup ──► verify ──► Principal
//!  (Bearer /   (HeaderRules:   (typed parts;        (HeaderRules:     (Hasher:  (hit: skip the     (by digest, or by    (constant-time  │
//!   X-API-Key)  size, bytes)    garbage never        which format      SHA-256 / store and verify) public key id)       digest ==;      │
//!                               reaches a store)     where; route     HMAC)                                            revoked,         │
//!                                                    formats)                                                          expired; route's │
//!                                                                                                                      and deployment's │
//!                                                                                                                      region)          │
//!    ┌──────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────┘
//!    ▼
//! LimitStore::check ──► Target::check ──► standing ──► Principal::require(scope) ──► QuotaStore ──► handler
//!  (the key's plan:      (tenant,          (deployment    (one AND on a ScopeSet)       (monthly,
//!   GCRA / windows;       environment)      environment,                                 by category)
//!   Decision + headers)                     AccountStatus)
//!
//!    response ◄── http::Rejection::to_response (status, headers, body style) on any refusal
//! ```
//!
//! A handler whose request failed before doing its work (an upstream down)
//! gives the units back: the rate limit's through its `Refund`
//! ([`LimitStore::refund`](limit::LimitStore::refund)), the month's quota
//! through its `QuotaRefund` ([`QuotaStore::refund`](quota::QuotaStore::refund)).
//!
//! `verify` also requires the record found to be the key's: its format,
//! and the environment or region the key's own text names (`sk_test_`,
//! `nhk_eu_`), so a record written or imported wrong cannot carry a key
//! past the environment and region checks.
//!
//! The `tower` feature's `Gate` runs this whole line per request (its
//! layer, or `Gate::admit` for a host on another framework, which hands out
//! the same refund handles); without it, a host calls the same pieces
//! itself (see `tests/no_tower.rs`): the
//! target's tenant and environment checks and the standing checks (the
//! authenticator's `environment` and `account_status`) run inside
//! authentication, before any limit, unless the host checks the target
//! itself after its limit (`Target::check`) and defers the standing checks
//! (`Target::defer_standing`, then `Authenticator::check_standing`), as the
//! gate does, so those 403s carry the rate-limit headers too.
//!
//! | module | owns |
//! |---|---|
//! | [`secret`] | [`Secret`] wrapper and constant-time [`Digest`] — the only place plaintext lives; OS CSPRNG draws (feature `vdso`: through the Linux vDSO) |
//! | [`format`](mod@format) | declarative key grammars, presets, minting and parsing from one value |
//! | [`scan`] | streaming [`Scanner`](scan::Scanner): find and redact keys in arbitrary bytes |
//! | [`hash`] | key → [`StoredDigest`](hash::StoredDigest): SHA-256 or HMAC-SHA256 with rotating peppers |
//! | [`scope`] | `resource:action` scopes, roles, a registry compiling them to bitsets, attenuation |
//! | [`store`] | [`KeyRecord`](store::KeyRecord) (ids, short text and [`Metadata`](store::Metadata) held inline), the [`KeyStore`](store::KeyStore) trait and its in-memory implementation; expired and revoked records forgotten after a retention |
//! | [`auth`] | credentials → [`Principal`](auth::Principal) or a typed [`AuthError`](auth::AuthError); cache; last use |
//! | [`manager`] | create, list, revoke and roll keys |
//! | [`portal`] | portal session requests, single-use codes, [`PortalStore`](portal::PortalStore), access tokens |
//! | [`limit`] | policies, plans, GCRA / fixed / sliding windows, decisions and headers, keyed and direct limiters, [`LimitStore`](limit::LimitStore) |
//! | [`quota`] | monthly quotas by category, calendar-month reset, refunds, [`QuotaStore`](quota::QuotaStore) |
//! | [`http`] | [`Rejection`](http::Rejection) → status, headers and JSON body in the host's style |
//! | [`json`] | JSON input that refuses repeated object keys (requests, plan files) |
//! | [`backend`] | [`BackendError`](backend::BackendError) returned by every store, and the host's [`FailMode`](backend::FailMode) |
//! | [`clock`] | wall and monotonic time behind one trait; system, fake and (feature `quanta`) TSC clocks |
//! | `tower` (feature) | `Gate` and its per-route layer: authenticate, rate-limit, authorize, count quota, answer refusals |
//! | `redis` (feature) | Redis-backed limiter, portal, quota and key stores (one Lua step each; the limiter on the server's clock, the others on the caller's), revocation pub/sub |
//! | `testkit` (feature) | conformance suites for implementations of the store traits |

pub mod auth;
pub mod backend;
pub mod clock;
pub mod format;
pub mod hash;
pub mod http;
pub mod json;
pub mod limit;
pub mod manager;
pub mod portal;
pub mod quota;
#[cfg(feature = "redis")]
pub mod redis;
pub mod scan;
pub mod scope;
pub mod secret;
pub mod store;
#[cfg(feature = "testkit")]
pub mod testkit;
#[cfg(feature = "tower")]
pub mod tower;

pub use format::{ApiKey, FormatSet, KeyFormat};
/// The time crate of keygate's API: [`Timestamp`](jiff::Timestamp)s stamp
/// responses (`Rejection::to_response(style, keygate::jiff::Timestamp::now())`),
/// records and decisions. Re-exported so a host names the very version
/// keygate uses, without a dependency of its own to keep in step.
pub use jiff;
pub use secret::{Digest, Secret, SecretString};
