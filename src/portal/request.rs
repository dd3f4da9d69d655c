//! The request a management principal sends to mint a portal session.
//!
//! Parsing goes through [`serde_json::Value`] so every rule violation is a
//! specific [`RequestError`] naming the field and the rule, which maps to
//! [`Rejection::BadRequest`].

use std::borrow::Cow;
use std::collections::BTreeMap;

use crate::http::Rejection;
use crate::scope::Role;
use crate::store::Metadata;

/// Most metadata keys a session may carry.
pub const MAX_METADATA_KEYS: usize = 10;
/// Longest metadata key, in bytes.
pub const MAX_METADATA_KEY_LEN: usize = 64;
/// Longest metadata value, in bytes.
pub const MAX_METADATA_VALUE_LEN: usize = 512;
/// The prefix of metadata keys keygate sets itself (`portal.role` on the
/// access token's record); a session request may not use it.
pub const RESERVED_METADATA_PREFIX: &str = "portal.";
/// Shortest allowed session lifetime, in minutes.
pub const MIN_EXPIRES_IN_MINUTES: u64 = 1;
/// Longest allowed (and default) session lifetime, in minutes.
pub const MAX_EXPIRES_IN_MINUTES: u64 = 60;

/// [`MAX_EXPIRES_IN_MINUTES`] as JSON's other number type.
#[allow(clippy::cast_precision_loss)] // 60 is exact.
const MAX_EXPIRES_F64: f64 = MAX_EXPIRES_IN_MINUTES as f64;

/// A validated portal session request (`{}` gives every default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRequest {
    /// The session's role (default [`Role::Editor`]).
    pub role: Role,
    /// Lifetime in minutes, `1..=60` (default 60).
    pub expires_in_minutes: u64,
    /// Flat string-to-string metadata attached to the session.
    pub metadata: Metadata,
}

impl Default for SessionRequest {
    fn default() -> Self {
        Self {
            role: Role::Editor,
            expires_in_minutes: MAX_EXPIRES_IN_MINUTES,
            metadata: BTreeMap::new(),
        }
    }
}

/// Why a portal session request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The body is not a JSON object.
    #[error("request body must be a JSON object")]
    NotAnObject,
    /// The body is not valid JSON (or holds a number too large for JSON
    /// parsers to represent).
    #[error("request body must be valid JSON")]
    InvalidJson,
    /// An object in the request names a key twice (the body's own fields
    /// or the metadata's): which one counts would depend on the reader.
    #[error("{field} appears more than once")]
    DuplicateField {
        /// The repeated key's path: `role`, or `metadata.role` for a key
        /// repeated inside `metadata` (see [`JsonError::Duplicate`]).
        ///
        /// [`JsonError::Duplicate`]: crate::json::JsonError::Duplicate
        field: String,
    },
    /// A field the request does not define.
    #[error("{field} is not a known field")]
    UnknownField {
        /// The unknown field's name.
        field: String,
    },
    /// `role` is not a string.
    #[error("role must be a string")]
    RoleType,
    /// `role` is not one of the known roles.
    #[error("role must be one of admin, editor, viewer")]
    UnknownRole,
    /// `expiresInMinutes` is not an integer.
    #[error("expiresInMinutes must be an integer")]
    ExpiresType,
    /// `expiresInMinutes` is outside `1..=60`.
    #[error("expiresInMinutes must be between 1 and 60")]
    ExpiresRange,
    /// `metadata` is not an object.
    #[error("metadata must be an object")]
    MetadataType,
    /// `metadata` has more than [`MAX_METADATA_KEYS`] keys.
    #[error("metadata must have at most 10 keys")]
    MetadataTooManyKeys,
    /// A metadata key is empty or longer than [`MAX_METADATA_KEY_LEN`].
    #[error("metadata keys must be 1 to 64 bytes long")]
    MetadataKeyLength,
    /// A metadata key starts with a prefix keygate keeps for itself:
    /// `portal.` (`portal.role` on the access token) or `keygate.`
    /// (`keygate.rolled_from`, which a session's token could otherwise
    /// carry to block another key's roll); or with `serde_json`'s private
    /// token prefix, which `serde_json::Value` reads as something else
    /// (see [`RESERVED_METADATA`](crate::manager::RESERVED_METADATA)).
    #[error(
        "metadata keys starting with `portal.`, `keygate.` or `$serde_json::private::` are reserved"
    )]
    MetadataReservedKey,
    /// A metadata value is not a string (nested objects included).
    #[error("metadata values must be strings")]
    MetadataValueType,
    /// A metadata value is longer than [`MAX_METADATA_VALUE_LEN`].
    #[error("metadata values must be at most 512 bytes long")]
    MetadataValueLength,
}

