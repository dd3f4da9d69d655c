//! Declarative key grammars: one [`KeyFormat`] value drives both minting and
//! parsing, so the two cannot disagree.
//!
//! A key reads `{name}_[{environment or region}_][{key id}_]{secret}[{checksum}]`.

mod alphabet;
mod parts;
mod presets;

use std::fmt;
use std::str::FromStr;

use rand_core::TryCryptoRng;
use smol_str::SmolStr;

pub use alphabet::Alphabet;
pub(crate) use alphabet::FillError;
pub use parts::{Environment, KeyId, PartError, Region};
pub use presets::{NH, NHK, NHM, NK, SK};

use crate::secret::{OsBatch, SecretString};

/// An upper bound on the length of a key of any format, in bytes (the
/// format builder's limits keep every format below it): a host may refuse
/// longer credentials before parsing. Each format, and each
/// [`FormatSet`], rejects an input longer than its own longest key before
/// any other work ([`ParseError::TooLong`]), which bounds the cost of every
/// parse.
pub const MAX_KEY_LEN: usize = 256;

/// The segment between the prefix and the key id or secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Segment {
    /// No segment: `nh_{secret}`.
    None,
    /// One of a fixed list of environment names: `sk_{live|test}_{secret}`.
    /// The first one is the default when minting.
    Environments(&'static [Environment]),
    /// A two-letter region code: `nhk_{region}_{secret}`.
    Region,
}

/// Which part of a key a [`ParseError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Part {
    /// The leading `{name}_`.
    Prefix,
    /// The environment segment.
    Environment,
    /// The region segment.
    Region,
    /// The public key id.
    KeyId,
    /// The secret.
    Secret,
    /// The checksum suffix.
    Checksum,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Prefix => "prefix",
            Self::Environment => "environment",
            Self::Region => "region",
            Self::KeyId => "key id",
            Self::Secret => "secret",
            Self::Checksum => "checksum",
        })
    }
}

/// Why a string is not a key of a format. Never contains the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// The input is empty.
    #[error("key is empty")]
    Empty,
    /// The input is longer than any key of the format could be.
    #[error("key is too long (at most {max} bytes)")]
    TooLong {
        /// Longest valid length.
        max: usize,
    },
    /// The input does not start with the format's `{name}_` (or, for a
    /// [`FormatSet`], with any registered format's).
    #[error("key does not start with a known prefix")]
    UnknownPrefix,
    /// The environment segment is not one the format accepts.
    #[error("unknown environment")]
    InvalidEnvironment,
    /// The region segment is not two lowercase ASCII letters.
    #[error("region must be two lowercase ASCII letters")]
    InvalidRegion,
    /// A `_` separator is missing after a part.
    #[error("missing `_` after the {after}")]
    MissingSeparator {
        /// The part the separator should follow.
        after: Part,
    },
    /// A part has the wrong number of characters.
    #[error("{part} must be {expected} characters, found {found}")]
    WrongLength {
        /// The part.
        part: Part,
        /// Its required length.
        expected: usize,
        /// Its length in the input.
        found: usize,
    },
    /// A byte outside the part's alphabet (the byte itself is not reported).
    #[error("invalid character in the {part} at byte {offset}")]
    InvalidCharacter {
        /// The part.
        part: Part,
        /// Byte offset into the key.
        offset: usize,
    },
    /// The checksum suffix does not match the rest of the key: a typo or a
    /// forgery, caught without asking any store.
    #[error("checksum mismatch")]
    ChecksumMismatch,
}

