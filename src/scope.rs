//! Permissions: `resource:action` scopes, wildcards, roles, and a registry
//! that compiles them to bitsets so a check is a few instructions.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Why a scope string or scope operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScopeError {
    /// The string is not `*`, `resource:*` or `resource:action` with
    /// lowercase names of 1 to 32 characters (`a-z`, `0-9`, `_`, `-`, `.`,
    /// starting with a letter).
    #[error("scope must be `resource:action`, `resource:*` or `*`")]
    Syntax,
    /// The scope names a resource or action the registry does not know.
    #[error("unknown scope `{scope}`")]
    Unknown {
        /// The unknown scope.
        scope: String,
    },
    /// A wildcard was given where one concrete scope is needed.
    #[error("a required scope must not be a wildcard")]
    Wildcard,
    /// The registry would need more than [`ScopeSet::CAPACITY`] bits, or
    /// lists a name twice.
    #[error("registry must list distinct names and at most {max} resource:action pairs")]
    Registry {
        /// The bit capacity.
        max: usize,
    },
    /// Attenuation asked for a scope the parent does not hold.
    #[error("scope `{scope}` exceeds the parent's grants")]
    Exceeds {
        /// The first scope asked for that the parent lacks.
        scope: String,
    },
}

/// A validated scope: `*`, `resource:*` or `resource:action`. Cheap to
/// clone (shared text).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope(Arc<str>);

const MAX_NAME: usize = 32;

fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME
        && b[0].is_ascii_lowercase()
        && b.iter().all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-.".contains(&c))
}

impl Scope {
    /// The resource, or `None` for `*`.
    #[must_use]
    pub fn resource(&self) -> Option<&str> {
        self.0.split_once(':').map(|(r, _)| r)
    }

    /// The action (`*` for a resource wildcard), or `None` for `*`.
    #[must_use]
    pub fn action(&self) -> Option<&str> {
        self.0.split_once(':').map(|(_, a)| a)
    }

    /// Whether this is `*` or `resource:*`.
    #[must_use]
    pub fn is_wildcard(&self) -> bool {
        &*self.0 == "*" || self.action() == Some("*")
    }

    /// The scope text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Scope {
    type Err = ScopeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = s == "*"
            || s.split_once(':').is_some_and(|(r, a)| valid_name(r) && (a == "*" || valid_name(a)));
        if ok { Ok(Self(s.into())) } else { Err(ScopeError::Syntax) }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for Scope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for Scope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A set of concrete scopes as a fixed 256-bit set: copy, union, subset and
/// membership are a handful of word operations.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ScopeSet([u64; 4]);

impl ScopeSet {
    /// Most `resource:action` pairs a registry can hold.
    pub const CAPACITY: usize = 256;

    /// The empty set.
    pub const EMPTY: Self = Self([0; 4]);

    /// Whether the set grants `required`, which must come from the registry
    /// that compiled the set, or one built from the same lists (the set
    /// does not know its registry; [`Principal::allows`] checks it).
    ///
    /// [`Principal::allows`]: crate::auth::Principal::allows
    #[inline]
    #[must_use]
    pub const fn allows(&self, required: &Required) -> bool {
        let bit = required.bit as usize;
        self.0[bit / 64] & (1 << (bit % 64)) != 0
    }

    /// Whether every scope in `self` is in `other`.
    #[must_use]
    pub const fn is_subset_of(&self, other: &Self) -> bool {
        self.difference(*other).is_empty()
    }

    /// The union of both sets.
    #[must_use]
    pub const fn union(self, other: Self) -> Self {
        let (a, b) = (self.0, other.0);
        Self([a[0] | b[0], a[1] | b[1], a[2] | b[2], a[3] | b[3]])
    }

    /// The scopes in both sets.
    #[must_use]
    pub const fn intersection(self, other: Self) -> Self {
        let (a, b) = (self.0, other.0);
        Self([a[0] & b[0], a[1] & b[1], a[2] & b[2], a[3] & b[3]])
    }

