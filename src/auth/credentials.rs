//! Pulling one credential out of request headers, in bounded time.

use std::fmt;

/// Which header carried the credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Source {
    /// `Authorization: Bearer <key>`.
    Bearer,
    /// `X-API-Key: <key>`.
    ApiKeyHeader,
    /// A cookie a gate route takes (`GateLayer::cookie`), held to the
    /// Bearer rules: [`HeaderRules::accepts`] answers for it as for
    /// [`Bearer`](Self::Bearer).
    Cookie,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Bearer => "Authorization: Bearer",
            Self::ApiKeyHeader => "X-API-Key",
            Self::Cookie => "a cookie",
        })
    }
}

/// Why the credential headers were refused before any parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// A credential header is longer than the configured cap.
    #[error("credential header longer than {max} bytes")]
    Oversized {
        /// The cap.
        max: usize,
    },
    /// More than one credential was presented (two `Authorization` headers,
    /// two `X-API-Key` headers, or both kinds; on a route that takes a
    /// cookie, two non-empty cookies of its name).
    #[error("more than one credential presented")]
    Conflicting,
    /// A credential header holds non-ASCII or control bytes.
    #[error("credential header contains non-ASCII or control bytes")]
    InvalidBytes,
    /// `Authorization` uses a scheme other than `Bearer` (`Basic …`,
    /// `Token …`). No key was presented: the caller is answered as for a
    /// missing one ([`AuthError::rejection`](crate::auth::AuthError::rejection)).
    /// (`Bearer` with no token after it is no credential at all:
    /// [`HeaderRules::extract`] finds none.)
    #[error("authorization header is not `Bearer <token>`")]
    NotBearer,
    /// The key's format may not be sent in this header (e.g. an `nh_` key
    /// sent as a Bearer token when the host accepts it only in `X-API-Key`).
    #[error("key format `{format}` is not accepted in {header}")]
    WrongHeader {
        /// The key's format.
        format: &'static str,
        /// The header it came in.
        header: Source,
    },
}

/// Which formats may arrive in which header, and how long a credential
/// header may be.
///
/// The default follows the seed products: `nh` keys in `X-API-Key`, every
/// other format as a Bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderRules {
    api_key: Vec<&'static str>,
    bearer_excludes_api_key: bool,
    max_len: usize,
}

impl Default for HeaderRules {
    fn default() -> Self {
        Self { api_key: vec!["nh"], bearer_excludes_api_key: true, max_len: 1024 }
    }
}

