//! Find keys of any registered format in arbitrary bytes, and redact them.
//!
//! Both work in one pass and stream: constant memory for any input size,
//! keys that straddle read boundaries still found.

use std::fmt;
use std::io::{self, Read, Write};

use aho_corasick::{AhoCorasick, Input, MatchKind, Span, packed};

use crate::format::{FormatSet, KeyFormat, Segment};

/// What the redactor writes after a key's hint.
pub const REDACTED: &[u8] = b"[REDACTED]";

/// Bytes read from the input per step when streaming.
const CHUNK: usize = 64 * 1024;

/// One key found in the input. Holds the hint, never the key.
#[derive(Clone, PartialEq, Eq)]
pub struct Match {
    offset: u64,
    len: usize,
    line: u64,
    column: u64,
    format: &'static str,
    hint: String,
}

impl Match {
    /// Byte offset of the key's first byte from the start of the input.
    #[must_use]
    pub const fn offset(&self) -> u64 {
        self.offset
    }

    /// Length of the key in bytes.
    #[must_use]
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Always `false`: a match is a whole key.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        false
    }

    /// 1-based line number (lines end at `\n`).
    #[must_use]
    pub const fn line(&self) -> u64 {
        self.line
    }

    /// 1-based byte column within the line.
    #[must_use]
    pub const fn column(&self) -> u64 {
        self.column
    }

    /// Name of the key's format, e.g. `nhk`.
    #[must_use]
    pub const fn format(&self) -> &'static str {
        self.format
    }

    /// The key's non-secret hint, e.g. `nhk_us_3f9a`.
    #[must_use]
    pub fn hint(&self) -> &str {
        &self.hint
    }
}

impl fmt::Debug for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Match")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .field("line", &self.line)
            .field("column", &self.column)
            .field("format", &self.format)
            .field("hint", &self.hint)
            .finish()
    }
}

/// Finds keys of a [`FormatSet`] in bytes.
///
/// A candidate counts only when the byte before it and the byte after it are
/// not ASCII letters, digits or `_` (or it touches the start or end of the
/// input; the word bytes of an escape of a non-word character right
/// before a key do not count — C's one-letter escapes (`\n`, `\t`, `\r`,
/// `\b`, `\f`, `\a`, `\v`, `\e`, `\0`), its three-digit octal (`\075`),
/// `\xXX`, `\uXXXX` and URL escapes (`%20`, or twice: `%253D`) — where
/// `%5F`, an `_`, does), and the whole token parses as a key of its
/// format — so scanning and [`KeyFormat::parse`] agree by construction.
///
/// ```
/// use keygate::scan::Scanner;
///
/// let key = keygate::format::NH.mint_default().unwrap();
/// let log = format!("GET /ping key={} 200\n", key.expose_secret());
/// let scanner = Scanner::presets();
/// let found = scanner.find_all(log.as_bytes());
/// assert_eq!(found.len(), 1);
/// assert_eq!(found[0].hint(), key.hint());
///
/// let mut out = Vec::new();
/// scanner.redact(log.as_bytes(), &mut out).unwrap();
/// assert_eq!(out, format!("GET /ping key={}[REDACTED] 200\n", key.hint()).into_bytes());
/// ```
///
/// # How it searches
///
/// Keys hold word bytes only (ASCII letters, digits, `_`), and the boundary
/// rule puts a non-word byte (or an escape) or the edge of the input on both
/// sides, so a key is always a whole run of word bytes — and a long one: no valid format has
/// keys under 24 bytes (a secret carries 128 bits in symbols of at most 62
/// values), no preset under 40. A key also starts with a literal prefix
/// (`nh_`, `sk_live_`, …). The scanner looks for either, span by span, and
/// switches to the other when the one it uses keeps finding candidates that
/// are not keys:
///
/// - *runs*: tests 16-byte groups, a few vector instructions each, spaced so
///   that every run as long as the shortest key contains one, and looks
///   closer only at long runs. Fast on ordinary logs, whose words are short
///   but full of look-alike prefixes (`nh_count`, `sk_total`). Redacting
///   looks at shorter runs (damaged keys), too short for spaced groups:
///   it reads the runs off a bit mask of the word bytes instead.
/// - *prefixes*: a SIMD multi-literal search (Teddy). Fast on logs full of
///   hashes and trace ids, which are long runs without prefixes.
///
/// Either way a candidate is a whole run of a length some format has, is
/// matched against the formats' literal prefixes, and is parsed. Redacting
/// also hides keys glued on after word bytes: a run at least as long as
/// the shortest key is searched for prefixes inside it with the same
/// searcher, once (a key is parsed only where a prefix starts).
#[derive(Clone)]
pub struct Scanner {
    formats: FormatSet,
    /// The literal prefixes of [`literal_prefixes`]: a run that starts with
    /// `prefixes[i]` can only be a key of format `owners[i]`.
    prefixes: Vec<Box<[u8]>>,
    /// Pattern `i` belongs to format `owners[i]`.
    owners: Vec<usize>,
    /// Finds the `prefixes` in the input.
    searcher: Prefixes,
    /// Longest of the `prefixes`.
    longest_prefix: usize,
    /// `lengths[n]`: some format has keys of `n` bytes (a superset is fine:
    /// the parser decides).
    lengths: Vec<bool>,
    /// Shortest key of any format; 0 for an empty set.
    min_len: usize,
    max_len: usize,
    /// Bytes read per streaming step.
    chunk: usize,
    tuning: Tuning,
    /// [`min_len`](Self::min_len) when redacting: damaged keys (see
    /// [`suspect`]) may be shorter than any whole one, down to a literal
    /// prefix plus [`SUSPECT_MIN`].
    hiding_min_len: usize,
    /// `opens[b]`: some literal prefix starts with the byte `b`.
    opens: [bool; 256],
}

/// What one pass looks for: runs from `min_len` bytes, and whether runs
/// that look like damaged keys count too ([`Scanner::redact`] errs towards
/// hiding; finding reports whole keys only).
#[derive(Clone, Copy)]
struct Mode {
    min_len: usize,
    suspects: bool,
}

/// How far a block's search decides.
struct Reach {
    /// The keys starting before it (and the keys glued on before it) are
    /// the block's; the others are the next block's.
    limit: usize,
    /// A chain of keys each starting inside the one before
    /// ([`Scanner::chain`]) is followed to the keys starting before it
    /// only, in a run that reaches the end of the bytes at hand: one
    /// starting further on might end past them. `usize::MAX` when no
    /// input follows them.
    horizon: usize,
    /// Set when a chain was cut at the `horizon` (its report ends there):
    /// the end of the keys that start before it, to which hiding goes on.
    /// The next block follows the chain from the horizon.
    chained: Option<usize>,
}

impl Reach {
    /// The keys starting before `limit`, in bytes that no input follows.
    const fn whole(limit: usize) -> Self {
        Self { limit, horizon: usize::MAX, chained: None }
    }

    /// Takes a chain's `(stop, covered)` ([`Scanner::chain`]): notes a
    /// chain cut at the horizon (`stop < covered`) and returns where its
    /// report stops.
    const fn follow(&mut self, (stop, covered): (usize, usize)) -> usize {
        if stop < covered {
            self.chained = Some(covered);
        }
        stop
    }
}

/// How the scanner finds candidates in the next span of input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Search {
    /// Runs of word bytes at least as long as the shortest key.
    Runs,
    /// The formats' literal prefixes.
    Prefixes,
}

/// When the scanner switches between [`Search`] modes.
#[derive(Clone, Copy, Debug)]
struct Tuning {
    /// The mode of the first span.
    start: Search,
    /// Bytes of input per decision.
    span: usize,
    /// Switch from [`Search::Runs`] after more wasted candidates than this
    /// in a span.
    runs_waste: usize,
    /// Switch from [`Search::Prefixes`] after more than this.
    prefixes_waste: usize,
}

/// A wasted candidate costs about 15 ns in runs mode and 35 ns in prefix
/// mode; a 4 KiB span costs about 300 ns in either when nothing is found.
/// Switching at roughly that much waste keeps each mode near its best, and
/// a key-dense input (where both find mostly keys) in runs mode.
const TUNING: Tuning =
    Tuning { start: Search::Runs, span: 4096, runs_waste: 32, prefixes_waste: 8 };

impl fmt::Debug for Scanner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scanner").field("formats", &self.formats).finish_non_exhaustive()
    }
}