/// Why a format definition is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The name is not 1 to 16 lowercase ASCII letters or digits starting with a letter.
    #[error(
        "format name must be 1 to 16 lowercase ASCII letters or digits, starting with a letter"
    )]
    Name,
    /// An environment list is empty or repeats a name.
    #[error("environment list must be non-empty and without repeats")]
    Environments,
    /// The key id length is outside 1 to 32.
    #[error("key id length must be 1 to {max}")]
    KeyIdLength {
        /// Longest key id.
        max: usize,
    },
    /// The secret, less the characters its hint shows, has fewer than 128
    /// bits of entropy, or the secret has more than 128 characters.
    #[error(
        "secret must carry at least 128 bits besides what its hint shows, and be at most 128 characters"
    )]
    SecretStrength,
    /// The hint would show more than a quarter of the secret, or more than 8 characters.
    #[error("hint may show at most 8 characters and a quarter of the secret")]
    HintTooLong,
    /// Two formats in a set have prefixes that can be confused.
    #[error("format prefixes overlap")]
    OverlappingPrefixes,
}

/// Why minting failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MintError {
    /// The requested environment is not one the format accepts, or the
    /// format has no environment segment.
    #[error("environment not accepted by this format")]
    Environment,
    /// A region was requested for a format without a region segment.
    #[error("this format has no region segment")]
    Region,
    /// The random number generator failed, or yields only bytes the
    /// alphabet rejects (a generator stuck on one value).
    #[error("random number generator failed")]
    Rng,
}

/// Optional checksum appended to the secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Checksum {
    /// CRC32 (IEEE) of everything before it, written in the secret's
    /// alphabet with a fixed width (6 characters for base62, 8 for hex), as
    /// GitHub's token format does.
    Crc32,
}