impl RequestError {
    /// The request field the error is about.
    #[must_use]
    pub fn field(&self) -> Cow<'static, str> {
        match self {
            Self::NotAnObject | Self::InvalidJson => "body".into(),
            Self::UnknownField { field } => field.clone().into(),
            // The request's own field when the path is under one; else
            // the path whole (a top-level key may itself hold a `.`).
            Self::DuplicateField { field } => FIELDS
                .iter()
                .find(|f| {
                    field.strip_prefix(**f).is_some_and(|rest| {
                        rest.is_empty() || rest.starts_with('.') || rest.starts_with('[')
                    })
                })
                .map_or_else(|| field.clone().into(), |f| (*f).into()),
            Self::RoleType | Self::UnknownRole => "role".into(),
            Self::ExpiresType | Self::ExpiresRange => "expiresInMinutes".into(),
            Self::MetadataType
            | Self::MetadataTooManyKeys
            | Self::MetadataKeyLength
            | Self::MetadataReservedKey
            | Self::MetadataValueType
            | Self::MetadataValueLength => "metadata".into(),
        }
    }

    /// The 400 rejection for this error.
    #[must_use]
    pub fn rejection(&self) -> Rejection {
        Rejection::BadRequest { field: self.field(), message: self.to_string() }
    }
}

impl SessionRequest {
    /// Parses and validates a request body.
    ///
    /// No tree of the body is built (one of nested empty arrays would take
    /// about 120 times its size): the text is checked in one pass that
    /// holds only the keys of the objects being read, then only the values
    /// of the known fields are parsed, from their text. Memory stays in
    /// proportion to the body; cap it, as any JSON endpoint should.
    ///
    /// # Errors
    ///
    /// [`RequestError`] naming the first violated rule; unknown fields are
    /// refused. Every option is optional: an empty body, `null`, and a
    /// field set to `null` (as SDKs send unset options) take the defaults.
    pub fn from_json(bytes: &[u8]) -> Result<Self, RequestError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        crate::json::check(bytes).map_err(|e| match e {
            // A repeat inside an array at the top: not an object at all.
            crate::json::JsonError::Duplicate(_) if bytes.trim_ascii_start().starts_with(b"[") => {
                RequestError::NotAnObject
            }
            crate::json::JsonError::Duplicate(field) => RequestError::DuplicateField { field },
            crate::json::JsonError::Syntax(_) => RequestError::InvalidJson,
        })?;
        // Valid and without repeats: the fields are read as the text of
        // their values, and only those of known fields are parsed (no tree
        // of an unknown field, or of a value of the wrong type, is built).
        let fields = match serde_json::from_slice::<Option<Fields<'_>>>(bytes) {
            Ok(Some(fields)) => fields.0,
            Ok(None) => return Ok(Self::default()),
            Err(_) => return Err(RequestError::NotAnObject),
        };
        let mut req = Self::default();
        for (k, raw) in fields {
            let text = raw.get();
            match k.as_str() {
                // Unset, as SDKs send it: the default.
                "role" | "expiresInMinutes" | "metadata" if text == "null" => {}
                "role" => {
                    let s = json_string(text).ok_or(RequestError::RoleType)?;
                    req.role = s.parse().map_err(|_| RequestError::UnknownRole)?;
                }
                "expiresInMinutes" => {
                    let n = match text.as_bytes().first() {
                        Some(b'-' | b'0'..=b'9') => {
                            serde_json::from_str::<serde_json::Number>(text)
                                .map_err(|_| RequestError::ExpiresType)?
                        }
                        _ => return Err(RequestError::ExpiresType),
                    };
                    let m = match (n.as_u64(), n.as_f64()) {
                        (Some(m), _) => m,
                        // `30.0` and `3e1` are integers in JSON's data
                        // model (and what some serializers write). Judged
                        // by the digits as written: the nearest double of
                        // `59.999999999999999` is 60.0.
                        (None, Some(f)) if whole_literal(text) => {
                            if !(0.0..=MAX_EXPIRES_F64).contains(&f) {
                                // Negative, or too large for a u64.
                                return Err(RequestError::ExpiresRange);
                            }
                            // Whole and within range: exact.
                            #[allow(clippy::cast_sign_loss, clippy::cast_possible_truncation)]
                            let m = f as u64;
                            m
                        }
                        _ => return Err(RequestError::ExpiresType),
                    };
                    check_expires(m)?;
                    req.expires_in_minutes = m;
                }
                "metadata" => {
                    let md = match text.as_bytes().first() {
                        Some(b'{') => serde_json::from_str::<Fields<'_>>(text)
                            .map_err(|_| RequestError::MetadataType)?,
                        _ => return Err(RequestError::MetadataType),
                    };
                    check_metadata_count(md.0.len())?;
                    for (mk, mv) in md.0 {
                        check_metadata_key(&mk)?;
                        let s = json_string(mv.get()).ok_or(RequestError::MetadataValueType)?;
                        check_metadata_value(&s)?;
                        req.metadata.insert(mk.into(), s.into());
                    }
                }
                _ => return Err(RequestError::UnknownField { field: k }),
            }
        }
        Ok(req)
    }

    /// Checks the rules [`from_json`](Self::from_json) enforces on a request
    /// built in code (the fields are public): lifetime `1..=60` minutes and
    /// the metadata caps. [`Portal::create_session`](super::Portal::create_session)
    /// calls it, so a request that skipped the parser is held to the same
    /// rules.
    ///
    /// # Errors
    ///
    /// The [`RequestError`] of the first rule broken.
    pub fn validate(&self) -> Result<(), RequestError> {
        check_expires(self.expires_in_minutes)?;
        check_metadata_count(self.metadata.len())?;
        for (k, v) in &self.metadata {
            check_metadata_key(k)?;
            check_metadata_value(v)?;
        }
        Ok(())
    }
}

