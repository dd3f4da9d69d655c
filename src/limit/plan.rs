//! Plans as data: stacked rate policies and monthly quotas, with the seed
//! products' presets and a JSON loader.

use std::collections::{BTreeMap, HashSet};
use std::num::NonZeroU32;
use std::time::Duration;

use serde_json::Value;

use super::{Algorithm, MAX_STACKED, Policy, PolicyError, PolicyName};

/// A monthly quota: at most `limit` units per calendar month (UTC) across
/// the categories it counts; other categories are free and uncounted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QuotaRule {
    /// The rule's name, e.g. `notifications`.
    pub name: String,
    /// Units per month.
    pub limit: u64,
    /// Categories counted, e.g. `["email", "webhook"]`.
    pub counts: Vec<String>,
}

impl QuotaRule {
    /// A rule named `name` allowing `limit` units a month of `counts`.
    #[must_use]
    pub fn new(name: impl Into<String>, limit: u64, counts: &[&str]) -> Self {
        Self { name: name.into(), limit, counts: counts.iter().map(|&c| c.to_owned()).collect() }
    }

    /// Whether the rule counts `category`.
    #[must_use]
    pub fn counts(&self, category: &str) -> bool {
        self.counts.iter().any(|c| c == category)
    }

    /// The categories counted, each once (a name listed twice is one
    /// category).
    ///
    /// Runs on every quota check: a handful of categories are compared
    /// pairwise (no allocation), a longer list through a set (pairwise, a
    /// rule of 8k categories cost 100 ms a request, of 64k 5 s).
    pub fn distinct_counts(&self) -> impl Iterator<Item = &str> {
        const PAIRWISE_MAX: usize = 16;
        let mut seen =
            (self.counts.len() > PAIRWISE_MAX).then(|| HashSet::with_capacity(self.counts.len()));
        self.counts
            .iter()
            .enumerate()
            .filter(move |(i, c)| match &mut seen {
                Some(seen) => seen.insert(c.as_str()),
                None => !self.counts[..*i].contains(c),
            })
            .map(|(_, c)| c.as_str())
    }
}

/// A named bundle of stacked rate policies and monthly quotas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    name: String,
    rate: Vec<Policy>,
    monthly: Vec<QuotaRule>,
}

/// Why a plan or plan file was refused; `field` names where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
#[non_exhaustive]
pub struct PlanError {
    /// Path of the offending field, e.g. `plans.tiny.rate[0].limit`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> PlanError {
    PlanError { field: field.into(), message: message.into() }
}

const fn nz(n: u32) -> NonZeroU32 {
    match NonZeroU32::new(n) {
        Some(n) => n,
        None => panic!("zero"),
    }
}

impl Plan {
    /// A plan of `rate` policies (1 to [`MAX_STACKED`], distinct names)
    /// and `monthly` quotas (distinct names).
    ///
    /// # Errors
    ///
    /// [`PlanError`] for an empty name, no rate policy, too many,
    /// duplicate policy or quota names, or a quota with an empty name, a
    /// limit of 0, no category, or an empty or repeated one.
    pub fn new(
        name: impl Into<String>,
        rate: Vec<Policy>,
        monthly: Vec<QuotaRule>,
    ) -> Result<Self, PlanError> {
        let name = name.into();
        if name.is_empty() {
            return Err(err("name", "must not be empty"));
        }
        if rate.is_empty() || rate.len() > MAX_STACKED {
            return Err(err("rate", format!("a plan stacks 1 to {MAX_STACKED} policies")));
        }
        for (i, p) in rate.iter().enumerate() {
            if rate[..i].iter().any(|q| q.name() == p.name()) {
                return Err(err(format!("rate[{i}].name"), "policy names must be distinct"));
            }
        }
        // A quota's name is what a refusal names: two of one name could not
        // be told apart. Repeats are found with sets, not by comparing each
        // name with every earlier one: a plan file may list any number of
        // quotas and categories, and the pairwise check took quadratic time
        // (4 s for a 512 KiB `counts` array).
        let mut names = HashSet::with_capacity(monthly.len());
        for (i, q) in monthly.iter().enumerate() {
            if q.name.is_empty() {
                return Err(err(format!("monthly[{i}].name"), "must not be empty"));
            }
            if !names.insert(q.name.as_str()) {
                return Err(err(format!("monthly[{i}].name"), "quota names must be distinct"));
            }
            // A limit of 0 refuses every request as costing more than the
            // month allows: a plan without the category says that plainly.
            if q.limit == 0 {
                return Err(err(format!("monthly[{i}].limit"), "must be at least 1"));
            }
            let counts = format!("monthly[{i}].counts");
            if q.counts.is_empty() {
                return Err(err(counts, "must name at least one category"));
            }
            let mut seen = HashSet::with_capacity(q.counts.len());
            for c in &q.counts {
                if c.is_empty() {
                    return Err(err(counts, "categories must not be empty"));
                }
                if !seen.insert(c.as_str()) {
                    return Err(err(counts, format!("names `{c}` twice")));
                }
            }
        }
        Ok(Self { name, rate, monthly })
    }