/// A key grammar. Build one with [`KeyFormat::builder`], or use the presets
/// [`NHK`], [`NHM`], [`NK`], [`SK`], [`NH`].
///
/// ```
/// use keygate::format::{Alphabet, KeyFormat, Environment};
///
/// const ENVS: &[Environment] = &[Environment::LIVE, Environment::TEST];
/// const ACME: KeyFormat = KeyFormat::builder("acme")
///     .environments(ENVS)
///     .secret(&Alphabet::BASE62, 30)
///     .crc32()
///     .build_unwrap();
///
/// let key = ACME.mint_default().unwrap();
/// let parsed = ACME.parse(key.expose_secret()).unwrap();
/// assert_eq!(parsed.environment(), Some(Environment::LIVE));
/// assert_eq!(key.expose_secret().len(), "acme_live_".len() + 30 + 6);
/// ```
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyFormat {
    name: &'static str,
    segment: Segment,
    key_id: Option<(&'static Alphabet, u8)>,
    secret: &'static Alphabet,
    secret_len: u8,
    checksum: Option<Checksum>,
    hint_chars: u8,
}

/// Builder for a [`KeyFormat`]; every method is `const` so formats can be
/// constants checked at compile time.
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct KeyFormatBuilder(KeyFormat);

impl KeyFormatBuilder {
    /// Adds an environment segment accepting `envs`; the first is the default.
    pub const fn environments(mut self, envs: &'static [Environment]) -> Self {
        self.0.segment = Segment::Environments(envs);
        self
    }

    /// Adds a two-letter region segment.
    pub const fn region(mut self) -> Self {
        self.0.segment = Segment::Region;
        self
    }

    /// Adds a public key id of `len` characters from `alphabet`. The hint then
    /// shows the id instead of secret characters.
    pub const fn key_id(mut self, alphabet: &'static Alphabet, len: u8) -> Self {
        self.0.key_id = Some((alphabet, len));
        self.0.hint_chars = 0;
        self
    }

    /// The secret: `len` characters from `alphabet` (default: 32 base62).
    pub const fn secret(mut self, alphabet: &'static Alphabet, len: u8) -> Self {
        self.0.secret = alphabet;
        self.0.secret_len = len;
        self
    }

    /// Appends a CRC32 checksum to the secret.
    pub const fn crc32(mut self) -> Self {
        self.0.checksum = Some(Checksum::Crc32);
        self
    }

    /// How many leading secret characters the hint shows (default 4; 0 when
    /// the format has a key id). They are public (key listings show the
    /// hint), so [`build`](Self::build) counts the secret's 128 bits
    /// without them.
    pub const fn hint_chars(mut self, n: u8) -> Self {
        self.0.hint_chars = n;
        self
    }

    /// Checks the whole definition.
    ///
    /// # Errors
    ///
    /// A [`FormatError`] naming the first rule broken.
    pub const fn build(self) -> Result<KeyFormat, FormatError> {
        let f = self.0;
        if !Environment::is_valid(f.name.as_bytes()) {
            return Err(FormatError::Name);
        }
        if let Segment::Environments(envs) = f.segment {
            if envs.is_empty() {
                return Err(FormatError::Environments);
            }
            let mut i = 0;
            while i < envs.len() {
                let mut j = i + 1;
                while j < envs.len() {
                    if envs[i].const_eq(&envs[j]) {
                        return Err(FormatError::Environments);
                    }
                    j += 1;
                }
                i += 1;
            }
        }
        if let Some((_, len)) = f.key_id
            && (len == 0 || len as usize > KeyId::MAX_LEN)
        {
            return Err(FormatError::KeyIdLength { max: KeyId::MAX_LEN });
        }
        // The characters the hint shows are public (listings, logs): the
        // rest must carry the 128 bits. In integers: n * log2(k) >= 128
        // <=>  k^n >= 2^128.
        let shown = if f.key_id.is_some() { 0 } else { f.hint_chars };
        let hidden = f.secret_len.saturating_sub(shown);
        if f.secret_len > 128 || !pow_at_least_2_128(f.secret.len() as u128, hidden) {
            return Err(FormatError::SecretStrength);
        }
        if f.hint_chars > 8 || (f.hint_chars as usize) * 4 > f.secret_len as usize {
            return Err(FormatError::HintTooLong);
        }
        Ok(f)
    }

    /// [`build`](Self::build) for constants: panics (at compile time in a
    /// `const`) when the definition is invalid.
    ///
    /// # Panics
    ///
    /// When [`build`](Self::build) would return an error.
    #[must_use]
    pub const fn build_unwrap(self) -> KeyFormat {
        match self.build() {
            Ok(f) => f,
            Err(_) => panic!("invalid key format"),
        }
    }
}

const fn pow_at_least_2_128(k: u128, n: u8) -> bool {
    let mut acc: u128 = 1;
    let mut i = 0;
    while i < n {
        match acc.checked_mul(k) {
            Some(v) => acc = v,
            None => return true, // passed 2^128 - 1
        }
        i += 1;
    }
    false
}

/// The public parts found by [`KeyFormat::parse_bytes`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Parts {
    pub(crate) environment: Option<Environment>,
    pub(crate) region: Option<Region>,
    pub(crate) key_id: Option<KeyId>,
    /// Byte offset of the secret within the key.
    pub(crate) secret_start: u16,
}

/// What to mint: the environment and region, where the format has them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MintSpec {
    environment: Option<Environment>,
    region: Option<Region>,
}

impl MintSpec {
    /// The format's defaults: its first environment, region `us`.
    #[must_use]
    pub const fn new() -> Self {
        Self { environment: None, region: None }
    }

    /// Mint for `env`.
    #[must_use]
    pub const fn environment(mut self, env: Environment) -> Self {
        self.environment = Some(env);
        self
    }

    /// Mint for `region`.
    #[must_use]
    pub const fn region(mut self, region: Region) -> Self {
        self.region = Some(region);
        self
    }
}

impl KeyFormat {
    /// Starts a format named `name` (its keys begin `{name}_`), with a
    /// 32-character base62 secret, no segment, no key id, no checksum, and a
    /// 4-character hint.
    pub const fn builder(name: &'static str) -> KeyFormatBuilder {
        KeyFormatBuilder(Self {
            name,
            segment: Segment::None,
            key_id: None,
            secret: &Alphabet::BASE62,
            secret_len: 32,
            checksum: None,
            hint_chars: 4,
        })
    }