impl HeaderRules {
    /// Formats accepted in `X-API-Key`; every other format is accepted only
    /// as a Bearer token.
    #[must_use]
    pub fn api_key_formats(mut self, formats: &[&'static str]) -> Self {
        self.api_key = formats.to_vec();
        self
    }

    /// Also accept the `X-API-Key` formats as Bearer tokens.
    #[must_use]
    pub fn allow_api_key_formats_as_bearer(mut self) -> Self {
        self.bearer_excludes_api_key = false;
        self
    }

    /// Longest accepted credential header value, in bytes (default 1024).
    #[must_use]
    pub fn max_header_len(mut self, bytes: usize) -> Self {
        self.max_len = bytes;
        self
    }

    /// Whether a key of `format` may arrive from `source`.
    #[must_use]
    pub fn accepts(&self, format: &str, source: Source) -> bool {
        let api = self.api_key.contains(&format);
        match source {
            Source::ApiKeyHeader => api,
            Source::Bearer | Source::Cookie => !(api && self.bearer_excludes_api_key),
        }
    }

    /// Finds the one credential in `headers` (name, value) pairs.
    ///
    /// `Ok(None)` when no credential header is present, or only blank ones:
    /// nothing or only spaces, or `Bearer` with nothing after it (an unset
    /// variable in a script) is a missing key, not a malformed one, and no
    /// second credential beside another header's key. Header names are
    /// matched case-insensitively, the `Bearer` scheme too; the token itself
    /// is taken exactly (no trimming beyond the separating spaces).
    ///
    /// # Errors
    ///
    /// [`CredentialError`] for oversized values, more than one credential,
    /// non-ASCII or control bytes, or a non-Bearer `Authorization`.
    pub fn extract<'h, I>(&self, headers: I) -> Result<Option<(Source, &'h str)>, CredentialError>
    where
        I: IntoIterator<Item = (&'h str, &'h [u8])>,
    {
        let mut found: Option<(Source, Result<&'h [u8], CredentialError>)> = None;
        for (name, value) in headers {
            let source = if name.eq_ignore_ascii_case("authorization") {
                Source::Bearer
            } else if name.eq_ignore_ascii_case("x-api-key") {
                Source::ApiKeyHeader
            } else {
                continue;
            };
            if value.len() > self.max_len {
                return Err(CredentialError::Oversized { max: self.max_len });
            }
            if !visible_ascii(value) {
                return Err(CredentialError::InvalidBytes);
            }
            let token = token(source, value);
            if token.is_ok_and(<[u8]>::is_empty) {
                continue;
            }
            if found.is_some() {
                return Err(CredentialError::Conflicting);
            }
            found = Some((source, token));
        }
        let Some((source, token)) = found else { return Ok(None) };
        // Checked ASCII above, so this cannot fail.
        let token = std::str::from_utf8(token?).map_err(|_| CredentialError::InvalidBytes)?;
        Ok(Some((source, token)))
    }
}

/// Whether `value` holds only visible ASCII and spaces (RFC 9110 field
/// values minus obs-text and HTAB): false for NUL, CR/LF, DEL and UTF-8.
/// The bytes a credential (header or cookie) may hold.
pub(crate) fn visible_ascii(value: &[u8]) -> bool {
    // No early exit: the fold vectorizes, and a credential is short.
    value.iter().fold(true, |ok, &b| ok & (0x20..0x7f).contains(&b))
}

/// The token in a credential header's `value`: empty for a blank header.
fn token(source: Source, value: &[u8]) -> Result<&[u8], CredentialError> {
    if value.iter().all(|&b| b == b' ') {
        return Ok(&[]);
    }
    match source {
        // A cookie's value, like `X-API-Key`'s, is the token itself (though
        // `extract` reads headers only and never passes one).
        Source::ApiKeyHeader | Source::Cookie => Ok(value),
        Source::Bearer if value.eq_ignore_ascii_case(b"bearer") => Ok(&[]),
        Source::Bearer => {
            let scheme = value.get(..7).ok_or(CredentialError::NotBearer)?;
            if !scheme.eq_ignore_ascii_case(b"bearer ") {
                return Err(CredentialError::NotBearer);
            }
            let rest = &value[7..];
            let start = rest.iter().position(|&b| b != b' ').unwrap_or(rest.len());
            Ok(&rest[start..])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex<'a>(h: &[(&'a str, &'a str)]) -> Result<Option<(Source, &'a str)>, CredentialError> {
        HeaderRules::default().extract(h.iter().map(|(n, v)| (*n, v.as_bytes())))
    }

    #[test]
    fn bearer_and_api_key() {
        assert_eq!(ex(&[("Authorization", "Bearer abc")]), Ok(Some((Source::Bearer, "abc"))));
        assert_eq!(ex(&[("authorization", "bEaReR  abc")]), Ok(Some((Source::Bearer, "abc"))));
        assert_eq!(ex(&[("X-API-Key", "nh_1")]), Ok(Some((Source::ApiKeyHeader, "nh_1"))));
        assert_eq!(ex(&[("x-api-key", "nh_1"), ("accept", "*/*")]).unwrap().unwrap().1, "nh_1");
        assert_eq!(ex(&[("accept", "*/*")]), Ok(None));
        assert_eq!(ex(&[]), Ok(None));
    }

    #[test]
    fn refusals() {
        assert_eq!(ex(&[("Authorization", "Basic abc")]), Err(CredentialError::NotBearer));
        // A scheme or header with no key in it is a missing key (an unset
        // variable in a script), answered as such.
        for empty in ["Bearer", "Bearer ", "bearer   ", "", "   "] {
            assert_eq!(ex(&[("Authorization", empty)]), Ok(None), "{empty:?}");
        }
        for empty in ["", "   "] {
            assert_eq!(ex(&[("X-API-Key", empty)]), Ok(None), "{empty:?}");
        }
        assert_eq!(ex(&[("Authorization", "Bearerabc")]), Err(CredentialError::NotBearer));
        assert_eq!(
            ex(&[("Authorization", "Bearer a"), ("X-API-Key", "b")]),
            Err(CredentialError::Conflicting)
        );
        assert_eq!(
            ex(&[("X-API-Key", "a"), ("x-api-key", "a")]),
            Err(CredentialError::Conflicting)
        );
        // A blank header is no second credential beside another's key.
        for blank in [("X-API-Key", " "), ("Authorization", "Bearer "), ("Authorization", "")] {
            let key = if blank.0 == "X-API-Key" {
                ("Authorization", "Bearer k")
            } else {
                ("X-API-Key", "k")
            };
            for pairs in [[blank, key], [key, blank]] {
                assert_eq!(ex(&pairs).unwrap().unwrap().1, "k", "{pairs:?}");
            }
        }
        assert_eq!(
            ex(&[("Authorization", "Basic a"), ("X-API-Key", "b")]),
            Err(CredentialError::Conflicting)
        );
        assert_eq!(ex(&[("X-API-Key", "a\tb")]), Err(CredentialError::InvalidBytes));
        assert_eq!(ex(&[("X-API-Key", "a\0")]), Err(CredentialError::InvalidBytes));
        assert_eq!(ex(&[("X-API-Key", "ä")]), Err(CredentialError::InvalidBytes));
        let long = "a".repeat(1025);
        assert_eq!(ex(&[("X-API-Key", &long)]), Err(CredentialError::Oversized { max: 1024 }));
        assert!(ex(&[("X-API-Key", &long[..1024])]).is_ok());
        // Trailing spaces are part of the token, which then fails to parse.
        assert_eq!(ex(&[("Authorization", "Bearer abc ")]).unwrap().unwrap().1, "abc ");
    }

    #[test]
    fn routing_rules() {
        let r = HeaderRules::default();
        assert!(r.accepts("nh", Source::ApiKeyHeader) && !r.accepts("nh", Source::Bearer));
        assert!(r.accepts("sk", Source::Bearer) && !r.accepts("sk", Source::ApiKeyHeader));
        assert!(!r.accepts("nh", Source::Cookie) && r.accepts("sk", Source::Cookie));
        let r = r.allow_api_key_formats_as_bearer();
        assert!(r.accepts("nh", Source::Bearer) && r.accepts("nh", Source::Cookie));
        // The configured list replaces the default one: `sk` moves to
        // `X-API-Key` (and out of Bearer), `nh` becomes a Bearer format.
        let r = HeaderRules::default().api_key_formats(&["sk"]);
        assert!(r.accepts("sk", Source::ApiKeyHeader) && !r.accepts("sk", Source::Bearer));
        assert!(r.accepts("nh", Source::Bearer) && !r.accepts("nh", Source::ApiKeyHeader));
    }

    #[test]
    fn a_configured_length_cap_replaces_the_default() {
        let r = HeaderRules::default().max_header_len(8);
        let extract = |v: &'static str| r.extract([("X-API-Key", v.as_bytes())]);
        assert_eq!(extract("12345678"), Ok(Some((Source::ApiKeyHeader, "12345678"))));
        assert_eq!(extract("123456789"), Err(CredentialError::Oversized { max: 8 }));
    }

    #[test]
    fn a_wrong_header_refusal_names_the_header() {
        let e = CredentialError::WrongHeader { format: "nh", header: Source::Bearer };
        assert_eq!(e.to_string(), "key format `nh` is not accepted in Authorization: Bearer");
        assert_eq!(Source::ApiKeyHeader.to_string(), "X-API-Key");
        assert_eq!(Source::Cookie.to_string(), "a cookie");
    }
}
