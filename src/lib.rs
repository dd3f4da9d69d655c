#![doc = include_str!("../README.md")]
//!
//! # Architecture
//!
//! ```text
//! headers ──► credentials ──► format::parse ──► hash ──► KeyStore lookup ──► verify
//! ```
//!
//! | module | owns |
//! |---|---|
//! | [`backend`] | [`BackendError`](backend::BackendError) returned by every store, and the host's [`FailMode`](backend::FailMode) |
//! | [`secret`] | [`Secret`] wrapper and constant-time [`Digest`] — the only place plaintext lives |
//! | [`format`](mod@format) | declarative key grammars, presets, minting and parsing from one value |
//! | [`clock`] | wall and monotonic time behind one trait; system and fake clocks |
//! | [`http`] | [`Rejection`](http::Rejection) → status, headers and JSON body in the host's style |
//! | [`portal`] | portal session requests: parsing and validation into 400 rejections |

pub mod backend;
pub mod clock;
pub mod format;
pub mod http;
pub mod portal;
pub mod secret;

pub use format::{ApiKey, FormatSet, KeyFormat};
pub use secret::{Digest, Secret, SecretString};