    /// The format's name, e.g. `nhk`.
    #[must_use]
    pub const fn name(&self) -> &'static str {
        self.name
    }

    /// How many `_` a key of this format has: after its name, after its
    /// region or environment, and after its key id.
    pub(crate) const fn separators(&self) -> usize {
        let segment = !matches!(self.segment, Segment::None);
        1 + segment as usize + self.key_id.is_some() as usize
    }

    /// The environment or region segment.
    #[must_use]
    pub const fn segment(&self) -> Segment {
        self.segment
    }

    /// Alphabet and length of the key id, if the format has one.
    #[must_use]
    pub const fn key_id_spec(&self) -> Option<(&'static Alphabet, u8)> {
        self.key_id
    }

    /// The secret's alphabet.
    #[must_use]
    pub const fn secret_alphabet(&self) -> &'static Alphabet {
        self.secret
    }

    /// Number of secret characters (without checksum).
    #[must_use]
    pub const fn secret_len(&self) -> usize {
        self.secret_len as usize
    }

    /// The checksum, if any.
    #[must_use]
    pub const fn checksum(&self) -> Option<Checksum> {
        self.checksum
    }

    /// Entropy of the secret in bits.
    #[must_use]
    pub fn secret_bits(&self) -> f64 {
        self.secret.bits(self.secret_len())
    }

    const fn checksum_len(&self) -> usize {
        match self.checksum {
            Some(Checksum::Crc32) => self.secret.u32_width(),
            None => 0,
        }
    }

    /// Length of the fixed tail: `[{key id}_]{secret}{checksum}`.
    const fn tail_len(&self) -> usize {
        let id = match self.key_id {
            Some((_, n)) => n as usize + 1,
            None => 0,
        };
        id + self.secret_len as usize + self.checksum_len()
    }

    /// Shortest and longest key of this format, in bytes.
    #[must_use]
    pub fn len_range(&self) -> (usize, usize) {
        let head = self.name.len() + 1;
        let (lo, hi) = match self.segment {
            Segment::None => (0, 0),
            Segment::Region => (3, 3),
            Segment::Environments(envs) => {
                let lens = envs.iter().map(|e| e.len() + 1);
                (lens.clone().min().unwrap_or(0), lens.max().unwrap_or(0))
            }
        };
        (head + lo + self.tail_len(), head + hi + self.tail_len())
    }

    /// Parses `s` as a key of this format. Exact: no trimming, no case
    /// folding; the error says what is wrong and never contains the input.
    ///
    /// # Errors
    ///
    /// A [`ParseError`] for the first rule `s` breaks.
    pub fn parse(&self, s: &str) -> Result<ApiKey, ParseError> {
        let parts = self.parse_bytes(s.as_bytes())?;
        Ok(self.build_key(s, parts))
    }

    fn build_key(&self, s: &str, p: Parts) -> ApiKey {
        ApiKey {
            format: *self,
            environment: p.environment,
            region: p.region,
            key_id: p.key_id,
            secret_start: p.secret_start,
            key: SecretString::from(s.to_owned()),
        }
    }

    /// Whether `environment` and `region` (a stored record's) are those
    /// of `key`, a key that [`parse_bytes`](Self::parse_bytes) accepted,
    /// for whichever segment the format has: read from the key's text, so
    /// a caller holds no parsed parts across its awaits. A format without
    /// a segment agrees with anything (its records' environment is the
    /// host's to set).
    pub(crate) fn segment_agrees(
        &self,
        key: &[u8],
        environment: Option<Environment>,
        region: Option<Region>,
    ) -> bool {
        let rest = key.get(self.name.len() + 1..).unwrap_or_default();
        match self.segment {
            Segment::None => true,
            Segment::Region => {
                region.is_some_and(|r| starts_with_segment(rest, r.as_str().as_bytes()))
            }
            Segment::Environments(_) => {
                environment.is_some_and(|e| starts_with_segment(rest, e.as_bytes()))
            }
        }
    }

    /// The non-secret hint of a key that [`parse_bytes`](Self::parse_bytes)
    /// accepted. Shared by [`ApiKey::hint`] and the scanner.
    pub(crate) fn hint_of<'k>(&self, key: &'k [u8], parts: &Parts) -> &'k [u8] {
        let start = usize::from(parts.secret_start);
        match parts.key_id {
            // `…_{id}_` : drop the trailing separator.
            Some(_) => &key[..start - 1],
            None => &key[..start + usize::from(self.hint_chars)],
        }
    }

    /// Checks the whole grammar without allocating; the scanner uses this
    /// so that scan results and [`parse`](Self::parse) agree by construction.
    #[inline]
    pub(crate) fn parse_bytes(&self, b: &[u8]) -> Result<Parts, ParseError> {
        let (_, max) = self.len_range();
        if b.is_empty() {
            return Err(ParseError::Empty);
        }
        if b.len() > max {
            return Err(ParseError::TooLong { max });
        }
        let name = self.name.as_bytes();
        if !starts_with_segment(b, name) {
            return Err(ParseError::UnknownPrefix);
        }
        let mut pos = name.len() + 1;
        let mut environment = None;
        let mut region = None;
        match self.segment {
            Segment::None => {}
            Segment::Region => {
                let seg = b.get(pos..pos + 2).ok_or(ParseError::InvalidRegion)?;
                if !Region::is_valid(seg) {
                    return Err(ParseError::InvalidRegion);
                }
                region = Some(Region::from_validated(seg));
                pos = expect_sep(b, pos + 2, Part::Region)?;
            }
            Segment::Environments(envs) => {
                let rest = &b[pos..];
                let env = envs
                    .iter()
                    .find(|e| starts_with_segment(rest, e.as_bytes()))
                    .ok_or(ParseError::InvalidEnvironment)?;
                environment = Some(*env);
                pos += env.len() + 1;
            }
        }
        let mut key_id = None;
        if let Some((alphabet, len)) = self.key_id {
            let len = usize::from(len);
            let end = pos + len;
            // No `_` after the key id is its own error, whatever is left: a
            // stand-in length could equal the key id's and walk past the end.
            let Some(found) = b[pos..].iter().position(|&c| c == b'_') else {
                return Err(ParseError::MissingSeparator { after: Part::KeyId });
            };
            if found != len {
                return Err(ParseError::WrongLength { part: Part::KeyId, expected: len, found });
            }
            check_alphabet(b, pos, end, alphabet, Part::KeyId)?;
            key_id = Some(KeyId::from_validated(&b[pos..end]));
            pos = end + 1;
        }
        let secret_start = pos;
        let tail = b.len() - pos;
        let want = self.secret_len() + self.checksum_len();
        if tail != want {
            return Err(ParseError::WrongLength {
                part: Part::Secret,
                expected: want,
                found: tail,
            });
        }
        let secret_end = pos + self.secret_len();
        check_alphabet(b, pos, secret_end, self.secret, Part::Secret)?;
        if let Some(Checksum::Crc32) = self.checksum {
            check_alphabet(b, secret_end, b.len(), self.secret, Part::Checksum)?;
            // 32 characters encode a u32 in the smallest (2-character)
            // alphabet; decimal needs 10, hex 8, base62 6.
            let mut expect = [0u8; 32];
            let expect = &mut expect[..self.checksum_len()];
            self.secret.encode_u32(crc32fast::hash(&b[..secret_end]), expect);
            if expect != &b[secret_end..] {
                return Err(ParseError::ChecksumMismatch);
            }
        }
        Ok(Parts { environment, region, key_id, secret_start: secret_start as u16 })
    }

    /// Mints a key with the OS CSPRNG for the format's default environment
    /// and region.
    ///
    /// # Errors
    ///
    /// [`MintError::Rng`] if the operating system's generator fails.
    pub fn mint_default(&self) -> Result<ApiKey, MintError> {
        self.mint(MintSpec::new())
    }

    /// Mints a key with the OS CSPRNG.
    ///
    /// # Errors
    ///
    /// [`MintError`] when `spec` asks for an environment or region the format
    /// does not have, or the OS generator fails.
    pub fn mint(&self, spec: MintSpec) -> Result<ApiKey, MintError> {
        self.mint_with_rng(spec, &mut OsBatch::new(self.random_bytes()))
    }

    /// Random bytes a mint of this format almost always consumes (one
    /// system call's worth for [`OsBatch`]).
    pub(crate) const fn random_bytes(&self) -> usize {
        let key_id = match self.key_id {
            Some((alphabet, len)) => alphabet.bytes_for(len as usize),
            None => 0,
        };
        key_id + self.secret.bytes_for(self.secret_len())
    }

    /// Mints a key with `rng`. The full key is in the returned value, and only
    /// there: show it to its owner once and store [`ApiKey`]'s digest.
    ///
    /// `rng` is asked, part by part, for as many bytes as characters are
    /// still missing (rejection sampling), so a generator that makes a
    /// system call per request is better used through
    /// [`mint`](Self::mint), which batches them.
    ///
    /// # Errors
    ///
    /// As [`mint`](Self::mint); [`MintError::Rng`] when `rng` fails.
    pub fn mint_with_rng<R: TryCryptoRng + ?Sized>(
        &self,
        spec: MintSpec,
        rng: &mut R,
    ) -> Result<ApiKey, MintError> {
        let (_, max) = self.len_range();
        let mut out = Vec::with_capacity(max);
        out.extend_from_slice(self.name.as_bytes());
        out.push(b'_');
        let (mut environment, mut region) = (None, None);
        match self.segment {
            Segment::None => {}
            Segment::Region => {
                let r = spec.region.unwrap_or(Region::US);
                out.extend_from_slice(r.as_str().as_bytes());
                out.push(b'_');
                region = Some(r);
            }
            Segment::Environments(envs) => {
                let e = match spec.environment {
                    None => envs[0],
                    Some(e) if envs.contains(&e) => e,
                    Some(_) => return Err(MintError::Environment),
                };
                out.extend_from_slice(e.as_bytes());
                out.push(b'_');
                environment = Some(e);
            }
        }
        if spec.region.is_some() && !matches!(self.segment, Segment::Region) {
            return Err(MintError::Region);
        }
        if spec.environment.is_some() && !matches!(self.segment, Segment::Environments(_)) {
            return Err(MintError::Environment);
        }
        let mut key_id = None;
        if let Some((alphabet, len)) = self.key_id {
            let start = out.len();
            out.resize(start + usize::from(len), 0);
            alphabet.fill(rng, &mut out[start..]).map_err(|_| MintError::Rng)?;
            key_id = Some(KeyId::from_validated(&out[start..]));
            out.push(b'_');
        }
        let secret_start = out.len();
        out.resize(secret_start + self.secret_len(), 0);
        if self.secret.fill(rng, &mut out[secret_start..]).is_err() {
            zeroize::Zeroize::zeroize(&mut out);
            return Err(MintError::Rng);
        }
        if let Some(Checksum::Crc32) = self.checksum {
            let crc = crc32fast::hash(&out);
            let start = out.len();
            out.resize(start + self.checksum_len(), 0);
            self.secret.encode_u32(crc, &mut out[start..]);
        }
        debug_assert!(out.len() <= max);
        // Every byte pushed is ASCII from a validated alphabet or name.
        let key = String::from_utf8(out).map_err(|_| MintError::Rng)?;
        Ok(ApiKey {
            format: *self,
            environment,
            region,
            key_id,
            secret_start: secret_start as u16,
            key: SecretString::from(key),
        })
    }
}