    /// The scopes in this set and not in `other`.
    #[must_use]
    pub const fn difference(self, other: Self) -> Self {
        let (a, b) = (self.0, other.0);
        Self([a[0] & !b[0], a[1] & !b[1], a[2] & !b[2], a[3] & !b[3]])
    }

    /// Whether the set is empty.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        self.0[0] | self.0[1] | self.0[2] | self.0[3] == 0
    }

    /// Number of concrete scopes in the set.
    #[must_use]
    pub const fn len(&self) -> usize {
        (self.0[0].count_ones()
            + self.0[1].count_ones()
            + self.0[2].count_ones()
            + self.0[3].count_ones()) as usize
    }

    fn insert(&mut self, bit: usize) {
        self.0[bit / 64] |= 1 << (bit % 64);
    }

    fn has(&self, bit: usize) -> bool {
        self.0[bit / 64] & (1 << (bit % 64)) != 0
    }
}

impl fmt::Debug for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ScopeSet({} scopes)", self.len())
    }
}

/// One concrete scope compiled against a registry: what a route requires.
/// Build once at start-up with [`ScopeRegistry::required`].
///
/// It remembers the registry's bit layout: [`Principal::allows`] refuses a
/// requirement compiled against a registry whose layout differs from the
/// one the principal's grants were compiled against, where the same bit
/// would name a different scope.
///
/// [`Principal::allows`]: crate::auth::Principal::allows
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Required {
    bit: u16,
    layout: Layout,
    scope: Scope,
}

impl Required {
    /// The scope, for error messages and `WWW-Authenticate: … scope=`.
    #[must_use]
    pub const fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The bit layout of the registry this was compiled against.
    pub(crate) const fn layout(&self) -> Layout {
        self.layout
    }
}

/// A registry's bit layout (which scope each bit means), as a fingerprint
/// of its resource and action lists in order: registries built from the
/// same lists share it, so their sets and requirements are interchangeable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Layout(u64);

impl Layout {
    fn of(resources: &[&str], actions: &[&str]) -> Self {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        for list in [resources, actions] {
            for name in list {
                // Names never contain a NUL: it separates them unambiguously.
                h.update(name.as_bytes());
                h.update([0]);
            }
            h.update([1]);
        }
        let d = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&d[..8]);
        Self(u64::from_le_bytes(first))
    }
}

/// A portal or team role: a named bundle of actions over resources.
///
/// `write` is the seeds' word for creating and changing (`webhooks:write`
/// guards `POST /v1/webhooks`), so editors hold it: guard deletion with
/// `delete`, which only admins hold, never with `write`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Role {
    /// Full CRUD: `read`, `create`, `update`, `delete`, `write`.
    Admin,
    /// Create and update, no delete: `read`, `create`, `update`, `write`.
    Editor,
    /// Read-only: `read`.
    Viewer,
}

impl Role {
    /// The actions the role grants on each of its resources.
    #[must_use]
    pub const fn actions(self) -> &'static [&'static str] {
        match self {
            Self::Admin => &["read", "create", "update", "delete", "write"],
            Self::Editor => &["read", "create", "update", "write"],
            Self::Viewer => &["read"],
        }
    }

    /// The role's name: `admin`, `editor` or `viewer`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Editor => "editor",
            Self::Viewer => "viewer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown role name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("role must be one of admin, editor, viewer")]
pub struct RoleError;

impl FromStr for Role {
    type Err = RoleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "admin" => Ok(Self::Admin),
            "editor" => Ok(Self::Editor),
            "viewer" => Ok(Self::Viewer),
            _ => Err(RoleError),
        }
    }
}

