//! JSON input that refuses duplicate object keys.
//!
//! `serde_json` keeps the last of two equal keys, so `{"role": "viewer",
//! "role": "admin"}` would be read as `admin` while a proxy that reads the
//! first saw `viewer`, and a plan file naming one plan twice would lose the
//! first silently. keygate reads requests and configuration with [`parse`]
//! instead: a repeated key is an error naming where it is. Hosts reading
//! the bodies of their own routes beside keygate's can hold them to the
//! same rule.
//!
//! ```
//! use keygate::json::{parse, JsonError};
//!
//! assert!(parse(br#"{"scopes": ["*"]}"#).is_ok());
//! let e = parse(br#"{"scopes": ["*"], "scopes": []}"#).unwrap_err();
//! assert!(matches!(e, JsonError::Duplicate(ref k) if k == "scopes"));
//! // A repeat inside a value is named by its path from the top.
//! let e = parse(br#"{"metadata": {"a": "1", "a": "2"}}"#).unwrap_err();
//! assert!(matches!(e, JsonError::Duplicate(ref k) if k == "metadata.a"));
//! ```

use std::fmt;

use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// Why a JSON text was refused.
#[derive(Debug)]
#[non_exhaustive]
pub enum JsonError {
    /// Not JSON (or nested too deeply, or a number out of range).
    Syntax(serde_json::Error),
    /// An object repeats a key. The key's path from the top of the
    /// document: its bare name at the top level (`scopes`), else its
    /// parents' keys and array indices before it (`metadata.role`,
    /// `[0].id`, `plans.tiny.rate[1].name`).
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

impl std::error::Error for JsonError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Syntax(e) => Some(e),
            Self::Duplicate(_) => None,
        }
    }
}

/// Marks the custom error the visitor raises, so it can be told from the
/// parser's own errors.
const DUPLICATE: &str = "keygate: duplicate key ";

/// Parses `bytes` as JSON, refusing objects that repeat a key (at any depth).
///
/// # Errors
///
/// [`JsonError::Syntax`] for text that is not JSON (or nests deeper than
/// `serde_json`'s 128 levels), [`JsonError::Duplicate`] for a repeated key.
///
/// Two passes: a visitor that keeps nothing but each object's keys looks
/// for repeats, then one builds the value taking every key as written (with
/// the `raw_value` feature of `serde_json`, which keygate turns on, its own
/// `Value` reads an object keyed `$serde_json::private::RawValue` as the
/// JSON text of its value: another value, whose repeats nobody checked).
pub fn parse(bytes: &[u8]) -> Result<Value, JsonError> {
    check(bytes)?;
    serde_json::from_slice(bytes).map(|UniqueValue(v)| v).map_err(JsonError::Syntax)
}

/// [`parse`]'s verdict without the value: `Ok` for one JSON text whose
/// objects repeat no key, else the error `parse` gives (a syntax error
/// anywhere wins over a repeat). Holds the keys of the objects being read,
/// never a tree: a body of nested empty arrays makes a `Value` about 120
/// times its size. For callers that then read only parts of the text
/// (`RawValue`s).
pub(crate) fn check(bytes: &[u8]) -> Result<(), JsonError> {
    let walk = |distinct: bool| {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        Distinct(At::Top, distinct).deserialize(&mut de)?;
        de.end()
    };
    match walk(true) {
        Ok(()) => Ok(()),
        Err(e) if e.to_string().starts_with(DUPLICATE) => match walk(false) {
            Err(syntax) => Err(JsonError::Syntax(syntax)),
            Ok(()) => Err(duplicate(&e)),
        },
        Err(syntax) => Err(JsonError::Syntax(syntax)),
    }
}

/// The [`JsonError::Duplicate`] of the visitor's error `e`.
fn duplicate(e: &serde_json::Error) -> JsonError {
    let text = e.to_string();
    let key = text.strip_prefix(DUPLICATE).unwrap_or(&text);
    // The message ends with serde_json's " at line … column …".
    JsonError::Duplicate(key.rsplit_once(" at line ").map_or(key, |(k, _)| k).to_owned())
}

/// Where a value sits in the document: built on the stack as the visitor
/// descends, written out only for the error.
#[derive(Clone, Copy)]
enum At<'a> {
    Top,
    Key(&'a At<'a>, &'a str),
    Index(&'a At<'a>, usize),
}

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Top => Ok(()),
            Self::Key(Self::Top, key) => f.write_str(key),
            Self::Key(up, key) => write!(f, "{up}.{key}"),
            Self::Index(up, i) => write!(f, "{up}[{i}]"),
        }
    }
}