fn expect_sep(b: &[u8], pos: usize, after: Part) -> Result<usize, ParseError> {
    if b.get(pos) == Some(&b'_') {
        Ok(pos + 1)
    } else {
        Err(ParseError::MissingSeparator { after })
    }
}

/// The longest key any of `formats` can have.
fn longest(formats: &[KeyFormat]) -> usize {
    formats.iter().map(|f| f.len_range().1).max().unwrap_or(0)
}

/// Whether `b` starts with `seg` followed by `_`. The separator is checked
/// first, so most mismatches cost one byte; the few bytes of a prefix are
/// compared inline rather than through a `memcmp` call.
#[inline]
fn starts_with_segment(b: &[u8], seg: &[u8]) -> bool {
    b.get(seg.len()) == Some(&b'_') && b.iter().zip(seg).all(|(x, y)| x == y)
}

fn check_alphabet(
    b: &[u8],
    start: usize,
    end: usize,
    alphabet: &Alphabet,
    part: Part,
) -> Result<(), ParseError> {
    let part_bytes = &b[start..end];
    // No early exit on the valid path: one lookup per byte, no branch.
    if part_bytes.iter().fold(true, |ok, &c| ok & alphabet.contains(c)) {
        return Ok(());
    }
    let i = part_bytes.iter().position(|&c| !alphabet.contains(c)).unwrap_or(0);
    Err(ParseError::InvalidCharacter { part, offset: start + i })
}