/// A role is its name (`"editor"`), as the session request spells it.
#[cfg(feature = "serde")]
impl serde::Serialize for Role {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for Role {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The resources and actions a deployment knows, built once at start-up.
/// Every scope is compiled against it into a [`ScopeSet`].
///
/// ```
/// use keygate::scope::ScopeRegistry;
///
/// let reg = ScopeRegistry::default();
/// let granted = reg.compile(&["applications:read".parse()?, "webhooks:*".parse()?])?;
/// let need = reg.required("webhooks:write")?;
/// assert!(granted.allows(&need));
/// assert!(!granted.allows(&reg.required("applications:delete")?));
/// # Ok::<(), keygate::scope::ScopeError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeRegistry {
    layout: Layout,
    resources: Vec<Box<str>>,
    actions: Vec<Box<str>>,
    /// `resource:action` → bit, so compiling a concrete scope is one lookup.
    bits: HashMap<Box<str>, u16, ahash::RandomState>,
    /// Bit → its scope, so listing a set's scopes shares text, not copies.
    names: Vec<Scope>,
}

impl Default for ScopeRegistry {
    /// The resources of the seed products with CRUD actions plus `write`
    /// (create or update) and `execute`. The resources: `applications`,
    /// `webhooks`, `endpoints`, `event_types`, `events`, `messages`,
    /// `subscriptions`, `deliveries`, `api_keys`, `tokens`, `portal`,
    /// `ingest`, `notifications`, `workflows`; a host with others builds
    /// its own with [`ScopeRegistry::new`].
    ///
    /// ```
    /// use keygate::scope::ScopeRegistry;
    ///
    /// let reg = ScopeRegistry::default();
    /// assert!(reg.required("workflows:execute").is_ok());
    /// assert!(reg.required("orders:read").is_err());
    /// ```
    fn default() -> Self {
        Self::new(
            &[
                "applications",
                "webhooks",
                "endpoints",
                "event_types",
                "events",
                "messages",
                "subscriptions",
                "deliveries",
                "api_keys",
                "tokens",
                "portal",
                "ingest",
                "notifications",
                "workflows",
            ],
            &["read", "create", "update", "delete", "write", "execute"],
        )
        .unwrap_or_else(|_| Self {
            layout: Layout::of(&[], &[]),
            resources: Vec::new(),
            actions: Vec::new(),
            bits: HashMap::default(),
            names: Vec::new(),
        })
    }
}

impl ScopeRegistry {
    /// A registry of `resources` × `actions`.
    ///
    /// # Errors
    ///
    /// [`ScopeError::Syntax`] for an invalid name, [`ScopeError::Registry`]
    /// for a repeated name or more than [`ScopeSet::CAPACITY`] pairs (or
    /// names in one list, even when the other is empty).
    pub fn new(resources: &[&str], actions: &[&str]) -> Result<Self, ScopeError> {
        if resources.len() * actions.len() > ScopeSet::CAPACITY {
            return Err(ScopeError::Registry { max: ScopeSet::CAPACITY });
        }
        for list in [resources, actions] {
            // Each list is capped too: with the other one empty the product
            // is 0 whatever this one's length, and the repeat check below
            // compares each name with every later one (quadratic time).
            if list.len() > ScopeSet::CAPACITY {
                return Err(ScopeError::Registry { max: ScopeSet::CAPACITY });
            }
            for (i, n) in list.iter().enumerate() {
                if !valid_name(n) {
                    return Err(ScopeError::Syntax);
                }
                if list[i + 1..].contains(n) {
                    return Err(ScopeError::Registry { max: ScopeSet::CAPACITY });
                }
            }
        }
        let mut bits = HashMap::with_capacity_and_hasher(
            resources.len() * actions.len(),
            ahash::RandomState::new(),
        );
        let mut names = Vec::with_capacity(resources.len() * actions.len());
        for (ri, r) in resources.iter().enumerate() {
            for (ai, a) in actions.iter().enumerate() {
                let name = format!("{r}:{a}");
                bits.insert(name.as_str().into(), (ri * actions.len() + ai) as u16);
                names.push(Scope(name.into()));
            }
        }
        Ok(Self {
            layout: Layout::of(resources, actions),
            resources: resources.iter().map(|&r| r.into()).collect(),
            actions: actions.iter().map(|&a| a.into()).collect(),
            bits,
            names,
        })
    }

    /// The registry's bit layout.
    pub(crate) const fn layout(&self) -> Layout {
        self.layout
    }

    fn resource_index(&self, r: &str) -> Option<usize> {
        self.resources.iter().position(|x| &**x == r)
    }

    fn action_index(&self, a: &str) -> Option<usize> {
        self.actions.iter().position(|x| &**x == a)
    }