    /// The plan's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The stacked rate policies.
    #[must_use]
    pub fn rate(&self) -> &[Policy] {
        &self.rate
    }

    /// The monthly quotas.
    #[must_use]
    pub fn monthly(&self) -> &[QuotaRule] {
        &self.monthly
    }

    fn preset(name: &str, policy: Policy, monthly: Vec<QuotaRule>) -> Self {
        Self { name: name.to_owned(), rate: vec![policy], monthly }
    }

    /// Hobby: 3 requests per one-second window.
    #[must_use]
    pub fn hobby() -> Self {
        Self::preset(
            "hobby",
            Policy::const_new(
                PolicyName::DEFAULT,
                nz(3),
                Duration::from_secs(1),
                Algorithm::FixedWindow,
            ),
            vec![],
        )
    }

    /// Starter: 5 requests per second.
    #[must_use]
    pub fn starter() -> Self {
        Self::preset(
            "starter",
            Policy::const_new(
                PolicyName::DEFAULT,
                nz(5),
                Duration::from_secs(1),
                Algorithm::FixedWindow,
            ),
            vec![],
        )
    }

    /// Pro: 10 requests per second.
    #[must_use]
    pub fn pro() -> Self {
        Self::preset(
            "pro",
            Policy::const_new(
                PolicyName::DEFAULT,
                nz(10),
                Duration::from_secs(1),
                Algorithm::FixedWindow,
            ),
            vec![],
        )
    }

    /// Enterprise: 100 requests per second (customise by building your own).
    #[must_use]
    pub fn enterprise() -> Self {
        Self::preset(
            "enterprise",
            Policy::const_new(
                PolicyName::DEFAULT,
                nz(100),
                Duration::from_secs(1),
                Algorithm::FixedWindow,
            ),
            vec![],
        )
    }

    /// Free: 5 requests per rolling minute; 100 notifications a month,
    /// email and webhook both counted.
    #[must_use]
    pub fn free() -> Self {
        Self::preset(
            "free",
            Policy::const_new(
                PolicyName::DEFAULT,
                nz(5),
                Duration::from_secs(60),
                Algorithm::SlidingWindow,
            ),
            vec![QuotaRule::new("notifications", 100, &["email", "webhook"])],
        )
    }

    /// Indie: 50 requests per rolling minute; 4,000 webhook notifications a
    /// month, email unlimited and uncounted.
    #[must_use]
    pub fn indie() -> Self {
        Self::preset(
            "indie",
            Policy::const_new(
                PolicyName::DEFAULT,
                nz(50),
                Duration::from_secs(60),
                Algorithm::SlidingWindow,
            ),
            vec![QuotaRule::new("notifications", 4_000, &["webhook"])],
        )
    }

    /// Startup: 200 requests per rolling minute; 15,000 webhook
    /// notifications a month, email unlimited and uncounted.
    #[must_use]
    pub fn startup() -> Self {
        Self::preset(
            "startup",
            Policy::const_new(
                PolicyName::DEFAULT,
                nz(200),
                Duration::from_secs(60),
                Algorithm::SlidingWindow,
            ),
            vec![QuotaRule::new("notifications", 15_000, &["webhook"])],
        )
    }
}

/// Plans by name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PlanSet {
    plans: BTreeMap<String, Plan>,
}