/// The prefix searcher: SIMD Teddy where the CPU has it, else an
/// Aho-Corasick automaton, over the literal prefixes of [`literal_prefixes`].
///
/// Teddy fingerprints the first three bytes of each prefix (`nhk`, `nk_`,
/// `sk_`, …), which is far more selective on real logs than the automaton's
/// default rare-byte prefilter: `_`, `n` and `k` are common in log text.
#[derive(Clone, Debug)]
enum Prefixes {
    Packed(packed::Searcher),
    Automaton(AhoCorasick),
}

impl Prefixes {
    fn new(prefixes: &[String]) -> Self {
        let mut cfg = packed::Config::new();
        cfg.match_kind(packed::MatchKind::LeftmostFirst);
        if let Some(s) = cfg.builder().extend(prefixes).build() {
            return Self::Packed(s);
        }
        // Prefixes end in `_`, which no name contains, so no prefix is a
        // proper prefix of another: leftmost-first and leftmost-longest agree.
        let ac = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostFirst)
            .build(prefixes)
            .expect("a handful of short prefixes always builds");
        Self::Automaton(ac)
    }

    /// The first prefix within `hay[from..to]`: (start, end).
    #[inline]
    fn find(&self, hay: &[u8], from: usize, to: usize) -> Option<(usize, usize)> {
        match self {
            Self::Packed(s) => s.find_in(hay, Span::from(from..to)).map(|m| (m.start(), m.end())),
            Self::Automaton(ac) => {
                ac.find(Input::new(hay).range(from..to)).map(|m| (m.start(), m.end()))
            }
        }
    }
}

/// The literal prefixes a key can start with, and the format each belongs to.
///
/// A format with environments contributes `{name}_{env}_` for each (so
/// `sk_live_` and `sk_test_`): words like `sk_total` in ordinary logs are
/// then rejected inside the SIMD search instead of costing a parse. Falls
/// back to `{name}_` alone when the expansion would exceed the packed
/// searcher's pattern budget.
fn literal_prefixes(formats: &FormatSet) -> (Vec<String>, Vec<usize>) {
    const PACKED_MAX: usize = 64;
    let expanded = formats
        .formats()
        .iter()
        .map(|f| match f.segment() {
            Segment::Environments(envs) => envs.len(),
            _ => 1,
        })
        .sum::<usize>();
    let mut patterns = Vec::with_capacity(expanded);
    let mut owners = Vec::with_capacity(expanded);
    for (i, f) in formats.formats().iter().enumerate() {
        match f.segment() {
            Segment::Environments(envs) if expanded <= PACKED_MAX => {
                for env in envs {
                    patterns.push(format!("{}_{}_", f.name(), env.as_str()));
                    owners.push(i);
                }
            }
            _ => {
                patterns.push(format!("{}_", f.name()));
                owners.push(i);
            }
        }
    }
    (patterns, owners)
}

/// Whether `b` is an ASCII letter, digit or `_`, without branches or tables
/// so that loops over it vectorize (hence `|`, not `||`).
#[inline]
#[allow(clippy::needless_bitwise_bool)]
const fn is_word(b: u8) -> bool {
    ((b | 0x20).wrapping_sub(b'a') < 26) | (b.wrapping_sub(b'0') < 10) | (b == b'_')
}

/// Bytes the run search tests at once: one SSE2 or NEON register.
const GROUP: usize = 16;

/// Whether every byte of `group` is a word byte. Compiles to a handful of
/// vector instructions.
// Measured: with plain `#[inline]` LLVM may leave this a call in the loop.
#[allow(clippy::inline_always)]
#[inline(always)]
fn all_word(group: &[u8; GROUP]) -> bool {
    group.iter().fold(true, |all, &b| all & is_word(b))
}

/// Byte `i` of the result (bits `8i..8i + 8`) is `0xFF` where `group[i]` is
/// not a word byte, else 0. Also vectorizes.
#[allow(clippy::inline_always)] // as for `all_word`
#[inline(always)]
fn non_word_mask(group: &[u8; GROUP]) -> u128 {
    let mut m = [0u8; GROUP];
    for (m, &b) in m.iter_mut().zip(group) {
        *m = if is_word(b) { 0 } else { 0xFF };
    }
    u128::from_le_bytes(m)
}

/// Bytes [`non_word_bits`] classifies at once: one bit each in a `u64`.
const BLOCK: usize = 64;

/// Bit `i` of the result is set where `block[i]` is not a word byte.
/// Compiles to vector instructions that mark each byte (as for
/// [`non_word_mask`]), then one multiplication per 8 bytes that gathers
/// their marks.
#[allow(clippy::inline_always)] // as for `all_word`
#[inline(always)]
fn non_word_bits(block: &[u8; BLOCK]) -> u64 {
    /// Moves bit 7 of byte `i` to bit `56 + i`, all other bits clear.
    const GATHER: u64 = 0x0002_0408_1020_4081;
    let mut marks = [0u8; BLOCK];
    for (m, &b) in marks.iter_mut().zip(block) {
        *m = if is_word(b) { 0 } else { 0x80 };
    }
    let (words, _) = marks.as_chunks::<8>();
    words.iter().enumerate().fold(0, |bits, (k, w)| {
        bits | (u64::from_le_bytes(*w).wrapping_mul(GATHER) >> 56) << (8 * k)
    })
}

/// Fewest secret characters after the last separator for a run to count
/// as a damaged key.
const SUSPECT_MIN: usize = 16;

/// Whether `rest`, the run after one of `format`'s literal prefixes, looks
/// like a damaged key of it: cut short, or with a wrong character, a
/// changed case or a bad checksum. At most two more separators (a region
/// or environment, a key id), then a last part holding at least
/// [`SUSPECT_MIN`] characters of the secret's alphabet, whatever else it
/// holds. A redactor that left such a run whole would show most of a key
/// (a truncated `nh_` key keeps 63 of its 64 hex digits; one with a `g` in
/// it, the other 63; an upper-cased one, its digits), or one a checksum
/// lets an attacker repair offline (an upper-cased key of a lower-case
/// alphabet, its letters too: see [`of_secret_alphabet`]).
fn suspect(format: &KeyFormat, rest: &[u8]) -> bool {
    last_part(rest).is_some_and(|secret| {
        secret.iter().filter(|&&b| of_secret_alphabet(format, b)).count() >= SUSPECT_MIN
    })
}

/// Whether `b` is of `format`'s secret alphabet in either case: a changed
/// case is damage too, as a wrong character is.
fn of_secret_alphabet(format: &KeyFormat, b: u8) -> bool {
    let alphabet = format.secret_alphabet();
    alphabet.contains(b.to_ascii_lowercase()) || alphabet.contains(b.to_ascii_uppercase())
}

/// The last part of `rest` (after a literal prefix), where the secret of a
/// key is, if `rest` has at most three: the region or environment, the key
/// id, the secret.
fn last_part(rest: &[u8]) -> Option<&[u8]> {
    let mut parts = rest.rsplit(|&b| b == b'_');
    let last = parts.next().unwrap_or_default();
    (parts.count() <= 2).then_some(last)
}

/// A damaged key at the start of a run longer than any key, word bytes
/// glued on after it: the run's first bytes, as long as `format`'s
/// longest key, have a last part made of the secret's alphabet alone
/// (either case). Those bytes are reported, the tail is left. Stricter
/// than [`suspect`]: a long identifier that merely starts with a prefix
/// (`nh_metricsRequestDuration…`) is not a key with a tail, where its
/// letters are not all of the alphabet (they are for base62 formats:
/// `sk_live_` and 32 letters is a key, whatever follows).
fn glued_damaged(
    hay: &[u8],
    start: usize,
    format: &KeyFormat,
    prefix: usize,
    on_key: &mut impl FnMut(usize, usize, &KeyFormat, usize),
) -> bool {
    let longest = format.len_range().1;
    let Some(rest) = hay.get(start + prefix..start + longest) else { return false };
    let damaged = last_part(rest).is_some_and(|secret| {
        secret.len() >= SUSPECT_MIN && secret.iter().all(|&b| of_secret_alphabet(format, b))
    });
    if damaged {
        on_key(start, start + longest, format, prefix);
    }
    damaged
}