    fn unknown(scope: &Scope) -> ScopeError {
        ScopeError::Unknown { scope: scope.to_string() }
    }

    /// Compiles scopes (wildcards expand to every registered match) into a
    /// set.
    ///
    /// # Errors
    ///
    /// [`ScopeError::Unknown`] for a scope naming an unregistered resource or
    /// action.
    pub fn compile(&self, scopes: &[Scope]) -> Result<ScopeSet, ScopeError> {
        self.compile_with(scopes, true)
    }

    /// [`compile`](Self::compile) that skips scopes this registry does not
    /// know: a parent's grants as seen by this registry (a scope it does not
    /// know cannot be asked for through it either).
    pub(crate) fn compile_known(&self, scopes: &[Scope]) -> ScopeSet {
        self.compile_with(scopes, false).unwrap_or(ScopeSet::EMPTY)
    }

    fn compile_with(&self, scopes: &[Scope], strict: bool) -> Result<ScopeSet, ScopeError> {
        let mut set = ScopeSet::EMPTY;
        let n = self.actions.len();
        for s in scopes {
            // Concrete scopes, the common case, are one lookup of the whole
            // text; only wildcards and unknown scopes are split.
            if let Some(bit) = self.bits.get(s.as_str()) {
                set.insert(usize::from(*bit));
                continue;
            }
            match s.0.split_once(':') {
                None => {
                    for bit in 0..self.resources.len() * n {
                        set.insert(bit);
                    }
                }
                Some((r, "*")) => match self.resource_index(r) {
                    Some(ri) => (0..n).for_each(|ai| set.insert(ri * n + ai)),
                    None if strict => return Err(Self::unknown(s)),
                    None => {}
                },
                Some(_) if strict => return Err(Self::unknown(s)),
                Some(_) => {}
            }
        }
        Ok(set)
    }

    /// Compiles one concrete scope that a route requires.
    ///
    /// # Errors
    ///
    /// [`ScopeError::Syntax`], [`ScopeError::Wildcard`] or
    /// [`ScopeError::Unknown`].
    pub fn required(&self, scope: &str) -> Result<Required, ScopeError> {
        let scope: Scope = scope.parse()?;
        if scope.is_wildcard() {
            return Err(ScopeError::Wildcard);
        }
        let set = self.compile(std::slice::from_ref(&scope))?;
        let bit = (0..ScopeSet::CAPACITY).find(|&b| set.has(b)).unwrap_or(0);
        Ok(Required { bit: bit as u16, layout: self.layout, scope })
    }

    /// The set a role grants over `resources`. Actions of the role that the
    /// registry does not list are skipped.
    ///
    /// # Errors
    ///
    /// [`ScopeError::Unknown`] for an unregistered resource.
    pub fn role(&self, role: Role, resources: &[&str]) -> Result<ScopeSet, ScopeError> {
        let n = self.actions.len();
        let mut set = ScopeSet::EMPTY;
        for r in resources {
            let ri = self
                .resource_index(r)
                .ok_or_else(|| ScopeError::Unknown { scope: format!("{r}:*") })?;
            for a in role.actions() {
                if let Some(ai) = self.action_index(a) {
                    set.insert(ri * n + ai);
                }
            }
        }
        Ok(set)
    }

    /// `requested` if it is within `parent`: anything minted from a
    /// principal (a key created for a parent, a portal session) gets at most
    /// its grants.
    ///
    /// # Errors
    ///
    /// [`ScopeError::Exceeds`] naming the first scope `parent` lacks.
    pub fn attenuate(
        &self,
        requested: ScopeSet,
        parent: &ScopeSet,
    ) -> Result<ScopeSet, ScopeError> {
        if requested.is_subset_of(parent) {
            return Ok(requested);
        }
        let extra = requested.difference(*parent);
        let scope = self.scopes_of(&extra).first().map(ToString::to_string).unwrap_or_default();
        Err(ScopeError::Exceeds { scope })
    }