impl fmt::Debug for KeyFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyFormat")
            .field("name", &self.name)
            .field("segment", &self.segment)
            .field("key_id", &self.key_id)
            .field("secret", &self.secret)
            .field("secret_len", &self.secret_len)
            .field("checksum", &self.checksum)
            .finish_non_exhaustive()
    }
}

/// A parsed or freshly minted key: its format and public parts, and the
/// whole key string as a secret.
///
/// There is no `Display`, `PartialEq` or `Serialize`; the key string is
/// reached only through [`ApiKey::expose_secret`].
#[derive(Clone)]
pub struct ApiKey {
    format: KeyFormat,
    environment: Option<Environment>,
    region: Option<Region>,
    key_id: Option<KeyId>,
    secret_start: u16,
    key: SecretString,
}

impl ApiKey {
    /// The format the key belongs to.
    #[must_use]
    pub const fn format(&self) -> &KeyFormat {
        &self.format
    }

    /// The environment, for formats with an environment segment.
    #[must_use]
    pub const fn environment(&self) -> Option<Environment> {
        self.environment
    }

    /// The region, for formats with a region segment.
    #[must_use]
    pub const fn region(&self) -> Option<Region> {
        self.region
    }

    /// The public key id, for formats that have one.
    #[must_use]
    pub const fn key_id(&self) -> Option<KeyId> {
        self.key_id
    }