/// The length of the escape's word bytes at the start of the run at
/// `start` (the run follows a non-word byte): `n` in `\n` (C's one-letter
/// escapes `\n`, `\t`, `\r`, `\b`, `\f`, `\a`, `\v`, `\e` and `\0`),
/// `075` in `\075` (C's octal escapes: `printf`, `strace`, Postgres),
/// `u0022` in `\u0022`, `x22` in `\x22` (nginx, Python, shells), `20` in
/// `%20`. Only an escape of a non-word character counts: `\u005f`, `\137`
/// and `%5F` are `_`, and `%41` is `A`, so a key after them is as inside a
/// word as after the characters themselves.
fn escape_len(hay: &[u8], start: usize) -> Option<usize> {
    let opener = *hay.get(start.checked_sub(1)?)?;
    let rest = hay.get(start..)?;
    match (opener, rest) {
        (b'\\', [a @ b'0'..=b'3', b @ b'0'..=b'7', c @ b'0'..=b'7', ..]) => {
            let code = (a - b'0') * 64 + (b - b'0') * 8 + (c - b'0');
            (!(code.is_ascii_alphanumeric() || code == b'_')).then_some(3)
        }
        (b'\\', [b'n' | b't' | b'r' | b'b' | b'f' | b'a' | b'v' | b'e' | b'0', ..]) => Some(1),
        (b'\\', [b'u', hex @ ..]) => hex.get(..4).filter(|h| escapes_non_word(h)).map(|_| 5),
        (b'\\', [b'x', hex @ ..]) => hex.get(..2).filter(|h| escapes_non_word(h)).map(|_| 3),
        (b'%', hex) => hex.get(..2).filter(|h| escapes_non_word(h)).map(|_| 2),
        _ => None,
    }
}

/// [`escape_len`] of a URL escape encoded twice (`%253D`, a `=` in a
/// redirect parameter): `253D`. Its first two letters also read as the
/// escape `%25` (a `%`), after which a key may start (`%25` + `de_…` is a
/// `%` before a key of a format named `de`): a run after `%25` is tried
/// both ways, this one first.
fn double_escape_len(hay: &[u8], start: usize) -> Option<usize> {
    match (hay.get(start.checked_sub(1)?)?, hay.get(start..)?) {
        (b'%', [b'2', b'5', hex @ ..]) => hex.get(..2).filter(|h| escapes_non_word(h)).map(|_| 4),
        _ => None,
    }
}

/// The lengths of the escape letters that may open the run at `start`,
/// longest first (see [`double_escape_len`]).
fn escape_lens(hay: &[u8], start: usize) -> impl Iterator<Item = usize> {
    [double_escape_len(hay, start), escape_len(hay, start)].into_iter().flatten()
}