/// The request's own fields.
const FIELDS: [&str; 3] = ["role", "expiresInMinutes", "metadata"];

/// Whether the body's `expiresInMinutes` (a number `serde_json` read as a
/// double) is written as a whole number: no nonzero digit after the decimal
/// point once the exponent has moved it (`30.0`, `3e1`, `300e-1` are;
/// `1e-400` and `30.000000000000001` are not).
fn whole_literal(lit: &str) -> bool {
    let lit = lit.strip_prefix('-').unwrap_or(lit);
    let (mantissa, exp) = match lit.split_once(['e', 'E']) {
        // serde_json read the number, so the exponent is digits with an
        // optional sign; one too long for an i64 saturates.
        Some((m, e)) => {
            (m, e.parse::<i64>().unwrap_or(if e.starts_with('-') { i64::MIN } else { i64::MAX }))
        }
        None => (lit, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    // Digits from this index on fall after the decimal point.
    let len = int.len() + frac.len();
    let point = i64::try_from(int.len()).unwrap_or(i64::MAX).saturating_add(exp);
    let point = usize::try_from(point.max(0)).unwrap_or(usize::MAX).min(len);
    int.bytes().chain(frac.bytes()).skip(point).all(|d| d == b'0')
}

/// An object's members in document order, each value as its JSON text.
struct Fields<'a>(Vec<(String, &'a serde_json::value::RawValue)>);

impl<'de> serde::Deserialize<'de> for Fields<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = Fields<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Fields<'de>, A::Error> {
                let mut members = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    members.push((key, map.next_value()?));
                }
                Ok(Fields(members))
            }
        }
        d.deserialize_map(Members)
    }
}

/// The string `text` (a JSON value's text) holds, if it is a string.
fn json_string(text: &str) -> Option<String> {
    text.starts_with('"').then(|| serde_json::from_str(text).ok()).flatten()
}

fn check_expires(minutes: u64) -> Result<(), RequestError> {
    if (MIN_EXPIRES_IN_MINUTES..=MAX_EXPIRES_IN_MINUTES).contains(&minutes) {
        Ok(())
    } else {
        Err(RequestError::ExpiresRange)
    }
}

fn check_metadata_count(n: usize) -> Result<(), RequestError> {
    if n > MAX_METADATA_KEYS { Err(RequestError::MetadataTooManyKeys) } else { Ok(()) }
}

fn check_metadata_key(k: &str) -> Result<(), RequestError> {
    if k.is_empty() || k.len() > MAX_METADATA_KEY_LEN {
        Err(RequestError::MetadataKeyLength)
    } else if crate::manager::is_reserved_metadata(k) {
        Err(RequestError::MetadataReservedKey)
    } else {
        Ok(())
    }
}