impl PlanSet {
    /// The seed products' presets: `hobby`, `starter`, `pro`, `enterprise`
    /// (per-second windows) and `free`, `indie`, `startup` (rolling minute,
    /// with monthly notification quotas).
    #[must_use]
    pub fn presets() -> Self {
        let mut s = Self::default();
        for p in [
            Plan::hobby(),
            Plan::starter(),
            Plan::pro(),
            Plan::enterprise(),
            Plan::free(),
            Plan::indie(),
            Plan::startup(),
        ] {
            s.insert(p);
        }
        s
    }

    /// Adds or replaces a plan.
    pub fn insert(&mut self, plan: Plan) {
        self.plans.insert(plan.name.clone(), plan);
    }

    /// The plan named `name`.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&Plan> {
        self.plans.get(name)
    }

    /// Every plan, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Plan> {
        self.plans.values()
    }

    /// Adds (or replaces) every plan of `other`.
    pub fn extend(&mut self, other: Self) {
        self.plans.extend(other.plans);
    }

    /// Parses a plan file:
    ///
    /// ```json
    /// {"plans": {
    ///   "tiny": {
    ///     "rate": [{"name": "default", "limit": 1000, "window_seconds": 60, "algorithm": "sliding_window"}],
    ///     "monthly": [{"name": "notifications", "limit": 5, "counts": ["webhook"]}]
    ///   }
    /// }}
    /// ```
    ///
    /// `algorithm` is `gcra` (with an optional `burst`), `fixed_window` or
    /// `sliding_window`; `monthly` is optional.
    ///
    /// # Errors
    ///
    /// [`PlanError`] naming the first offending field.
    pub fn from_json(text: &str) -> Result<Self, PlanError> {
        // A plan or field named twice is an error, not "the last one wins".
        let v = crate::json::parse(text.as_bytes()).map_err(|e| err("$", e.to_string()))?;
        Self::from_value(&v)
    }

    /// [`from_json`](Self::from_json) over an already-parsed value.
    ///
    /// # Errors
    ///
    /// As [`from_json`](Self::from_json).
    pub fn from_value(v: &Value) -> Result<Self, PlanError> {
        let root = v.as_object().ok_or_else(|| err("$", "must be an object"))?;
        only(root, &["plans"], "")?;
        let plans = root
            .get("plans")
            .and_then(Value::as_object)
            .ok_or_else(|| err("plans", "must be an object"))?;
        let mut out = Self::default();
        for (name, pv) in plans {
            let at = child("plans", name);
            let p = pv.as_object().ok_or_else(|| err(&at, "must be an object"))?;
            only(p, &["rate", "monthly"], &at)?;
            let rate_v = p
                .get("rate")
                .and_then(Value::as_array)
                .ok_or_else(|| err(format!("{at}.rate"), "must be an array"))?;
            // Each entry is read with an empty path, its plan's path put in
            // front only on error: formatting `{at}.rate[{i}]` for every
            // entry cost the plan name's length per entry (quadratic: a
            // 256 KiB name before 256 KiB of entries took 73 ms, 8× smaller
            // 2.9 ms).
            let mut rate = Vec::new();
            for (i, r) in rate_v.iter().enumerate() {
                rate.push(policy_from(r, "").map_err(|e| under(&format!("{at}.rate[{i}]"), e))?);
            }
            let mut monthly = Vec::new();
            if let Some(m) = p.get("monthly") {
                let m =
                    m.as_array().ok_or_else(|| err(format!("{at}.monthly"), "must be an array"))?;
                for (i, q) in m.iter().enumerate() {
                    monthly.push(
                        quota_from(q, "").map_err(|e| under(&format!("{at}.monthly[{i}]"), e))?,
                    );
                }
            }
            let plan = Plan::new(name.clone(), rate, monthly)
                .map_err(|e| err(format!("{at}.{}", e.field), e.message))?;
            out.insert(plan);
        }
        Ok(out)
    }
}

/// The path of member `key` under `at`: `at.key` for plain names, and
/// `at["…"]` (JSON-quoted) for empty keys or keys with path syntax in them,
/// so every error names an unambiguous, non-empty field.
fn child(at: &str, key: &str) -> String {
    let plain =
        !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    match (plain, at.is_empty()) {
        (true, true) => key.to_owned(),
        (true, false) => format!("{at}.{key}"),
        (false, _) => format!("{at}[{}]", Value::from(key)),
    }
}

