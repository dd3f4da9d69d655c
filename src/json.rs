//! JSON input that refuses duplicate object keys.
//!
//! `serde_json` keeps the last of two equal keys, so `{"role": "viewer",
//! "role": "admin"}` would be read as `admin` while a proxy that reads the
//! first saw `viewer`, and a plan file naming one plan twice would lose the
//! first silently. Requests and configuration are parsed here instead: a
//! repeated key is an error naming it.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// Why a JSON text was refused.
#[derive(Debug)]
pub(crate) enum JsonError {
    /// Not JSON (or nested too deeply, or a number out of range).
    Syntax(serde_json::Error),
    /// An object repeats this key.
    Duplicate(String),
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Syntax(e) => write!(f, "invalid JSON: {e}"),
            Self::Duplicate(k) => write!(f, "duplicate key `{k}`"),
        }
    }
}

/// Marks the custom error the visitor raises, so it can be told from the
/// parser's own errors.
const DUPLICATE: &str = "keygate: duplicate key ";

/// Parses `bytes` as JSON, refusing objects that repeat a key (at any depth).
///
/// Two passes: `serde_json` builds the value as it always does (whatever its
/// features, `arbitrary_precision` included), then a visitor that keeps
/// nothing but each object's keys looks for repeats.
pub(crate) fn parse(bytes: &[u8]) -> Result<Value, JsonError> {
    let value: Value = serde_json::from_slice(bytes).map_err(JsonError::Syntax)?;
    match serde_json::from_slice::<Distinct>(bytes) {
        Ok(Distinct) => Ok(value),
        Err(e) => {
            let text = e.to_string();
            let key = text.strip_prefix(DUPLICATE).unwrap_or(&text);
            // The message ends with serde_json's " at line … column …".
            Err(JsonError::Duplicate(
                key.rsplit_once(" at line ").map_or(key, |(k, _)| k).to_owned(),
            ))
        }
    }
}

/// A JSON value whose objects have distinct keys (nothing is kept).
struct Distinct;

impl<'de> Deserialize<'de> for Distinct {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DistinctVisitor)
    }
}

struct DistinctVisitor;

impl<'de> Visitor<'de> for DistinctVisitor {
    type Value = Distinct;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Distinct, E> {
        Ok(Distinct)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Distinct, E> {
        Ok(Distinct)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Distinct, E> {
        Ok(Distinct)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Distinct, E> {
        Ok(Distinct)
    }

    fn visit_str<E>(self, _: &str) -> Result<Distinct, E> {
        Ok(Distinct)
    }

    fn visit_unit<E>(self) -> Result<Distinct, E> {
        Ok(Distinct)
    }

    fn visit_none<E>(self) -> Result<Distinct, E> {
        Ok(Distinct)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Distinct, A::Error> {
        while seq.next_element::<Distinct>()?.is_some() {}
        Ok(Distinct)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Distinct, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if seen.contains(&key) {
                return Err(de::Error::custom(format_args!("{DUPLICATE}{key}")));
            }
            map.next_value::<Distinct>()?;
            seen.insert(key);
        }
        Ok(Distinct)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_keys_are_refused_at_any_depth() {
        assert!(matches!(parse(br#"{"a":1,"a":2}"#), Err(JsonError::Duplicate(k)) if k == "a"));
        assert!(
            matches!(parse(br#"{"x":[{"b":1,"b":1}]}"#), Err(JsonError::Duplicate(k)) if k == "b")
        );
        // A key with spaces and the marker's words in it is still named.
        let e = parse(br#"{"k at line 3":1,"k at line 3":2}"#).unwrap_err();
        assert!(matches!(e, JsonError::Duplicate(ref k) if k == "k at line 3"), "{e}");
    }

    #[test]
    fn everything_else_is_serde_json() {
        let v = parse(br#"{"b":[1,-2,3.5,"s",null,true],"a":{}}"#).unwrap();
        let plain: Value =
            serde_json::from_str(r#"{"b":[1,-2,3.5,"s",null,true],"a":{}}"#).unwrap();
        assert_eq!(v, plain);
        assert_eq!(serde_json::to_string(&v).unwrap(), r#"{"b":[1,-2,3.5,"s",null,true],"a":{}}"#);
        assert!(matches!(parse(b"{"), Err(JsonError::Syntax(_))));
        assert!(matches!(parse(b"1e400"), Err(JsonError::Syntax(_))));
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(matches!(parse(deep.as_bytes()), Err(JsonError::Syntax(_))), "depth limit");
    }
}