/// A JSON value at `.0` whose objects have distinct keys, if `.1` (else
/// any JSON value); nothing is kept.
struct Distinct<'a>(At<'a>, bool);

impl<'de> DeserializeSeed<'de> for Distinct<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Distinct<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        while seq.next_element_seed(Distinct(At::Index(&self.0, i), self.1))?.is_some() {
            i += 1;
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let at = At::Key(&self.0, &key);
            if self.1 && seen.contains(&key) {
                return Err(de::Error::custom(format_args!("{DUPLICATE}{at}")));
            }
            map.next_value_seed(Distinct(at, self.1))?;
            if self.1 {
                seen.insert(key);
            }
        }
        Ok(())
    }
}

/// A JSON value read from any serde deserializer, refusing objects that
/// repeat a key: for `Deserialize` impls of configuration (a `PlanSet` read
/// by `serde_json::from_str`, or from another format), where [`parse`]'s
/// two passes over the text are not available, and for `parse`'s value.
pub(crate) struct UniqueValue(pub(crate) Value);

/// The key `serde_json` (with its `arbitrary_precision` feature, which
/// another crate of the build may turn on) presents a number under.
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

impl<'de> Deserialize<'de> for UniqueValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueVisitor)
    }
}

struct UniqueVisitor;

impl<'de> Visitor<'de> for UniqueVisitor {
    type Value = UniqueValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, b: bool) -> Result<UniqueValue, E> {
        Ok(UniqueValue(Value::Bool(b)))
    }

    fn visit_i64<E>(self, n: i64) -> Result<UniqueValue, E> {
        Ok(UniqueValue(Value::from(n)))
    }

    fn visit_u64<E>(self, n: u64) -> Result<UniqueValue, E> {
        Ok(UniqueValue(Value::from(n)))
    }

    fn visit_f64<E>(self, n: f64) -> Result<UniqueValue, E> {
        // As `serde_json::Value` reads it: no JSON number is not finite.
        Ok(UniqueValue(serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)))
    }

    fn visit_str<E>(self, s: &str) -> Result<UniqueValue, E> {
        Ok(UniqueValue(Value::String(s.to_owned())))
    }

    fn visit_string<E>(self, s: String) -> Result<UniqueValue, E> {
        Ok(UniqueValue(Value::String(s)))
    }

    fn visit_unit<E>(self) -> Result<UniqueValue, E> {
        Ok(UniqueValue(Value::Null))
    }

    fn visit_none<E>(self) -> Result<UniqueValue, E> {
        Ok(UniqueValue(Value::Null))
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<UniqueValue, D::Error> {
        UniqueValue::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<UniqueValue, A::Error> {
        let mut items = Vec::new();
        while let Some(UniqueValue(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(UniqueValue(Value::Array(items)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UniqueValue, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.is_empty() && key == NUMBER_TOKEN {
                // A number, and nothing else: read as any JSON, the token's
                // string could smuggle in an object with repeated keys.
                let digits: String = map.next_value()?;
                let n: serde_json::Number =
                    serde_json::from_str(&digits).map_err(de::Error::custom)?;
                return Ok(UniqueValue(Value::Number(n)));
            }
            if object.contains_key(&key) {
                return Err(de::Error::custom(format_args!("duplicate key `{key}`")));
            }
            let UniqueValue(v) = map.next_value()?;
            object.insert(key, v);
        }
        Ok(UniqueValue(Value::Object(object)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `check`'s verdicts, and `parse` (which runs `check`, then builds the
    /// tree refusing repeats again) agreeing with each: a syntax error
    /// anywhere wins over a repeat before it; a repeat names its path.
    #[test]
    fn check_gives_each_verdict_and_parse_agrees() {
        let kind = |r: Result<(), JsonError>| match r {
            Ok(()) => "ok".to_owned(),
            Err(JsonError::Syntax(_)) => "syntax".to_owned(),
            Err(JsonError::Duplicate(k)) => format!("duplicate {k}"),
        };
        for (text, want) in [
            (r#"{"a": [1, {"b": 2}], "c": null}"#, "ok"),
            (r#"{"a": 1, "a": 2}"#, "duplicate a"),
            (r#"{"a": {"b": 1, "b": 2}}"#, "duplicate a.b"),
            (r#"[{"x": 1}, {"x": 1, "x": 2}]"#, "duplicate [1].x"),
            (r#"{"a": 1, "a": 2, "b": 1e400}"#, "syntax"),
            (r#"{"a": 1, "a": 2, "b": }"#, "syntax"),
            (r#"{"a": 1} trailing"#, "syntax"),
            (r#"{"a": "\ud800"}"#, "syntax"),
            ("[[[[[[[[]]]]]]]]", "ok"),
            ("", "syntax"),
            ("null", "ok"),
        ] {
            assert_eq!(kind(check(text.as_bytes())), want, "{text}");
            assert_eq!(kind(parse(text.as_bytes()).map(drop)), want, "{text}");
        }
    }

    /// The number token's value is a number or an error, never JSON of
    /// its own (an object whose repeated keys nobody checked).
    #[cfg(feature = "serde")]
    #[test]
    fn the_number_token_carries_only_numbers() {
        let smuggled = r#"{"$serde_json::private::Number": "{\"a\": 1, \"a\": 2}"}"#;
        assert!(serde_json::from_str::<UniqueValue>(smuggled).is_err());
        let plans = r#"{"plans": {"pro": {"rate": [{"limit": 1, "window_seconds": 1}]}, "pro": {"rate": [{"limit": 9, "window_seconds": 1}]}}}"#;
        let wrapped = serde_json::json!({ NUMBER_TOKEN: plans }).to_string();
        assert!(serde_json::from_str::<crate::limit::PlanSet>(&wrapped).is_err());
        let number = serde_json::json!({ NUMBER_TOKEN: "12.5" }).to_string();
        let UniqueValue(v) = serde_json::from_str(&number).unwrap();
        assert_eq!(v, serde_json::json!(12.5));
    }

    #[test]
    fn repeated_keys_are_refused_at_any_depth() {
        assert!(matches!(parse(br#"{"a":1,"a":2}"#), Err(JsonError::Duplicate(k)) if k == "a"));
        // Deeper repeats are named by their path.
        for (text, path) in [
            (r#"{"x":[{"b":1,"b":1}]}"#, "x[0].b"),
            (r#"[1,{"a":1},{"a":{"c":[[],{"d":0,"d":0}]}}]"#, "[2].a.c[1].d"),
            (r#"{"m":{"role":"a","role":"b"},"role":"c"}"#, "m.role"),
        ] {
            let e = parse(text.as_bytes()).unwrap_err();
            assert!(matches!(e, JsonError::Duplicate(ref k) if k == path), "{text}: {e}");
        }
        // A key with spaces and the marker's words in it is still named.
        let e = parse(br#"{"k at line 3":1,"k at line 3":2}"#).unwrap_err();
        assert!(matches!(e, JsonError::Duplicate(ref k) if k == "k at line 3"), "{e}");
    }

    /// A key named as `serde_json`'s raw-value token is a key like any
    /// other: `Value` (given the `raw_value` feature keygate turns on)
    /// reads such an object as the JSON text of its value, which could
    /// carry repeated keys nobody checked.
    #[test]
    fn the_raw_value_token_is_a_key_like_any_other() {
        let text = r#"{"$serde_json::private::RawValue": "{\"a\": 1, \"a\": 2}"}"#;
        let v = parse(text.as_bytes()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({ "$serde_json::private::RawValue": r#"{"a": 1, "a": 2}"# })
        );
        let text = r#"{"m": {"$serde_json::private::RawValue": "ne"}}"#;
        let v = parse(text.as_bytes()).unwrap();
        assert_eq!(v["m"]["$serde_json::private::RawValue"], "ne");
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

    #[cfg(feature = "serde")]
    #[test]
    fn unique_values_read_like_serde_json_and_refuse_repeats() {
        let text = r#"{"b":[1,-2,3.5,"s",null,true,18446744073709551615],"a":{"c":{}}}"#;
        let UniqueValue(v) = serde_json::from_str(text).unwrap();
        assert_eq!(v, serde_json::from_str::<Value>(text).unwrap());
        for dup in [r#"{"a":1,"a":2}"#, r#"{"x":[{"b":1,"b":1}]}"#] {
            let e = serde_json::from_str::<UniqueValue>(dup).err().unwrap();
            assert!(e.to_string().starts_with("duplicate key `"), "{e}");
        }
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(serde_json::from_str::<UniqueValue>(&deep).is_err(), "depth limit");
    }
}
