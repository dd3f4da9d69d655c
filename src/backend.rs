//! The error every storage trait returns when its backend fails, and the
//! host's choice of what such a failure means for a request.

use std::error::Error as StdError;
use std::fmt;

/// A storage backend (database, Redis, …) could not answer.
///
/// Stores return this for infrastructure failures only — never for "not
/// found" or "already used", which are ordinary results. The host decides
/// what a failure means for the request with [`FailMode`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The backend could not be reached or refused the operation.
    #[error("storage backend unavailable")]
    Unavailable {
        /// The underlying client error.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// The backend did not answer within the configured timeout.
    #[error("storage backend timed out")]
    Timeout,
    /// The store is full: it cannot take another entry without dropping
    /// one it must keep (an in-memory limiter tracking its maximum of keys,
    /// all still limiting; Redis at `maxmemory` with `noeviction`). Size it
    /// up: under a fail-open gate, requests pass unlimited meanwhile.
    #[error("storage backend full")]
    Full {
        /// What is full.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// The backend answered with data that does not decode, or that the
    /// store never writes (a bug, a record written by an incompatible
    /// version, or a value written under the store's keys by something
    /// else: a Redis quota counter of `-5`, a record missing a field).
    #[error("storage backend returned corrupt data: {what}")]
    Corrupt {
        /// What could not be decoded (never a secret).
        what: String,
    },
}

impl BackendError {
    /// Wraps a client error as [`BackendError::Unavailable`].
    #[must_use]
    pub fn unavailable(source: impl StdError + Send + Sync + 'static) -> Self {
        Self::Unavailable { source: Box::new(source) }
    }

    /// A [`BackendError::Corrupt`] describing `what`.
    #[must_use]
    pub fn corrupt(what: impl fmt::Display) -> Self {
        Self::Corrupt { what: what.to_string() }
    }
}

/// What a request gets when a store fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FailMode {
    /// Refuse the request (503). The safe default.
    #[default]
    Closed,
    /// Let the request through as if the check had passed. Only for checks
    /// whose failure costs less than an outage (e.g. a rate limit), and
    /// only by the host's explicit choice.
    Open,
}