    /// The concrete scopes in `set`, in registry order.
    #[must_use]
    pub fn scopes_of(&self, set: &ScopeSet) -> Vec<Scope> {
        self.names
            .iter()
            .enumerate()
            .filter(|(bit, _)| set.has(*bit))
            .map(|(_, s)| s.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Scope {
        x.parse().unwrap()
    }

    #[test]
    fn grammar_bounds() {
        for ok in [
            "*",
            "a:b",
            "webhooks:*",
            "event_types:read",
            "a.b-c_d:x9",
            &format!("{}:r", "a".repeat(32)),
        ] {
            assert!(ok.parse::<Scope>().is_ok(), "{ok}");
        }
        for bad in [
            "",
            ":",
            "a:",
            ":b",
            "A:b",
            "a:B",
            "1a:b",
            "a:b:c",
            "a :b",
            "*:read",
            "a:**",
            &format!("{}:r", "a".repeat(33)),
        ] {
            assert_eq!(bad.parse::<Scope>(), Err(ScopeError::Syntax), "{bad}");
        }
        assert_eq!(s("webhooks:write").resource(), Some("webhooks"));
        assert!(s("webhooks:*").is_wildcard() && s("*").is_wildcard());
    }

    /// A scope prints as its text, quoted in `Debug` as a string is.
    #[test]
    fn a_scope_prints_as_its_text() {
        assert_eq!(s("webhooks:write").to_string(), "webhooks:write");
        assert_eq!(format!("{:?}", [s("webhooks:*"), s("*")]), r#"["webhooks:*", "*"]"#);
    }

    #[test]
    fn wildcards_and_checks() {
        let reg = ScopeRegistry::default();
        let read = reg.required("applications:read").unwrap();
        let write = reg.required("webhooks:write").unwrap();
        let set = reg.compile(&[s("applications:read")]).unwrap();
        assert!(set.allows(&read) && !set.allows(&write));
        let all_webhooks = reg.compile(&[s("webhooks:*")]).unwrap();
        assert!(all_webhooks.allows(&write) && !all_webhooks.allows(&read));
        assert_eq!(all_webhooks.len(), 6);
        let star = reg.compile(&[s("*")]).unwrap();
        assert!(star.allows(&read) && star.allows(&write));
        assert_eq!(star.len(), 14 * 6);
        assert_eq!(
            reg.compile(&[s("widgets:read")]),
            Err(ScopeError::Unknown { scope: "widgets:read".into() })
        );
        assert_eq!(
            reg.compile(&[s("webhooks:fly")]).unwrap_err().to_string(),
            "unknown scope `webhooks:fly`"
        );
        assert_eq!(reg.required("webhooks:*"), Err(ScopeError::Wildcard));
        assert_eq!(read.scope().as_str(), "applications:read");
    }

    #[test]
    fn roles() {
        let reg = ScopeRegistry::default();
        let res = ["endpoints"];
        let (admin, editor, viewer) = (
            reg.role(Role::Admin, &res).unwrap(),
            reg.role(Role::Editor, &res).unwrap(),
            reg.role(Role::Viewer, &res).unwrap(),
        );
        let [read, create, update, delete] = ["read", "create", "update", "delete"]
            .map(|a| reg.required(&format!("endpoints:{a}")).unwrap());
        assert!(viewer.allows(&read) && !viewer.allows(&create) && !viewer.allows(&delete));
        assert!(editor.allows(&read) && editor.allows(&create) && editor.allows(&update));
        assert!(!editor.allows(&delete));
        assert!(admin.allows(&delete));
        assert!(viewer.is_subset_of(&editor) && editor.is_subset_of(&admin));
        assert_eq!("editor".parse::<Role>(), Ok(Role::Editor));
        assert_eq!("owner".parse::<Role>(), Err(RoleError));
    }

    /// A role (feature `serde`) is its name, as the session request and the
    /// access token's `portal.role` spell it; any other name is refused.
    #[cfg(feature = "serde")]
    #[test]
    fn a_role_is_its_name_through_serde() {
        for role in [Role::Admin, Role::Editor, Role::Viewer] {
            let text = serde_json::to_string(&role).unwrap();
            assert_eq!(text, format!("\"{role}\""));
            assert_eq!(serde_json::from_str::<Role>(&text).unwrap(), role);
        }
        for bad in [r#""owner""#, r#""Admin""#, r#""""#, "0", "null"] {
            assert!(serde_json::from_str::<Role>(bad).is_err(), "{bad}");
        }
        let e = serde_json::from_str::<Role>(r#""owner""#).unwrap_err();
        assert!(e.to_string().contains("admin, editor, viewer"), "{e}");
    }

    #[test]
    fn attenuation() {
        let reg = ScopeRegistry::default();
        let parent = reg.compile(&[s("applications:read"), s("webhooks:*")]).unwrap();
        let ok = reg.compile(&[s("webhooks:write")]).unwrap();
        assert_eq!(reg.attenuate(ok, &parent), Ok(ok));
        let too_much = reg.compile(&[s("webhooks:write"), s("applications:delete")]).unwrap();
        assert_eq!(
            reg.attenuate(too_much, &parent),
            Err(ScopeError::Exceeds { scope: "applications:delete".into() })
        );
        assert_eq!(reg.scopes_of(&ok), vec![s("webhooks:write")]);
    }

    /// A registry of 16 resources × 16 actions fills all 256 bits: `rN:*`
    /// of resource `N` lies in word `N / 4` of the set.
    fn full_registry() -> ScopeRegistry {
        let names = |p: char| (0..16).map(|i| format!("{p}{i}")).collect::<Vec<_>>();
        let (rs, acts) = (names('r'), names('a'));
        let (rs, acts): (Vec<&str>, Vec<&str>) =
            (rs.iter().map(String::as_str).collect(), acts.iter().map(String::as_str).collect());
        ScopeRegistry::new(&rs, &acts).unwrap()
    }

    #[test]
    fn set_operations_cover_all_four_words() {
        let reg = full_registry();
        let set = |scopes: &[&str]| {
            reg.compile(&scopes.iter().map(|x| s(x)).collect::<Vec<_>>()).unwrap()
        };
        let names =
            |set: &ScopeSet| reg.scopes_of(set).iter().map(ToString::to_string).collect::<Vec<_>>();
        // One resource row in each word, and a second set sharing the rows'
        // first scope and adding a scope of its own in each word.
        let rows = set(&["r0:*", "r4:*", "r8:*", "r12:*"]);
        let firsts = ["r0:a0", "r4:a0", "r8:a0", "r12:a0"];
        let own = ["r1:a0", "r5:a0", "r9:a0", "r13:a0"];
        let other = set(&[&firsts[..], &own[..]].concat());
        assert_eq!((rows.len(), other.len()), (64, 8));
        assert_eq!(rows.intersection(other), set(&firsts));
        assert_eq!(names(&rows.intersection(other)), firsts);
        let union = rows.union(other);
        assert_eq!(union.len(), 68);
        assert_eq!(
            union,
            set(&["r0:*", "r1:a0", "r4:*", "r5:a0", "r8:*", "r9:a0", "r12:*", "r13:a0"])
        );
        assert_eq!(other.difference(rows), set(&own));
        assert_eq!(rows.difference(other).len(), 60);
        let all = set(&["*"]);
        assert_eq!(all.len(), ScopeSet::CAPACITY);
        assert_eq!(format!("{all:?}"), "ScopeSet(256 scopes)");
        assert!(ScopeSet::EMPTY.is_empty() && !all.is_empty());
        // A set is not empty whichever word holds its scopes, alone or with
        // the same bit in the next word.
        for scopes in [&["r0:a0"][..], &["r4:a0"], &["r8:a0"], &["r15:a15"]].into_iter().chain([
            &["r0:a0", "r4:a0"][..],
            &["r4:a0", "r8:a0"],
            &["r8:a0", "r12:a0"],
        ]) {
            let one = set(scopes);
            assert!(!one.is_empty(), "{scopes:?}");
            assert_eq!(one.len(), scopes.len(), "{scopes:?}");
        }
    }

    /// Attenuation refuses a scope the parent lacks wherever it lies in the
    /// set (the default registry fills only its first two words), and names
    /// it.
    #[test]
    fn attenuation_refuses_a_missing_scope_in_any_word() {
        let reg = full_registry();
        let all = reg.scopes_of(&reg.compile(&[s("*")]).unwrap());
        for missing in [&["r0:a0"][..], &["r4:a1"], &["r8:a2"], &["r15:a15"]].into_iter().chain([
            &["r0:a0", "r4:a0"][..],
            &["r4:a0", "r8:a0"],
            &["r8:a0", "r12:a0"],
        ]) {
            let kept: Vec<Scope> =
                all.iter().filter(|x| !missing.contains(&x.as_str())).cloned().collect();
            let parent = reg.compile(&kept).unwrap();
            let asked = reg.compile(&missing.iter().map(|x| s(x)).collect::<Vec<_>>()).unwrap();
            assert_eq!(
                reg.attenuate(asked, &parent),
                Err(ScopeError::Exceeds { scope: missing[0].into() }),
                "{missing:?}"
            );
            assert_eq!(reg.attenuate(parent, &parent), Ok(parent));
        }
    }

    /// `resource:*` grants that resource's actions and nothing of the next
    /// resource; of a resource the registry does not know, it is refused.
    #[test]
    fn a_resource_wildcard_is_exactly_its_resources_actions() {
        let reg = ScopeRegistry::default();
        let webhooks = reg.compile(&[s("webhooks:*")]).unwrap();
        let actions = ["read", "create", "update", "delete", "write", "execute"];
        let each: Vec<Scope> = actions.iter().map(|a| s(&format!("webhooks:{a}"))).collect();
        assert_eq!(reg.scopes_of(&webhooks), each);
        assert!(!webhooks.allows(&reg.required("endpoints:read").unwrap()));
        assert_eq!(
            reg.compile(&[s("applications:read"), s("widgets:*")]),
            Err(ScopeError::Unknown { scope: "widgets:*".into() })
        );
    }

    /// A parent's grants as another registry sees them keep the scopes it
    /// knows and skip, one by one, those it does not.
    #[test]
    fn known_grants_skip_only_the_unknown_scopes() {
        let reg = ScopeRegistry::default();
        let held = [
            s("applications:read"),
            s("widgets:read"),
            s("webhooks:fly"),
            s("widgets:*"),
            s("endpoints:*"),
        ];
        let known = reg.compile(&[s("applications:read"), s("endpoints:*")]).unwrap();
        assert_eq!(known.len(), 7);
        assert_eq!(reg.compile_known(&held), known);
    }

    #[test]
    fn registry_limits() {
        let many: Vec<String> = (0..17).map(|i| format!("r{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let acts: Vec<String> = (0..16).map(|i| format!("a{i}")).collect();
        let acts: Vec<&str> = acts.iter().map(String::as_str).collect();
        assert!(ScopeRegistry::new(&many[..16], &acts).is_ok());
        assert_eq!(ScopeRegistry::new(&many, &acts), Err(ScopeError::Registry { max: 256 }));
        assert!(ScopeRegistry::new(&["a", "a"], &["r"]).is_err());
        // Each list is capped even when the other is empty (no pairs): the
        // repeat check is pairwise, and 64k resources without actions took
        // 4.3 s (8k: 74 ms). Refused before any name is compared.
        let huge: Vec<String> = (0..100_000).map(|i| format!("r{i}")).collect();
        let huge: Vec<&str> = huge.iter().map(String::as_str).collect();
        for (r, a) in [(&huge[..], &[][..]), (&[][..], &huge[..]), (&huge[..257], &[][..])] {
            assert_eq!(ScopeRegistry::new(r, a), Err(ScopeError::Registry { max: 256 }));
        }
        assert!(ScopeRegistry::new(&huge[..256], &[]).is_ok());
        assert!(ScopeRegistry::new(&["A"], &["r"]).is_err());
        // The last bit of a full registry works.
        let reg = ScopeRegistry::new(&many[..16], &acts).unwrap();
        let last = reg.required("r15:a15").unwrap();
        assert!(reg.compile(&[s("r15:a15")]).unwrap().allows(&last));
    }
}