fn check_metadata_value(v: &str) -> Result<(), RequestError> {
    if v.len() > MAX_METADATA_VALUE_LEN { Err(RequestError::MetadataValueLength) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SmolStr;

    #[test]
    fn empty_object_gives_defaults() {
        assert_eq!(SessionRequest::from_json(b"{}"), Ok(SessionRequest::default()));
    }

    #[test]
    fn unset_options_take_the_defaults_however_they_are_sent() {
        // No body, a JSON null, and options set to null (as SDKs that send
        // unset fields do) are all "no options".
        for body in ["", "  \n", "null", r#"{"role":null,"expiresInMinutes":null,"metadata":null}"#]
        {
            assert_eq!(
                SessionRequest::from_json(body.as_bytes()),
                Ok(SessionRequest::default()),
                "{body:?}"
            );
        }
        // A whole number written with a fraction or an exponent is that
        // number.
        for body in ["30.0", "3e1", "3.0E+1", "300e-1", "0.3e2", "30.000e0", "3000000e-5"] {
            let json = format!(r#"{{"expiresInMinutes":{body}}}"#);
            let r = SessionRequest::from_json(json.as_bytes()).unwrap();
            assert_eq!(r.expires_in_minutes, 30, "{body}");
        }
    }

    #[test]
    fn a_repeat_names_the_requests_own_field_or_the_key_whole() {
        for (body, field) in [
            (r#"{"metadata":{"a":"1","a":"2"}}"#, "metadata"),
            (r#"{"role":"viewer","role":"admin"}"#, "role"),
            (r#"{"a.b":1,"a.b":2}"#, "a.b"),
        ] {
            let e = SessionRequest::from_json(body.as_bytes()).unwrap_err();
            assert!(matches!(e, RequestError::DuplicateField { .. }), "{body}: {e}");
            assert_eq!(e.field(), field, "{body}");
        }
    }

    #[test]
    fn full_request_parses() {
        let r = SessionRequest::from_json(
            br#"{"role":"viewer","expiresInMinutes":30,"metadata":{"customerId":"c_1"}}"#,
        )
        .unwrap();
        assert_eq!(r.role, Role::Viewer);
        assert_eq!(r.expires_in_minutes, 30);
        assert_eq!(r.metadata.get("customerId").map(SmolStr::as_str), Some("c_1"));
    }

    #[test]
    fn every_limit_is_inclusive() {
        // The last value each rule admits, and the first it refuses.
        let keys =
            |n: usize| (0..n).map(|i| format!("\"k{i}\":\"v\"")).collect::<Vec<_>>().join(",");
        let admitted = [
            r#"{"expiresInMinutes":1}"#.to_owned(),
            r#"{"expiresInMinutes":60}"#.to_owned(),
            r#"{"expiresInMinutes":1.0}"#.to_owned(),
            r#"{"expiresInMinutes":60.0}"#.to_owned(),
            format!(r#"{{"metadata":{{{}}}}}"#, keys(MAX_METADATA_KEYS)),
            format!(r#"{{"metadata":{{"{}":"v"}}}}"#, "k".repeat(MAX_METADATA_KEY_LEN)),
            format!(r#"{{"metadata":{{"a":"{}"}}}}"#, "v".repeat(MAX_METADATA_VALUE_LEN)),
        ];
        for body in &admitted {
            let r = SessionRequest::from_json(body.as_bytes());
            assert!(r.as_ref().is_ok_and(|r| r.validate().is_ok()), "{body}: {r:?}");
        }
        assert_eq!(
            SessionRequest::from_json(br#"{"expiresInMinutes":1}"#).map(|r| r.expires_in_minutes),
            Ok(MIN_EXPIRES_IN_MINUTES)
        );
        let refused = [
            (r#"{"expiresInMinutes":0}"#.to_owned(), RequestError::ExpiresRange),
            (r#"{"expiresInMinutes":61}"#.to_owned(), RequestError::ExpiresRange),
            (r#"{"expiresInMinutes":0.0}"#.to_owned(), RequestError::ExpiresRange),
            (r#"{"expiresInMinutes":61.0}"#.to_owned(), RequestError::ExpiresRange),
            (
                format!(r#"{{"metadata":{{{}}}}}"#, keys(MAX_METADATA_KEYS + 1)),
                RequestError::MetadataTooManyKeys,
            ),
            (
                format!(r#"{{"metadata":{{"{}":"v"}}}}"#, "k".repeat(MAX_METADATA_KEY_LEN + 1)),
                RequestError::MetadataKeyLength,
            ),
            (
                format!(r#"{{"metadata":{{"a":"{}"}}}}"#, "v".repeat(MAX_METADATA_VALUE_LEN + 1)),
                RequestError::MetadataValueLength,
            ),
        ];
        for (body, want) in refused {
            assert_eq!(SessionRequest::from_json(body.as_bytes()), Err(want), "{body}");
        }
        // A request built in code meets the same edges.
        let built = |minutes, n: usize, key: usize, value: usize| SessionRequest {
            expires_in_minutes: minutes,
            metadata: (0..n)
                .map(|i| (format!("{i:0>key$}").into(), "v".repeat(value).into()))
                .collect(),
            ..Default::default()
        };
        assert_eq!(
            built(1, MAX_METADATA_KEYS, MAX_METADATA_KEY_LEN, MAX_METADATA_VALUE_LEN).validate(),
            Ok(())
        );
        assert_eq!(built(60, 1, 1, 0).validate(), Ok(()));
        assert_eq!(built(61, 1, 1, 0).validate(), Err(RequestError::ExpiresRange));
        assert_eq!(
            built(60, 1, MAX_METADATA_KEY_LEN + 1, 0).validate(),
            Err(RequestError::MetadataKeyLength)
        );
    }

    #[test]
    fn every_rule_has_its_error() {
        let eleven: String =
            (0..11).map(|i| format!("\"k{i}\":\"v\"")).collect::<Vec<_>>().join(",");
        let cases: Vec<(String, RequestError)> = vec![
            ("[]".into(), RequestError::NotAnObject),
            ("not json".into(), RequestError::InvalidJson),
            (
                r#"{"role":"viewer","role":"admin"}"#.into(),
                RequestError::DuplicateField { field: "role".into() },
            ),
            (
                r#"{"metadata":{"a":"1","a":"2"}}"#.into(),
                RequestError::DuplicateField { field: "metadata.a".into() },
            ),
            (
                r#"{"role":"viewer","metadata":{"role":"a","role":"b"}}"#.into(),
                RequestError::DuplicateField { field: "metadata.role".into() },
            ),
            (r#"[{"a":1,"a":2}]"#.into(), RequestError::NotAnObject),
            (r#" [{"a":1,"a":2}]"#.into(), RequestError::NotAnObject),
            (r#"{"[x":1,"[x":2}"#.into(), RequestError::DuplicateField { field: "[x".into() }),
            ("\"x\"".into(), RequestError::NotAnObject),
            (r#"{"expiresInMinutes":1e400}"#.into(), RequestError::InvalidJson),
            (r#"{"expiresInMinutes":18446744073709551616}"#.into(), RequestError::ExpiresRange),
            (r#"{"expiresInMinutes":61.0}"#.into(), RequestError::ExpiresRange),
            (r#"{"expiresInMinutes":-2.0}"#.into(), RequestError::ExpiresRange),
            (r#"{"x":1}"#.into(), RequestError::UnknownField { field: "x".into() }),
            (r#"{"role":1}"#.into(), RequestError::RoleType),
            (r#"{"role":"owner"}"#.into(), RequestError::UnknownRole),
            (r#"{"expiresInMinutes":"5"}"#.into(), RequestError::ExpiresType),
            (r#"{"expiresInMinutes":1.5}"#.into(), RequestError::ExpiresType),
            // Fractions whose nearest double is whole, or zero.
            (r#"{"expiresInMinutes":0.99999999999999999}"#.into(), RequestError::ExpiresType),
            (r#"{"expiresInMinutes":30.000000000000001}"#.into(), RequestError::ExpiresType),
            (r#"{"expiresInMinutes":59.999999999999999}"#.into(), RequestError::ExpiresType),
            (r#"{"expiresInMinutes":1e-400}"#.into(), RequestError::ExpiresType),
            (r#"{"expiresInMinutes":-1e-400}"#.into(), RequestError::ExpiresType),
            (r#"{"expiresInMinutes":0}"#.into(), RequestError::ExpiresRange),
            (r#"{"expiresInMinutes":61}"#.into(), RequestError::ExpiresRange),
            (r#"{"expiresInMinutes":-1}"#.into(), RequestError::ExpiresRange),
            (r#"{"metadata":"x"}"#.into(), RequestError::MetadataType),
            (format!(r#"{{"metadata":{{{eleven}}}}}"#), RequestError::MetadataTooManyKeys),
            (r#"{"metadata":{"":"v"}}"#.into(), RequestError::MetadataKeyLength),
            (r#"{"metadata":{"a":{"b":"c"}}}"#.into(), RequestError::MetadataValueType),
            (r#"{"metadata":{"portal.role":"admin"}}"#.into(), RequestError::MetadataReservedKey),
            (
                r#"{"metadata":{"keygate.rolled_from":"key_x"}}"#.into(),
                RequestError::MetadataReservedKey,
            ),
            // serde_json's `Value` (with its `raw_value` feature, which
            // keygate turns on for every crate of the build) reads an object
            // whose first key is this as other JSON: a host reading metadata
            // back through `Value` would get something else.
            (
                r#"{"metadata":{"$serde_json::private::RawValue":"{}"}}"#.into(),
                RequestError::MetadataReservedKey,
            ),
            (
                format!(r#"{{"metadata":{{"a":"{}"}}}}"#, "v".repeat(513)),
                RequestError::MetadataValueLength,
            ),
        ];
        for (body, want) in cases {
            assert_eq!(SessionRequest::from_json(body.as_bytes()), Err(want), "{body}");
        }
        // A key repeated inside `metadata` is that field's error, not the
        // top-level field of the same name's.
        let e = SessionRequest::from_json(br#"{"metadata":{"role":"a","role":"b"}}"#).unwrap_err();
        assert_eq!(
            (e.field(), e.to_string()),
            ("metadata".into(), "metadata.role appears more than once".into())
        );
        let e = SessionRequest::from_json(br#"{"role":"a","role":"b"}"#).unwrap_err();
        assert_eq!(e.field(), "role");
        // The same rules hold for a request built in code.
        for (req, want) in [
            (
                SessionRequest { expires_in_minutes: 0, ..Default::default() },
                RequestError::ExpiresRange,
            ),
            (
                SessionRequest { expires_in_minutes: 1 << 62, ..Default::default() },
                RequestError::ExpiresRange,
            ),
            (
                SessionRequest {
                    metadata: (0..11).map(|i| (format!("k{i}").into(), "v".into())).collect(),
                    ..Default::default()
                },
                RequestError::MetadataTooManyKeys,
            ),
            (
                SessionRequest { metadata: [("".into(), "v".into())].into(), ..Default::default() },
                RequestError::MetadataKeyLength,
            ),
            (
                SessionRequest {
                    metadata: [("a".into(), "v".repeat(513).into())].into(),
                    ..Default::default()
                },
                RequestError::MetadataValueLength,
            ),
        ] {
            assert_eq!(req.validate(), Err(want), "{req:?}");
        }
        assert_eq!(SessionRequest::default().validate(), Ok(()));
        let r = RequestError::ExpiresRange.rejection();
        assert!(matches!(r, Rejection::BadRequest { ref field, ref message }
            if field == "expiresInMinutes" && message == "expiresInMinutes must be between 1 and 60"));
    }

    use proptest::strategy::Strategy as _;

    proptest::proptest! {
        /// A valid request written as JSON (as a client's serializer
        /// writes it: escapes, any Unicode, keys and values at their
        /// longest, every role and lifetime) reads back equal.
        #[test]
        fn a_valid_request_written_as_json_reads_back_equal(
            role in 0..3_usize,
            minutes in MIN_EXPIRES_IN_MINUTES..=MAX_EXPIRES_IN_MINUTES,
            metadata in proptest::collection::btree_map(
                proptest::prop_oneof![
                    "\\PC{1,16}",
                    proptest::strategy::Just("k".repeat(MAX_METADATA_KEY_LEN)),
                ]
                .prop_filter("reserved", |k| !crate::manager::is_reserved_metadata(k)),
                proptest::prop_oneof![
                    ".{0,128}",
                    proptest::strategy::Just("\"\\\u{0}".repeat(MAX_METADATA_VALUE_LEN / 3)),
                ],
                0..=MAX_METADATA_KEYS,
            ),
        ) {
            let role = [Role::Admin, Role::Editor, Role::Viewer][role];
            let metadata = metadata.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
            let req = SessionRequest { role, expires_in_minutes: minutes, metadata };
            let body = serde_json::json!({
                "role": role.as_str(),
                "expiresInMinutes": minutes,
                "metadata": req.metadata,
            });
            let text = serde_json::to_vec(&body).unwrap();
            proptest::prop_assert_eq!(SessionRequest::from_json(&text), Ok(req));
        }
    }
}