    /// The whole key string. The one way to the plaintext: show it to its
    /// owner once (at minting) and hash it; never log or store it.
    #[must_use]
    pub fn expose_secret(&self) -> &str {
        self.key.expose_secret()
    }

    /// The non-secret display form, e.g. `nhk_us_3f9a`, `nk_live_Ab12CdEf`,
    /// `sk_live_abc`: the prefix and segment, then the key id if the format
    /// has one, else the first few secret characters.
    #[must_use]
    pub fn hint(&self) -> SmolStr {
        let parts = Parts {
            environment: self.environment,
            region: self.region,
            key_id: self.key_id,
            secret_start: self.secret_start,
        };
        let hint = self.format.hint_of(self.key.expose_secret().as_bytes(), &parts);
        // A parsed key is ASCII, so never the empty default: one check,
        // one copy (a lossy UTF-8 view walked it a second time), inline up
        // to 23 bytes.
        SmolStr::new(std::str::from_utf8(hint).unwrap_or_default())
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("format", &self.format.name)
            .field("environment", &self.environment)
            .field("region", &self.region)
            .field("key_id", &self.key_id)
            .field("hint", &self.hint())
            .finish_non_exhaustive()
    }
}

/// Parses against the five presets.
impl FromStr for ApiKey {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FormatSet::presets().parse(s)
    }
}