/// Whether `hex` (all hex digits) is the code of a character that is not
/// a word byte.
fn escapes_non_word(hex: &[u8]) -> bool {
    let mut code = 0u32;
    for &h in hex {
        let Some(d) = char::from(h).to_digit(16) else { return false };
        code = code * 16 + d;
    }
    !char::from_u32(code).is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The shortest format the rules allow: `a_` + 22 base62 (131 bits), its
/// hint showing none of them, for the fuzzer and the tests.
#[cfg(any(test, fuzzing))]
const SHORT: KeyFormat = KeyFormat::builder("a")
    .secret(&crate::format::Alphabet::BASE62, 22)
    .hint_chars(0)
    .build_unwrap();

/// Short, with a checksum: `chk_live_` + 22 + 6, for the fuzzer and the
/// tests.
#[cfg(any(test, fuzzing))]
const CHK: KeyFormat = KeyFormat::builder("chk")
    .environments(&[crate::format::Environment::LIVE])
    .secret(&crate::format::Alphabet::BASE62, 22)
    .hint_chars(0)
    .crc32()
    .build_unwrap();

/// `h_` + 22 base62: with the escape `\n` before it, it spells `nh_`, the
/// preset's prefix (which of the two a run is must not depend on the
/// search), for the fuzzer and the tests.
#[cfg(any(test, fuzzing))]
const SPELLED: KeyFormat = KeyFormat::builder("h")
    .secret(&crate::format::Alphabet::BASE62, 22)
    .hint_chars(0)
    .build_unwrap();

/// Bytes before a key that deciding it may look at: an escape of up to
/// five bytes (`\uXXXX`) before it, and the byte before that escape.
const HISTORY: usize = 6;

/// Whether the word bytes right before `start` are an escape's, so that a
/// key starting at `start` is not inside a word (see [`escape_len`]).
fn escaped_before(hay: &[u8], start: usize) -> bool {
    escape_start(hay, start).is_some()
}

/// Where the run whose escape letters end right before `start` begins
/// (see [`escaped_before`]), if they do.
fn escape_start(hay: &[u8], start: usize) -> Option<usize> {
    (1..=5).find_map(|k| {
        let s = start.checked_sub(k)?;
        escape_lens(hay, s).any(|n| n == k).then_some(s)
    })
}

/// The first non-word byte of `hay[from..to]`, or `to`.
#[inline]
fn first_non_word(hay: &[u8], from: usize, to: usize) -> usize {
    let mut i = from;
    while let Some(group) = hay[i..to].first_chunk::<GROUP>() {
        let m = non_word_mask(group);
        if m != 0 {
            return i + m.trailing_zeros() as usize / 8;
        }
        i += GROUP;
    }
    hay[i..to].iter().position(|&b| !is_word(b)).map_or(to, |j| i + j)
}

/// The last non-word byte of `hay[from..to]`, if any.
#[inline]
fn last_non_word(hay: &[u8], from: usize, to: usize) -> Option<usize> {
    let mut i = to;
    while let Some(group) = hay[from..i].last_chunk::<GROUP>() {
        let m = non_word_mask(group);
        if m != 0 {
            return Some(i - 1 - m.leading_zeros() as usize / 8);
        }
        i -= GROUP;
    }
    hay[from..i].iter().rposition(|&b| !is_word(b)).map(|j| from + j)
}

impl Scanner {
    /// A scanner for the five preset formats.
    #[must_use]
    pub fn presets() -> Self {
        Self::new(FormatSet::presets())
    }

    /// A scanner for `formats`.
    ///
    /// # Panics
    ///
    /// Never in practice: format names are at most 16 ASCII bytes, far below
    /// the automaton's limits.
    #[must_use]
    pub fn new(formats: FormatSet) -> Self {
        let (patterns, owners) = literal_prefixes(&formats);
        let searcher = Prefixes::new(&patterns);
        let longest_prefix = patterns.iter().map(String::len).max().unwrap_or(0);
        let prefixes: Vec<Box<[u8]>> =
            patterns.into_iter().map(|p| p.into_bytes().into_boxed_slice()).collect();
        let max_len = formats.max_len();
        let mut lengths = vec![false; max_len + 1];
        let mut min_len = usize::MAX;
        for f in formats.formats() {
            let (lo, hi) = f.len_range();
            lengths[lo..=hi].fill(true);
            min_len = min_len.min(lo);
        }
        let min_len = if formats.formats().is_empty() { 0 } else { min_len };
        let shortest = prefixes.iter().map(|p| p.len()).min().unwrap_or(0);
        let hiding_min_len = min_len.min(shortest + SUSPECT_MIN);
        let mut opens = [false; 256];
        for p in &prefixes {
            opens[usize::from(p[0])] = true;
        }
        Self {
            formats,
            prefixes,
            owners,
            searcher,
            longest_prefix,
            lengths,
            min_len,
            max_len,
            chunk: CHUNK,
            tuning: TUNING,
            hiding_min_len,
            opens,
        }
    }

    /// Largest streaming step: a chunk size from configuration cannot make
    /// a scan allocate more than this (plus the longest key, twice when
    /// redacting).
    pub const MAX_CHUNK: usize = 64 << 20;

    /// Sets how many bytes are read per streaming step (default 64 KiB,
    /// clamped to 1 ..= [`MAX_CHUNK`](Self::MAX_CHUNK)). Memory use is
    /// about this plus the longest key (twice when redacting: a key glued
    /// on within a key's length of a run's start is read whole).
    #[must_use]
    pub fn chunk_size(mut self, bytes: usize) -> Self {
        self.chunk = bytes.clamp(1, Self::MAX_CHUNK);
        self
    }

    /// For the fuzzer and the tests that replay its finds: the presets'
    /// `nh` and `sk` beside [`SHORT`], [`CHK`] and [`SPELLED`].
    ///
    /// # Panics
    ///
    /// Never: the five formats have distinct names and prefixes.
    #[cfg(any(test, fuzzing))]
    #[doc(hidden)]
    #[must_use]
    pub fn fuzz_formats() -> FormatSet {
        use crate::format::{NH, SK};
        FormatSet::new([SHORT, CHK, NH, SK, SPELLED]).expect("fuzz formats are valid")
    }

    /// For the fuzzer only (`cargo fuzz` sets `cfg(fuzzing)`): spans of
    /// `span` bytes, the prefix search first if `prefixes`, a switch after
    /// more than `waste` wasted candidates in a span.
    #[cfg(fuzzing)]
    #[doc(hidden)]
    #[must_use]
    pub fn fuzz_tuning(mut self, prefixes: bool, span: usize, waste: usize) -> Self {
        let start = if prefixes { Search::Prefixes } else { Search::Runs };
        self.tuning = Tuning { start, span: span.max(1), runs_waste: waste, prefixes_waste: waste };
        self
    }

    /// For the fuzzer and the tests only: `haystack` redacted as one block
    /// in memory, with no streaming cut (a stream's first read is cut after
    /// its last non-word byte), so the search held by
    /// [`fuzz_tuning`](Self::fuzz_tuning) reads it whole: the reference
    /// streamed redaction must equal.
    ///
    /// # Panics
    ///
    /// If the search reports a span out of bounds, out of order or
    /// overlapping the one before it.
    #[cfg(any(test, fuzzing))]
    #[doc(hidden)]
    #[must_use]
    pub fn fuzz_redact_block(&self, haystack: &[u8]) -> Vec<u8> {
        let (mut out, mut at) = (Vec::new(), 0);
        let mut search = self.tuning.start;
        let mode = Mode { min_len: self.hiding_min_len, suspects: true };
        let mut reach = Reach::whole(haystack.len());
        self.scan_block(haystack, 0, &mut reach, &mut search, mode, |a, b, _, h| {
            assert!(at <= a && a < b && b <= haystack.len() && h <= b - a, "bad span");
            out.extend_from_slice(&haystack[at..a + h]);
            out.extend_from_slice(REDACTED);
            at = b;
        });
        out.extend_from_slice(&haystack[at..]);
        out
    }

    /// The formats searched for.
    #[must_use]
    pub fn formats(&self) -> &FormatSet {
        &self.formats
    }

    /// Calls `on_key(start, end, format)` for every key in `haystack`, in
    /// order: the cheapest way to find keys in memory (no line numbers, no
    /// allocation).
    pub fn for_each_key(&self, haystack: &[u8], mut on_key: impl FnMut(usize, usize, &KeyFormat)) {
        self.in_memory(haystack, |start, end, format, _| on_key(start, end, format));
    }

    /// Every whole key of `haystack` (held in memory), in order:
    /// `on_key(start, end, format, hint_len)`.
    fn in_memory(&self, haystack: &[u8], on_key: impl FnMut(usize, usize, &KeyFormat, usize)) {
        let mut search = self.tuning.start;
        let mut reach = Reach::whole(haystack.len());
        self.scan_block(haystack, 0, &mut reach, &mut search, self.finding(), on_key);
    }

    /// Every key in `haystack`, in order, with line, column and hint.
    #[must_use]
    pub fn find_all(&self, haystack: &[u8]) -> Vec<Match> {
        let mut out = Vec::new();
        let mut lines = LineCounter::default();
        self.in_memory(haystack, |start, end, format, len| {
            out.push(lines.make_match(haystack, 0, start, end, format, len));
        });
        out
    }

    /// Scans a stream, calling `on_match` for each key, in order, in
    /// constant memory.
    ///
    /// # Errors
    ///
    /// Any error from reading `input`.
    pub fn scan_reader<R: Read>(&self, input: R, on_match: impl FnMut(&Match)) -> io::Result<()> {
        self.stream(
            input,
            &mut ScanSink { lines: LineCounter::default(), on_match },
            self.finding(),
        )
    }

    /// Copies `input` to `output`, replacing each key by
    /// `{hint}[REDACTED]` and leaving every other byte untouched. Streams in
    /// constant memory. Returns the number of keys redacted.
    ///
    /// It errs towards hiding: a run that is not a key but looks like a
    /// damaged one (a format's literal prefix, then at least 16 characters
    /// of its secret alphabet after at most two more separators: a key cut
    /// short, mistyped, or with a bad checksum) becomes `{prefix}[REDACTED]`
    /// as well, and a key (or damaged key) with a suffix glued on by `_`
    /// (`…_old`) is redacted, its suffix left as it is, and so is a key
    /// glued to more letters without a `_` in a run longer than any key
    /// (the run's first key-length bytes all of the format's alphabet).
    /// A key glued on after word bytes (`dir_` + key, `id123` + key, a key
    /// right after another) is redacted from its prefix on as well,
    /// whatever follows it (`dir_{hint}[REDACTED]_old`): anywhere in a
    /// run, a format's literal prefix followed by a key its parser accepts,
    /// checksum included. There only whole keys count (a damaged key glued
    /// on after word bytes stays as it is), and a key that starts inside
    /// one (its prefix made of the other's last bytes) is hidden with it,
    /// and so is one that starts inside that one, and so on (keys cut
    /// short and glued together can chain so): a chain of any length in a
    /// run is hidden from the prefix of the key it starts with to the end
    /// of its last key, as one key (`{hint}[REDACTED]`, counted once).
    /// Streamed, the chain is followed as it comes (the stream carries
    /// only where the hiding has reached), in memory bounded as for any
    /// input and in time linear in the chain.
    /// [`find_all`](Self::find_all) and
    /// [`scan_reader`](Self::scan_reader) report whole keys only, with a
    /// boundary on both sides.
    ///
    /// # Errors
    ///
    /// Any error from reading `input` or writing `output`.
    pub fn redact<R: Read, W: Write>(&self, input: R, output: W) -> io::Result<u64> {
        let mut sink = RedactSink { output, pending: Vec::new(), skip: 0, count: 0 };
        self.stream(input, &mut sink, Mode { min_len: self.hiding_min_len, suspects: true })?;
        sink.output.flush()?;
        Ok(sink.count)
    }

    /// The streaming driver: fills a buffer, reports keys whose start is
    /// safely inside it, hands the consumed prefix to the sink, keeps the rest.
    /// Finding whole keys only.
    const fn finding(&self) -> Mode {
        Mode { min_len: self.min_len, suspects: false }
    }

    fn stream<R: Read>(&self, mut input: R, sink: &mut impl Sink, mode: Mode) -> io::Result<()> {
        // A key and the byte after it fit in `max_len + 1` bytes, and a run
        // may open with up to five bytes of an escape before its key: a
        // candidate starting at least that far before the end of the
        // buffer can be decided without more input. When hiding, a key
        // glued on within that reach ends the run's head (see
        // `hide_run`): the whole of it is read too.
        let glued = if mode.suspects { self.max_len } else { 0 };
        let lookahead = self.max_len + 1 + (HISTORY - 1) + glued;
        // The buffer starts with up to `HISTORY` bytes already decided: what
        // an escape before a key (`\u0022`, `%20`, `\n`) and the run test
        // look back at, so a cut anywhere — right after a `\`, between an
        // escape's letters and the key — decides keys as the in-memory scan
        // does. Allocated and zeroed once: refilling reads into the free tail.
        let mut buf = vec![0u8; HISTORY + self.chunk + lookahead];
        // `buf[..hist]` is history, `buf[hist..filled]` undecided input.
        let (mut hist, mut filled) = (0, 0);
        // Input offset of `buf[hist]`.
        let mut base = 0u64;
        let mut eof = false;
        let mut search = self.tuning.start;
        // A chain of keys each starting inside the one before, cut at the
        // end of a block: the input offset to which it hides (see
        // `Reach::chained`). The one state a chain of any length needs.
        let mut chained: Option<u64> = None;
        loop {
            // A short read (a pipe or terminal with nothing more for now, as
            // `tail -f log | keygate redact`): decide what can be decided
            // instead of waiting for a full buffer.
            let mut early = None;
            if !eof {
                let n = loop {
                    match input.read(&mut buf[filled..]) {
                        Ok(n) => break n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                };
                filled += n;
                eof = n == 0;
                if !eof {
                    // Every run of word bytes before the last other byte is
                    // whole, so keys starting before it can be decided.
                    // Only the bytes just read are searched: every cut is
                    // made at or after the last other byte then in the
                    // buffer, so the bytes kept from earlier reads are word
                    // bytes only, and input trickling in a byte at a time
                    // costs linear time, not quadratic. A read that fills
                    // the buffer is cut there too (not only `lookahead`
                    // bytes before its end): the input may pause right
                    // after it, and its last finished line must not wait
                    // for more input.
                    let new = filled - n;
                    early =
                        buf[new..filled].iter().rposition(|&b| !is_word(b)).map(|i| new + i + 1);
                    if early.is_none() && filled < buf.len() {
                        continue; // keep filling before deciding anything
                    }
                }
            }
            let limit = match early {
                _ if eof => filled,
                Some(safe) if filled == buf.len() => safe.max(filled - lookahead),
                Some(safe) => safe,
                None => filled - lookahead,
            };
            let hay = &buf[..filled];
            let block = &buf[hist..filled];
            // A key starting a longest key or less before the end of the
            // bytes at hand may go on past them.
            let horizon = if eof { usize::MAX } else { filled.saturating_sub(self.max_len) };
            // Bytes before it are hidden by a chain from the block before.
            let mut decided = hist;
            let mut reach = Reach { limit, horizon, chained: None };
            if let Some(to) = chained.take() {
                let covered = hist + usize::try_from(to.saturating_sub(base)).unwrap_or(0);
                let run_end = first_non_word(hay, hist, filled);
                // Cut again, the run fills the bytes at hand: no other key
                // starts in them.
                decided = reach.follow(self.chain(hay, hist, covered, run_end, horizon));
                sink.skip(decided - hist);
            }
            let last_end = if reach.chained.is_some() {
                decided
            } else {
                self.scan_block(
                    hay,
                    decided,
                    &mut reach,
                    &mut search,
                    mode,
                    |start, end, format, hint_len| {
                        sink.key(block, base, start - hist, end - hist, format, hint_len);
                    },
                )
            };
            // A chain cut at the horizon ends its block there (past the
            // limit: the run it is in fills the bytes from the limit on).
            let consumed = match reach.chained {
                Some(covered) => {
                    chained = Some(base + (covered - hist) as u64);
                    last_end.max(decided)
                }
                None => last_end.max(limit).max(decided),
            };
            sink.flush(block, base, consumed - hist)?;
            base += (consumed - hist) as u64;
            // Keep the last decided bytes as the next block's history.
            let keep = consumed.min(HISTORY);
            buf.copy_within(consumed - keep..filled, 0);
            filled -= consumed - keep;
            hist = keep;
            if eof {
                return Ok(());
            }
            if early.is_some() {
                sink.idle()?;
            }
        }
    }

    /// Reports every key in `hay` that starts in `start..reach.limit`; the
    /// bytes before `start` are context already decided (what an escape or
    /// a run before the first key looks back at). Searches span by span in
    /// the mode `search` (updated as it goes). Returns the end of the last
    /// key reported (or 0). `on_key(start, end, format, hint_len)`.
    fn scan_block(
        &self,
        hay: &[u8],
        start: usize,
        reach: &mut Reach,
        search: &mut Search,
        mode: Mode,
        mut on_key: impl FnMut(usize, usize, &KeyFormat, usize),
    ) -> usize {
        if mode.min_len == 0 {
            return 0; // no formats
        }
        let mut last_end = 0;
        let mut report = |start, end, format: &KeyFormat, hint_len| {
            last_end = end;
            on_key(start, end, format, hint_len);
        };
        // Invariant: every run of word bytes that starts before `from` has
        // been decided.
        let mut from = start;
        while from < reach.limit {
            let in_run = from > 0 && is_word(hay[from - 1]);
            let to = (from + self.tuning.span).min(reach.limit);
            let mut waste = 0;
            let (resume, allowed, other) = match *search {
                Search::Runs => (
                    self.runs_in(hay, from, to, reach, in_run, mode, &mut waste, &mut report),
                    self.tuning.runs_waste,
                    Search::Prefixes,
                ),
                Search::Prefixes => (
                    self.prefixes_in(hay, from, to, reach, in_run, mode, &mut waste, &mut report),
                    self.tuning.prefixes_waste,
                    Search::Runs,
                ),
            };
            if waste > allowed {
                *search = other;
            }
            from = resume;
        }
        last_end
    }

    /// Reports the keys starting in `hay[from..to]` by looking for long runs
    /// of word bytes; `in_run` says `hay[from - 1]` (or the byte before the
    /// block) is a word byte. Counts the candidates that are not keys in
    /// `waste`. Returns where the next span starts: every run starting
    /// before it has been decided (when hiding, the keys glued on inside it
    /// up to the block's limit).
    #[allow(clippy::too_many_arguments)] // one span's inputs and outputs
    fn runs_in(
        &self,
        hay: &[u8],
        mut from: usize,
        to: usize,
        reach: &mut Reach,
        in_run: bool,
        mode: Mode,
        waste: &mut usize,
        on_key: &mut impl FnMut(usize, usize, &KeyFormat, usize),
    ) -> usize {
        if in_run {
            // The run at `from` began earlier. A search by runs decided it
            // whole; a search by prefixes (the span before, or the block
            // before a cut) decided only prefixes starting before `from`,
            // so a key after an escape's letters (`\r` + `sk_…`) may start
            // at or just after `from`: at most four bytes on, since an
            // escape has at most five letters and began before `from`.
            let end = first_non_word(hay, from, hay.len());
            if mode.suspects {
                // The run's head, as `hide_run` reads it where the run
                // starts (the escape's letters began before `from`), then
                // the keys glued on from `from`.
                match (from..end.min(from + 5)).find_map(|p| escape_start(hay, p)) {
                    Some(run) => self.hide_run(hay, run, end, reach, from, true, on_key),
                    None => self.hide_glued(hay, from, end, reach, on_key),
                };
            } else {
                // `%25` + `3D` + key has two escapes' ends (`%25`, a `%`,
                // and `%253D`, a `=`): the first that holds a key, longest
                // reading first, as `check_escaped` tries them.
                let _ =
                    (from..end.min(from + 5)).rev().filter(|&p| escaped_before(hay, p)).any(|p| {
                        // Capped as every run is: only a key's length is read.
                        self.check_hiding(hay, p, end.min(p + self.max_len + 1), false, on_key)
                    });
            }
            from = end + 1;
        }
        // Invariant: `from` is 0 or `hay[from - 1]` is not a word byte.
        while let Some((start, end)) = if mode.suspects {
            self.next_hidden_run(hay, from, to)
        } else {
            self.next_run(hay, from, to, mode.min_len, waste)
        } {
            // Longer than any key (unless an escape's bytes made it so, or
            // a suffix is glued on): skip the rest of it, once searched for
            // keys glued on when hiding.
            let run_end =
                if end - start > self.max_len { first_non_word(hay, end, hay.len()) } else { end };
            let hit = if mode.suspects {
                self.hide_run(hay, start, run_end, reach, start + 1, false, on_key)
            } else {
                self.check_hiding(hay, start, end, false, on_key)
                    || self.check_escaped(hay, start, false, on_key)
            };
            if !hit {
                *waste += 1;
            }
            from = run_end + 1;
        }
        from.max(to)
    }

    /// The key (if any) in the run at `start` after the escape that opens it
    /// (see [`escape_len`]): C's one-letter escapes, its three-digit octal,
    /// `\uXXXX` or `\xXX` after a backslash, or `XX` (or `25XX`, encoded twice)
    /// after a `%`. Keys leak in JSON logs and URL-encoded strings, where
    /// `"…\nsk_live_…"` and `Bearer%20sk_live_…` glue the key to the escape's
    /// word bytes.
    fn check_escaped(
        &self,
        hay: &[u8],
        start: usize,
        suspects: bool,
        on_key: &mut impl FnMut(usize, usize, &KeyFormat, usize),
    ) -> bool {
        escape_lens(hay, start).any(|skip| {
            let s = start + skip;
            let e = first_non_word(hay, s, (s + self.max_len + 1).min(hay.len()));
            self.check_hiding(hay, s, e, suspects, on_key)
        })
    }

    /// As [`runs_in`](Self::runs_in), by searching for the literal prefixes.
    #[allow(clippy::too_many_arguments)] // one span's inputs and outputs
    fn prefixes_in(
        &self,
        hay: &[u8],
        from: usize,
        to: usize,
        reach: &mut Reach,
        in_run: bool,
        mode: Mode,
        waste: &mut usize,
        on_key: &mut impl FnMut(usize, usize, &KeyFormat, usize),
    ) -> usize {
        // Prefixes starting before `to` end before this.
        let search_end = (to + self.longest_prefix).min(hay.len());
        let mut pos = from;
        while pos < to {
            let Some((start, hit_end)) = self.searcher.find(hay, pos, search_end) else { break };
            if start >= to {
                break;
            }
            let before_is_word = if start == from { in_run } else { is_word(hay[start - 1]) };
            let escaped = if before_is_word { escape_start(hay, start) } else { None };
            if before_is_word && escaped.is_none() {
                // Inside a word: no key starts here, but for one glued on
                // (`dir_` + key) when hiding, as `hide_glued` finds them:
                // the run's head holds no key (its start was no prefix, no
                // escape's letters before this one), and no prefix started
                // in the run before this. One may start inside this
                // prefix, after an escape's letters that began before it
                // (`\x` + `ca` + `fe_…`, where `cafe_` is found first).
                if mode.suspects
                    && let Some(key) = self.glued_key(hay, start, hay.len(), start + 1)
                {
                    pos = self.report_glued(hay, key, hay.len(), reach, on_key);
                } else {
                    *waste += 1;
                    pos = start + 1;
                }
                continue;
            }
            if mode.suspects {
                // The whole run, as `runs_in` decides it: its head (a key
                // at its start, or after the escape's letters opening it),
                // then the keys glued on.
                let (run, first, escaped_only) = match escaped {
                    Some(run) => (run, (run + 1).max(from), true),
                    None => (start, start + 1, false),
                };
                let run_end = first_non_word(hay, hit_end, hay.len());
                if !self.hide_run(hay, run, run_end, reach, first, escaped_only, on_key) {
                    *waste += 1;
                }
                pos = run_end;
                continue;
            }
            // The run goes on to the next non-word byte; keys are never
            // longer than `max_len`, so look no further than that.
            let cap = (start + self.max_len + 1).min(hay.len());
            let end = first_non_word(hay, hit_end, cap);
            // After an escape's letters the run is read from its start, as
            // `runs_in` reads it: every reading, longest first (`%25` +
            // `cafe_…` is also `%25ca` + `fe_…`). Else, as in `runs_in`: the
            // prefix found may begin with an escape's letters (`\n` + `h_…`
            // reads as `nh_…`), the key after them.
            let hit = match escaped {
                Some(run) => self.check_escaped(hay, run, false, on_key),
                None => {
                    self.check_hiding(hay, start, end, false, on_key)
                        || self.check_escaped(hay, start, false, on_key)
                }
            };
            if !hit {
                *waste += 1;
            }
            pos = end.max(hit_end);
        }
        pos.max(to)
    }

    /// When hiding: decides the run `hay[start..end]` (`end` its end, or
    /// the end of `hay`): its head — a key (or damaged key) at its start
    /// ([`check_hiding`](Self::check_hiding)), unless `escaped_only` (the
    /// run began in a span already decided), or after the escape's letters
    /// that open it ([`check_escaped`](Self::check_escaped)) — then the keys
    /// glued on from `first` ([`hide_glued`](Self::hide_glued)), past what
    /// the head reported. Returns whether it reported any.
    ///
    /// A damaged head that reaches into a whole key glued on ends where
    /// that key starts, as at a non-word byte: read on, its `_` cuts would
    /// take the glued key's prefix and leave its secret (two keys back to
    /// back, `sk_live_…sk_live_…`, cut at the second `sk_`). A whole key at
    /// the head stays whole (`nh_` + 64 hex holds `h_` + 22 of them, a key
    /// of a format named `h`).
    #[allow(clippy::too_many_arguments)] // a run, its bounds, the output
    fn hide_run(
        &self,
        hay: &[u8],
        start: usize,
        end: usize,
        reach: &mut Reach,
        first: usize,
        escaped_only: bool,
        on_key: &mut impl FnMut(usize, usize, &KeyFormat, usize),
    ) -> bool {
        let whole = |head: Option<(usize, usize, usize)>| {
            head.is_some_and(|(s, e, _)| self.whole_key(hay, s, e))
        };
        let mut head = self.head(hay, start, end, escaped_only);
        // Parsed once: most heads are keys.
        let mut is_whole = whole(head);
        if let (Some((_, e, _)), false) = (head, is_whole)
            && let Some((glued, ..)) = self.glued_key(hay, start + 1, end, e)
        {
            head = self.head(&hay[..glued], start, glued, escaped_only);
            is_whole = whole(head);
        }
        // A whole key glued on before the head, in the escape's letters
        // that open the run (`\x` + `cafe_…`, before `\xca` + `fe_…`),
        // comes first, as the prefix search finds it first: the head
        // starts inside it and is hidden with it (`overlap_end`), as any
        // key that starts inside a glued key. Left to the head, the glued
        // key's last bytes would show.
        if let Some((s, ..)) = head
            && s > first
            && self.glued_key(hay, first, end, s).is_some()
        {
            head = None;
        }
        let mut decided = first;
        // Reported keys start with a prefix (`check`).
        if let Some((s, e, hint_len)) = head
            && let Some(i) = self.prefix_at(hay, s)
        {
            // A whole key hides the keys starting inside it with it.
            let e = if is_whole { self.overlap_end(hay, s, e, end, reach) } else { e };
            on_key(s, e, &self.formats.formats()[self.owners[i]], hint_len);
            decided = e;
        }
        self.hide_glued(hay, decided.max(first), end, reach, on_key) || head.is_some()
    }

    /// The head of the run at `start` (ending at `end`, or at the end of
    /// `hay`) as [`hide_run`](Self::hide_run) reads it, not reported:
    /// `(start, end, hint_len)`.
    fn head(
        &self,
        hay: &[u8],
        start: usize,
        end: usize,
        escaped_only: bool,
    ) -> Option<(usize, usize, usize)> {
        let mut head = None;
        let mut noted = |s, e, _: &KeyFormat, hint_len| head = Some((s, e, hint_len));
        let capped = end.min(start + self.max_len + 1);
        let _ = (!escaped_only && self.check_hiding(hay, start, capped, true, &mut noted))
            || self.check_escaped(hay, start, true, &mut noted);
        head
    }

    /// The literal prefix `hay[start..]` starts with, if any.
    fn prefix_at(&self, hay: &[u8], start: usize) -> Option<usize> {
        self.prefixes.iter().position(|p| hay[start..].starts_with(p))
    }

    /// Whether `hay[start..end]` is a whole key.
    fn whole_key(&self, hay: &[u8], start: usize, end: usize) -> bool {
        self.prefix_at(hay, start).is_some_and(|i| {
            self.formats.formats()[self.owners[i]].parse_bytes(&hay[start..end]).is_ok()
        })
    }

    /// Where the report of the whole key `hay[start..end]` ends, in a run
    /// ending at `run_end`: the keys glued on that start inside it (but at
    /// its start) and end past it are hidden with it, not left without
    /// their prefix (a key cut short glued to the next one, `sk_live_` +
    /// 30 characters + `nh_…`, is a whole `sk` key that ends in the next
    /// one's `nh`), and so are those that start inside them, and so on
    /// ([`chain`](Self::chain)). A chain that reaches the horizon is
    /// reported to it, and where it hides to is noted in `reach`.
    fn overlap_end(
        &self,
        hay: &[u8],
        start: usize,
        end: usize,
        run_end: usize,
        reach: &mut Reach,
    ) -> usize {
        // A key that starts inside this one ends in the run: past this
        // one's end only where the run goes on (not for the usual key, a
        // whole run), and then starts within a longest key of that end.
        if run_end <= end {
            return end;
        }
        let from = (start + 1).max(end.saturating_sub(self.max_len));
        reach.follow(self.chain(hay, from, end, run_end, reach.horizon))
    }

    /// Follows a chain of keys glued on, each starting inside the hidden
    /// bytes before it, in the run ending at `run_end`: from `from`, a key
    /// glued on ([`glued_key`](Self::glued_key)) that starts before
    /// `covered` (the end of the hidden bytes) moves `covered` to its end
    /// if that is further. Left to right, each byte read once (the prefix
    /// searcher), so a chain of any length costs linear time. Stops at
    /// `horizon` while the run reaches the end of `hay` (input may follow:
    /// a key starting there might end past it). Returns where it stopped
    /// and `covered`: the same once the chain has ended, else the
    /// horizon, from which the next block goes on.
    fn chain(
        &self,
        hay: &[u8],
        mut from: usize,
        mut covered: usize,
        run_end: usize,
        mut horizon: usize,
    ) -> (usize, usize) {
        loop {
            while let Some((s, e, ..)) = self.glued_key(hay, from, run_end, covered.min(horizon)) {
                covered = covered.max(e);
                from = s + 1;
            }
            // No key starts in `from..covered.min(horizon)`.
            if covered <= horizon {
                return (covered, covered);
            }
            // `from` is inside the run: its next non-word byte ends it.
            from = from.max(horizon);
            if first_non_word(hay, from, hay.len()) == hay.len() {
                return (from, covered);
            }
            // The run ends in `hay`: every key in it is at hand.
            horizon = usize::MAX;
        }
    }

    /// When hiding: reports, left to right, the keys glued on after word
    /// bytes ([`glued_key`](Self::glued_key)) from `from` (inside a run)
    /// in the run ending at `end`, those starting before the block's limit
    /// (the others are the next block's), each with the keys that start
    /// inside it ([`overlap_end`](Self::overlap_end)). Returns whether it
    /// reported any.
    fn hide_glued(
        &self,
        hay: &[u8],
        mut from: usize,
        end: usize,
        reach: &mut Reach,
        on_key: &mut impl FnMut(usize, usize, &KeyFormat, usize),
    ) -> bool {
        let mut any = false;
        while let Some(key) = self.glued_key(hay, from, end, end.min(reach.limit)) {
            from = self.report_glued(hay, key, end, reach, on_key);
            any = true;
        }
        any
    }

    /// Reports `key`, a key glued on (from [`glued_key`](Self::glued_key))
    /// in a run ending at `run_end`, with the keys that start inside it;
    /// returns where the report ends.
    fn report_glued(
        &self,
        hay: &[u8],
        (start, end, format, hint_len): (usize, usize, &KeyFormat, usize),
        run_end: usize,
        reach: &mut Reach,
        on_key: &mut impl FnMut(usize, usize, &KeyFormat, usize),
    ) -> usize {
        let covered = self.overlap_end(hay, start, end, run_end, reach);
        on_key(start, covered, format, hint_len);
        covered
    }

    /// The first key glued on after word bytes in the run ending at `end`,
    /// from `from` (inside the run: `hay[from - 1]` is a word byte), that
    /// starts before `before`: a literal prefix, then a whole key of its
    /// format (the longest there; its checksum checked where it has one),
    /// whatever follows. `(start, end, format, hint_len)`; reports nothing.
    /// Only runs at least a key long are searched, with the prefix searcher
    /// (each byte read once), and only at a prefix is a key parsed.
    fn glued_key(
        &self,
        hay: &[u8],
        mut from: usize,
        end: usize,
        before: usize,
    ) -> Option<(usize, usize, &KeyFormat, usize)> {
        // A prefix that starts before `before` ends before this.
        let search_end = end.min(before + self.longest_prefix);
        while from < before && end.saturating_sub(from) >= self.min_len {
            let (start, _) = self.searcher.find(hay, from, search_end)?;
            if start >= before || end - start < self.min_len {
                return None;
            }
            let format = &self.formats.formats()[self.owners[self.prefix_at(hay, start)?]];
            let (shortest, longest) = format.len_range();
            for len in (shortest..=longest.min(end - start)).rev() {
                let token = &hay[start..start + len];
                if let Ok(parts) = format.parse_bytes(token) {
                    return Some((start, start + len, format, format.hint_of(token, &parts).len()));
                }
            }
            from = start + 1;
        }
        None
    }

    /// [`check`](Self::check) for a run of any length (only its first
    /// `max_len + 1` bytes are read); when hiding, also a key with word
    /// bytes glued on, reported alone: the longest key (or damaged key)
    /// ending right before one of the run's `_` (`sk_live_…_old`,
    /// `nh_…_1`) but for the `_` inside a key of the prefix's format (after
    /// its region, environment or key id: a cut there would leave the
    /// secret); else, in a run longer than any key, a whole key at its
    /// start, or a damaged one ([`glued_damaged`]). What follows stays: it
    /// starts with a `_` or lies past a key's length into the run, where
    /// no key starts, or it follows a whole key.
    fn check_hiding(
        &self,
        hay: &[u8],
        start: usize,
        end: usize,
        suspects: bool,
        on_key: &mut impl FnMut(usize, usize, &KeyFormat, usize),
    ) -> bool {
        if end - start <= self.max_len && self.check(hay, start, end, suspects, on_key) {
            return true;
        }
        // A glued key starts where the run does, with a format's prefix:
        // most runs (words of the text) have none, and need no more look.
        let run = &hay[start..end];
        let Some(i) = self.prefixes.iter().position(|p| run.starts_with(p)) else { return false };
        if !suspects {
            return false;
        }
        let format = &self.formats.formats()[self.owners[i]];
        let prefix = self.prefixes[i].len();
        // Cuts start after the `_` a key of the format has past its literal
        // prefix (after its region, environment or key id).
        let inner = format.separators() - memchr::memchr_iter(b'_', &self.prefixes[i]).count();
        let last = end.min(start + self.max_len + 1);
        let first_cut = match inner.checked_sub(1) {
            None => start + prefix,
            Some(n) => match memchr::memchr_iter(b'_', &hay[start + prefix..last]).nth(n) {
                Some(at) => start + prefix + at + 1,
                None => last,
            },
        };
        if (first_cut..last)
            .rev()
            .any(|p| hay[p] == b'_' && self.check(hay, start, p, true, on_key))
        {
            return true;
        }
        // A run longer than any key, with no key before one of its `_`:
        // a key (or damaged key) with word bytes glued on without a `_`?
        if end - start <= self.max_len {
            return false;
        }
        let (shortest, longest) = format.len_range();
        (shortest..=longest).rev().any(|len| self.check(hay, start, start + len, false, on_key))
            || glued_damaged(hay, start, format, prefix, on_key)
    }

    /// Reports the run `hay[start..end]` (at most `max_len` bytes, a whole
    /// run of word bytes) if it is a key; returns whether it was.
    #[inline]
    fn check(
        &self,
        hay: &[u8],
        start: usize,
        end: usize,
        suspects: bool,
        on_key: &mut impl FnMut(usize, usize, &KeyFormat, usize),
    ) -> bool {
        let fits = self.lengths[end - start];
        if !fits && !suspects {
            return false;
        }
        let token = &hay[start..end];
        let Some(i) = self.prefixes.iter().position(|p| token.starts_with(p)) else {
            return false;
        };
        let format = &self.formats.formats()[self.owners[i]];
        if fits && let Ok(parts) = format.parse_bytes(token) {
            let hint_len = format.hint_of(token, &parts).len();
            on_key(start, end, format, hint_len);
            return true;
        }
        let prefix = self.prefixes[i].len();
        if suspects && suspect(format, &token[prefix..]) {
            // Nothing of a damaged key is shown past its literal prefix.
            on_key(start, end, format, prefix);
            return true;
        }
        false
    }

    /// The first run of at least `min_len` word bytes that starts at or
    /// after `from` and before `limit`, as `(start, end)` with `end` capped
    /// at `start + max_len + 1` (so `end - start > max_len` means "longer
    /// than any key"). `from` must be 0 or follow a non-word byte.
    ///
    /// A run of `min_len` bytes or more fully contains a group of [`GROUP`]
    /// bytes starting at `from + k * stride` for some `k`, where `stride` is
    /// `min_len - GROUP + 1`: only those groups are tested, and a run is
    /// looked at only around a group made of word bytes alone.
    #[inline]
    fn next_run(
        &self,
        hay: &[u8],
        from: usize,
        limit: usize,
        min: usize,
        waste: &mut usize,
    ) -> Option<(usize, usize)> {
        if min < GROUP {
            // No valid format is this short.
            return self.next_run_bytewise(hay, from, limit, min);
        }
        let stride = min - GROUP + 1;
        // A run starting before `limit` has a tested group before this.
        let groups_end = limit + stride - 1;
        let mut g = from;
        while g < groups_end {
            let group = hay.get(g..)?.first_chunk::<GROUP>()?;
            if all_word(group) {
                let start = last_non_word(hay, from, g).map_or(from, |i| i + 1);
                if start >= limit {
                    return None;
                }
                let cap = (start + self.max_len + 1).min(hay.len());
                let end = first_non_word(hay, g + GROUP, cap);
                if end - start >= min {
                    return Some((start, end));
                }
                // Too short: look on after it.
                *waste += 1;
                g = end + 1;
                continue;
            }
            g += stride;
        }
        None
    }

    /// [`next_run`](Self::next_run) when hiding, skipping the runs that
    /// cannot hold anything to hide.
    ///
    /// Damaged keys make runs of [`hiding_min_len`](Self::hiding_min_len)
    /// bytes worth a look, so short that groups tested `min - GROUP + 1`
    /// bytes apart would overlap (4 bytes apart for the presets: each byte
    /// tested four times). Bytes are classified a block at a time instead,
    /// into a bit mask, and the long runs read off the mask. And
    /// a run shorter than any whole key can only hold a damaged key at its
    /// start (none is glued on inside it, see [`glued_key`](Self::glued_key)):
    /// one that starts with no prefix's first byte and no escape's opener
    /// before it (say a long number) is skipped unread.
    fn next_hidden_run(&self, hay: &[u8], from: usize, limit: usize) -> Option<(usize, usize)> {
        let min = self.hiding_min_len;
        if !(GROUP..=BLOCK).contains(&min) {
            // Shorter than a group (no valid format) or longer than a
            // block (very long prefixes only): the spaced groups,
            // unfiltered, whose runs `hide_run` decides alike.
            return self.next_run(hay, from, limit, min, &mut 0);
        }
        let cap = |start: usize| (start + self.max_len + 1).min(hay.len());
        let worth = |start: usize, end: usize| {
            end - start >= self.min_len
                || (end - start >= min
                    && (self.opens[usize::from(hay[start])]
                        || start.checked_sub(1).is_some_and(|b| matches!(hay[b], b'\\' | b'%'))))
        };
        // The run being read starts at `start` and reaches `b`, the next
        // block (the bytes between are word bytes).
        let (mut start, mut b) = (from, from);
        'blocks: while start < limit {
            let Some(block) = hay.get(b..).and_then(<[u8]>::first_chunk::<BLOCK>) else {
                // The last bytes of the input, one run at a time.
                loop {
                    let end = first_non_word(hay, b.min(cap(start)), cap(start));
                    if worth(start, end) {
                        return Some((start, end));
                    }
                    start = end + 1;
                    b = start;
                    if start >= limit {
                        return None;
                    }
                }
            };
            let non_word = non_word_bits(block);
            if non_word == 0 {
                // A long run (most often a key): its end is near.
                let end = first_non_word(hay, (b + BLOCK).min(cap(start)), cap(start));
                if worth(start, end) {
                    return Some((start, end));
                }
                start = end + 1;
                b = start;
                continue;
            }
            let first = non_word.trailing_zeros() as usize;
            if worth(start, b + first) {
                return Some((start, (b + first).min(cap(start))));
            }
            // Bit `i` of `long`: bytes `i..i + min` of the block are word
            // bytes. Its lowest bit past `first` starts a run (the byte
            // before is not a word byte, or its bit would be set too).
            // Windows doubled to 16 bytes, then widened to `min`.
            let mut long = !non_word;
            long &= long >> 1;
            long &= long >> 2;
            long &= long >> 4;
            long &= long >> 8;
            if min > 32 {
                long &= long >> 16;
                long &= long >> (min - 32);
            } else {
                long &= long >> (min - 16);
            }
            long &= u64::MAX << first;
            while long != 0 {
                let s = b + long.trailing_zeros() as usize;
                if s >= limit {
                    return None;
                }
                let end = match non_word >> (s - b) {
                    0 => first_non_word(hay, (b + BLOCK).min(cap(s)), cap(s)),
                    rest => (s + rest.trailing_zeros() as usize).min(cap(s)),
                };
                if worth(s, end) {
                    return Some((s, end));
                }
                if end - b >= BLOCK {
                    // It reaches the next block: read on after it.
                    start = end + 1;
                    b = start;
                    continue 'blocks;
                }
                long &= u64::MAX << (end - b);
            }
            // The run reaching the next block starts after this one's last
            // non-word byte.
            start = b + BLOCK - non_word.leading_zeros() as usize;
            b += BLOCK;
        }
        None
    }

    /// [`next_run`](Self::next_run) one byte at a time, for a shortest key
    /// under [`GROUP`] bytes (which format validation rules out).
    fn next_run_bytewise(
        &self,
        hay: &[u8],
        from: usize,
        limit: usize,
        min: usize,
    ) -> Option<(usize, usize)> {
        let mut start = from;
        while start < limit {
            if !is_word(hay[start]) {
                start += 1;
                continue;
            }
            let cap = (start + self.max_len + 1).min(hay.len());
            let end = first_non_word(hay, start, cap);
            if end - start >= min {
                return Some((start, end));
            }
            start = end + 1;
        }
        None
    }
}

/// Receives the keys of each block, then the block's consumed prefix.
trait Sink {
    fn key(
        &mut self,
        block: &[u8],
        base: u64,
        start: usize,
        end: usize,
        f: &KeyFormat,
        hint_len: usize,
    );
    fn flush(&mut self, block: &[u8], base: u64, consumed: usize) -> io::Result<()>;
    /// The first `n` bytes of the block are hidden (by a chain of keys
    /// reported in a block before): none of them is passed on. Only when
    /// hiding.
    fn skip(&mut self, _n: usize) {}
    /// The input paused: pass on what is done (say, flush the output).
    fn idle(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct ScanSink<F> {
    lines: LineCounter,
    on_match: F,
}

impl<F: FnMut(&Match)> Sink for ScanSink<F> {
    fn key(
        &mut self,
        block: &[u8],
        base: u64,
        start: usize,
        end: usize,
        f: &KeyFormat,
        hint_len: usize,
    ) {
        let m = self.lines.make_match(block, base, start, end, f, hint_len);
        (self.on_match)(&m);
    }

    fn flush(&mut self, block: &[u8], base: u64, consumed: usize) -> io::Result<()> {
        self.lines.advance(block, base, consumed);
        Ok(())
    }
}

struct RedactSink<W> {
    output: W,
    /// Keys of the current block: (start, end, hint length).
    pending: Vec<(usize, usize, usize)>,
    /// Bytes at the start of the current block hidden by a chain.
    skip: usize,
    count: u64,
}

impl<W: Write> Sink for RedactSink<W> {
    fn key(&mut self, _: &[u8], _: u64, start: usize, end: usize, _: &KeyFormat, hint_len: usize) {
        self.pending.push((start, end, hint_len));
    }

    fn flush(&mut self, block: &[u8], _: u64, consumed: usize) -> io::Result<()> {
        let mut at = std::mem::take(&mut self.skip);
        for (start, end, hint_len) in self.pending.drain(..) {
            self.output.write_all(&block[at..start + hint_len])?;
            self.output.write_all(REDACTED)?;
            at = end;
            self.count += 1;
        }
        self.output.write_all(&block[at..consumed])
    }

    fn skip(&mut self, n: usize) {
        self.skip = n;
    }

    fn idle(&mut self) -> io::Result<()> {
        self.output.flush()
    }
}

/// Turns byte offsets into 1-based line and column numbers incrementally.
#[derive(Default)]
struct LineCounter {
    /// Absolute offset up to which newlines have been counted.
    counted_to: u64,
    /// Newlines seen before `counted_to`.
    newlines: u64,
    /// Absolute offset just after the last newline seen.
    line_start: u64,
}

impl LineCounter {
    /// Counts the newlines of `block` (which starts at absolute `base`) up to
    /// `upto`. Blocks arrive in order and every byte before a block has been
    /// counted, so `counted_to >= base`.
    fn advance(&mut self, block: &[u8], base: u64, upto: usize) {
        let from = usize::try_from(self.counted_to.saturating_sub(base)).unwrap_or(usize::MAX);
        if from >= upto {
            return;
        }
        let span = &block[from..upto];
        self.newlines += memchr::memchr_iter(b'\n', span).count() as u64;
        if let Some(i) = memchr::memrchr(b'\n', span) {
            self.line_start = base + (from + i) as u64 + 1;
        }
        self.counted_to = base + upto as u64;
    }

    fn make_match(
        &mut self,
        block: &[u8],
        base: u64,
        start: usize,
        end: usize,
        format: &KeyFormat,
        hint_len: usize,
    ) -> Match {
        self.advance(block, base, start);
        let abs = base + start as u64;
        Match {
            offset: abs,
            len: end - start,
            line: self.newlines + 1,
            column: abs - self.line_start + 1,
            format: format.name(),
            hint: String::from_utf8_lossy(&block[start..start + hint_len]).into_owned(),
        }
    }
}

#[cfg(test)]
mod tests;