/// `e`, found reading a value with an empty path (`""`, `.name`, `name` or
/// `["…"]`, as [`child`] writes it), with its path under `at`.
fn under(at: &str, e: PlanError) -> PlanError {
    let field = match e.field.as_bytes().first() {
        None => at.to_owned(),
        Some(b'.' | b'[') => format!("{at}{}", e.field),
        Some(_) => format!("{at}.{}", e.field),
    };
    PlanError { field, ..e }
}

fn only(obj: &serde_json::Map<String, Value>, allowed: &[&str], at: &str) -> Result<(), PlanError> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(err(child(at, k), "unknown field")),
        None => Ok(()),
    }
}

fn uint(
    obj: &serde_json::Map<String, Value>,
    key: &str,
    at: &str,
) -> Result<Option<u64>, PlanError> {
    match obj.get(key) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            // An integer past u64 (`1e20`, or its digits) reaches here as a
            // double: it is a count, only too large for one.
            let huge = v.as_f64().is_some_and(|f| f >= 18_446_744_073_709_551_616.0);
            err(
                format!("{at}.{key}"),
                if huge { "is too large" } else { "must be a non-negative integer" },
            )
        }),
    }
}

fn policy_from(v: &Value, at: &str) -> Result<Policy, PlanError> {
    let o = v.as_object().ok_or_else(|| err(at, "must be an object"))?;
    only(o, &["name", "limit", "window_seconds", "algorithm", "burst"], at)?;
    let name = o
        .get("name")
        .map_or(Some("default"), Value::as_str)
        .ok_or_else(|| err(format!("{at}.name"), "must be a string"))?;
    let limit = uint(o, "limit", at)?.ok_or_else(|| err(format!("{at}.limit"), "is required"))?;
    let limit = u32::try_from(limit).map_err(|_| err(format!("{at}.limit"), "is too large"))?;
    let window = uint(o, "window_seconds", at)?
        .ok_or_else(|| err(format!("{at}.window_seconds"), "is required"))?;
    let algorithm = match o.get("algorithm").map_or(Some("gcra"), Value::as_str) {
        Some("gcra") => Algorithm::Gcra,
        Some("fixed_window") => Algorithm::FixedWindow,
        Some("sliding_window") => Algorithm::SlidingWindow,
        _ => {
            return Err(err(
                format!("{at}.algorithm"),
                "must be gcra, fixed_window or sliding_window",
            ));
        }
    };
    let field = |e: &PolicyError| match e {
        PolicyError::ZeroLimit | PolicyError::SlidingTooLarge { .. } => "limit",
        PolicyError::Period => "window_seconds",
        PolicyError::Burst => "burst",
        _ => "name",
    };
    let mut p = Policy::new(name.to_owned(), limit, Duration::from_secs(window), algorithm)
        .map_err(|e| err(format!("{at}.{}", field(&e)), e.to_string()))?;
    if let Some(b) = uint(o, "burst", at)? {
        let b = u32::try_from(b).map_err(|_| err(format!("{at}.burst"), "is too large"))?;
        p = p.with_burst(b).map_err(|e| err(format!("{at}.burst"), e.to_string()))?;
    }
    Ok(p)
}

fn quota_from(v: &Value, at: &str) -> Result<QuotaRule, PlanError> {
    let o = v.as_object().ok_or_else(|| err(at, "must be an object"))?;
    only(o, &["name", "limit", "counts"], at)?;
    let name = o
        .get("name")
        .map_or(Some("monthly"), Value::as_str)
        .ok_or_else(|| err(format!("{at}.name"), "must be a string"))?;
    let limit = uint(o, "limit", at)?.ok_or_else(|| err(format!("{at}.limit"), "is required"))?;
    let counts = o
        .get("counts")
        .and_then(Value::as_array)
        .ok_or_else(|| err(format!("{at}.counts"), "must be an array of strings"))?
        .iter()
        .map(|c| c.as_str().map(str::to_owned))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| err(format!("{at}.counts"), "must be an array of strings"))?;
    // Emptiness, a zero limit and repeats are refused by `Plan::new`.
    Ok(QuotaRule { name: name.to_owned(), limit, counts })
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for PlanSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Not `Value`: it keeps the last of two equal keys, and a plan file
        // naming one plan twice would lose the first silently.
        let crate::json::UniqueValue(v) = crate::json::UniqueValue::deserialize(d)?;
        Self::from_value(&v).map_err(serde::de::Error::custom)
    }
}