/// A set of formats with distinct prefixes: parses a key of any of them.
///
/// ```
/// use keygate::format::FormatSet;
///
/// let set = FormatSet::presets();
/// let key = set.get("sk").unwrap().mint_default().unwrap();
/// assert_eq!(set.parse(key.expose_secret()).unwrap().format().name(), "sk");
/// ```
#[derive(Debug, Clone)]
pub struct FormatSet {
    formats: Vec<KeyFormat>,
    max_len: usize,
}

impl FormatSet {
    /// The five presets: `nhk`, `nhm`, `nk`, `sk`, `nh`.
    #[must_use]
    pub fn presets() -> Self {
        let formats = vec![NHK, NHM, NK, SK, NH];
        // Computed, not a hand-kept constant: the scanner's length table
        // relies on it being exact.
        Self { max_len: longest(&formats), formats }
    }

    /// A set of `formats`.
    ///
    /// # Errors
    ///
    /// [`FormatError::OverlappingPrefixes`] when two formats share a name.
    /// (Prefixes end in `_`, which names never contain, so distinct names
    /// can never be confused.)
    pub fn new(formats: impl IntoIterator<Item = KeyFormat>) -> Result<Self, FormatError> {
        let formats: Vec<KeyFormat> = formats.into_iter().collect();
        for (i, a) in formats.iter().enumerate() {
            if formats[i + 1..].iter().any(|b| b.name == a.name) {
                return Err(FormatError::OverlappingPrefixes);
            }
        }
        Ok(Self { max_len: longest(&formats), formats })
    }

    /// This set and `format` (the presets and a host's own, say).
    ///
    /// ```
    /// use keygate::format::{FormatSet, KeyFormat};
    ///
    /// const ACME: KeyFormat = KeyFormat::builder("acme").build_unwrap();
    /// let set = FormatSet::presets().with(ACME)?;
    /// assert!(set.get("acme").is_some() && set.get("sk").is_some());
    /// assert!(set.with(ACME).is_err(), "a name is taken once");
    /// # Ok::<(), keygate::format::FormatError>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`FormatError::OverlappingPrefixes`] when the set has a format of
    /// that name.
    pub fn with(&self, format: KeyFormat) -> Result<Self, FormatError> {
        Self::new(self.formats.iter().copied().chain([format]))
    }

    /// The formats, in the order given.
    #[must_use]
    pub fn formats(&self) -> &[KeyFormat] {
        &self.formats
    }

    /// The format named `name`.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&KeyFormat> {
        self.formats.iter().find(|f| f.name == name)
    }

    /// Longest key of any format in the set.
    #[must_use]
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The format whose `{name}_` prefix `s` starts with.
    #[must_use]
    pub fn format_of(&self, s: &[u8]) -> Option<&KeyFormat> {
        self.formats.iter().find(|f| starts_with_segment(s, f.name.as_bytes()))
    }

    /// Parses `s` as a key of whichever format its prefix names.
    ///
    /// # Errors
    ///
    /// [`ParseError::UnknownPrefix`] when no format's prefix matches, else
    /// the matching format's [`ParseError`].
    pub fn parse(&self, s: &str) -> Result<ApiKey, ParseError> {
        let (format, parts) = self.parse_parts(s.as_bytes())?;
        Ok(format.build_key(s, parts))
    }

    /// [`parse`](Self::parse) without building an [`ApiKey`]: no allocation.
    pub(crate) fn parse_parts(&self, b: &[u8]) -> Result<(&KeyFormat, Parts), ParseError> {
        if b.is_empty() {
            return Err(ParseError::Empty);
        }
        if b.len() > self.max_len.max(1) {
            return Err(ParseError::TooLong { max: self.max_len });
        }
        let format = self.format_of(b).ok_or(ParseError::UnknownPrefix)?;
        Ok((format, format.parse_bytes(b)?))
    }
}

#[cfg(test)]
mod tests;
