//! Find keys of any registered format in arbitrary bytes, and redact them.
//!
//! Both work in one pass and stream: constant memory for any input size,
//! keys that straddle read boundaries still found.

use std::fmt;
use std::io::{self, Read, Write};

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
/// input), and the whole token parses as a key of its format — so scanning
/// and [`KeyFormat::parse`] agree by construction.
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
/// rule puts a non-word byte or the edge of the input on both sides, so a key
/// is always a whole run of word bytes — and a long one: no valid format has
/// keys under 24 bytes (a secret carries 128 bits in symbols of at most 62
/// values), no preset under 40. The scanner tests 16-byte groups, a few
/// vector instructions each, spaced so that every run as long as the
/// shortest key contains one. Only runs around a group of word bytes are
/// looked at, and only runs of a length some format has are matched against
/// the formats' literal prefixes and parsed: in ordinary text most bytes are
/// never read.
#[derive(Clone)]
pub struct Scanner {
    formats: FormatSet,
    /// The literal prefixes of [`literal_prefixes`]: a run that starts with
    /// `prefixes[i]` can only be a key of format `owners[i]`.
    prefixes: Vec<Box<[u8]>>,
    /// Pattern `i` belongs to format `owners[i]`.
    owners: Vec<usize>,
    /// `lengths[n]`: some format has keys of `n` bytes (a superset is fine:
    /// the parser decides).
    lengths: Vec<bool>,
    /// Shortest key of any format; 0 for an empty set.
    min_len: usize,
    max_len: usize,
    /// Bytes read per streaming step.
    chunk: usize,
}

impl fmt::Debug for Scanner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scanner").field("formats", &self.formats).finish_non_exhaustive()
    }
}

/// The literal prefixes a key can start with, and the format each belongs to.
///
/// A format with environments contributes `{name}_{env}_` for each (so
/// `sk_live_` and `sk_test_`): runs like `sk_totally_not_a_key…` are then
/// rejected by a comparison instead of costing a parse. Falls back to
/// `{name}_` alone when the expansion would exceed 64 literals, which bounds
/// the work per candidate run.
fn literal_prefixes(formats: &FormatSet) -> (Vec<String>, Vec<usize>) {
    const EXPANDED_MAX: usize = 64;
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
            Segment::Environments(envs) if expanded <= EXPANDED_MAX => {
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
    #[must_use]
    pub fn new(formats: FormatSet) -> Self {
        let (patterns, owners) = literal_prefixes(&formats);
        let prefixes = patterns.into_iter().map(|p| p.into_bytes().into_boxed_slice()).collect();
        let max_len = formats.max_len();
        let mut lengths = vec![false; max_len + 1];
        let mut min_len = usize::MAX;
        for f in formats.formats() {
            let (lo, hi) = f.len_range();
            lengths[lo..=hi].fill(true);
            min_len = min_len.min(lo);
        }
        let min_len = if formats.formats().is_empty() { 0 } else { min_len };
        Self { formats, prefixes, owners, lengths, min_len, max_len, chunk: CHUNK }
    }

    /// Sets how many bytes are read per streaming step (default 64 KiB,
    /// at least 1). Memory use is about this plus the longest key.
    #[must_use]
    pub fn chunk_size(mut self, bytes: usize) -> Self {
        self.chunk = bytes.max(1);
        self
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
        self.scan_block(haystack, None, haystack.len(), |start, end, format, _| {
            on_key(start, end, format);
        });
    }

    /// Every key in `haystack`, in order, with line, column and hint.
    #[must_use]
    pub fn find_all(&self, haystack: &[u8]) -> Vec<Match> {
        let mut out = Vec::new();
        let mut lines = LineCounter::default();
        self.scan_block(haystack, None, haystack.len(), |start, end, format, hint_len| {
            out.push(lines.make_match(haystack, 0, start, end, format, hint_len));
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
        self.stream(input, &mut ScanSink { lines: LineCounter::default(), on_match })
    }

    /// Copies `input` to `output`, replacing each key by
    /// `{hint}[REDACTED]` and leaving every other byte untouched. Streams in
    /// constant memory. Returns the number of keys redacted.
    ///
    /// # Errors
    ///
    /// Any error from reading `input` or writing `output`.
    pub fn redact<R: Read, W: Write>(&self, input: R, output: W) -> io::Result<u64> {
        let mut sink = RedactSink { output, pending: Vec::new(), count: 0 };
        self.stream(input, &mut sink)?;
        sink.output.flush()?;
        Ok(sink.count)
    }

    /// The streaming driver: fills a buffer, reports keys whose start is
    /// safely inside it, hands the consumed prefix to the sink, keeps the rest.
    fn stream<R: Read>(&self, mut input: R, sink: &mut impl Sink) -> io::Result<()> {
        // A key and the byte after it fit in `max_len + 1` bytes; a candidate
        // starting at least that far before the end of the buffer can be
        // decided without more input.
        let lookahead = self.max_len + 1;
        // Allocated and zeroed once: refilling reads into the free tail.
        let mut buf = vec![0u8; self.chunk + lookahead];
        let mut filled = 0;
        let mut base = 0u64;
        let mut prev: Option<u8> = None;
        let mut eof = false;
        loop {
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
                if !eof && filled < buf.len() {
                    continue; // keep filling before deciding anything
                }
            }
            let limit = if eof { filled } else { filled - lookahead };
            let block = &buf[..filled];
            let last_end = self.scan_block(block, prev, limit, |start, end, format, hint_len| {
                sink.key(block, base, start, end, format, hint_len);
            });
            let consumed = last_end.max(limit);
            sink.flush(block, base, consumed)?;
            if consumed > 0 {
                prev = Some(buf[consumed - 1]);
            }
            buf.copy_within(consumed..filled, 0);
            filled -= consumed;
            base += consumed as u64;
            if eof {
                return Ok(());
            }
        }
    }

    /// Reports every key in `hay` that starts before `limit`, given the byte
    /// `prev` before `hay[0]`. Returns the end of the last key reported (or 0).
    /// `on_key(start, end, format, hint_len)`.
    fn scan_block(
        &self,
        hay: &[u8],
        prev: Option<u8>,
        limit: usize,
        mut on_key: impl FnMut(usize, usize, &KeyFormat, usize),
    ) -> usize {
        let continues = prev.is_some_and(is_word);
        let mut last_end = 0;
        // Invariant: `from` is 0 or `hay[from - 1]` is not a word byte.
        let mut from = 0;
        while let Some((start, end)) = self.next_run(hay, from, limit) {
            if end - start > self.max_len {
                // Longer than any key: skip the rest of it.
                from = first_non_word(hay, end, hay.len()) + 1;
                continue;
            }
            from = end + 1;
            // A run at 0 that began in the previous block is not a key.
            if (start == 0 && continues) || !self.lengths[end - start] {
                continue;
            }
            let token = &hay[start..end];
            let Some(i) = self.prefixes.iter().position(|p| token.starts_with(p)) else {
                continue;
            };
            let format = &self.formats.formats()[self.owners[i]];
            if let Ok(parts) = format.parse_bytes(token) {
                let hint_len = format.hint_of(token, &parts).len();
                on_key(start, end, format, hint_len);
                last_end = end;
            }
        }
        last_end
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
    fn next_run(&self, hay: &[u8], from: usize, limit: usize) -> Option<(usize, usize)> {
        let min = self.min_len;
        if min < GROUP {
            // No valid format is this short; an empty set lands here (0).
            return if min == 0 { None } else { self.next_run_bytewise(hay, from, limit) };
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
                g = end + 1;
                continue;
            }
            g += stride;
        }
        None
    }

    /// [`next_run`](Self::next_run) one byte at a time, for a shortest key
    /// under [`GROUP`] bytes (which format validation rules out).
    fn next_run_bytewise(&self, hay: &[u8], from: usize, limit: usize) -> Option<(usize, usize)> {
        let mut start = from;
        while start < limit {
            if !is_word(hay[start]) {
                start += 1;
                continue;
            }
            let cap = (start + self.max_len + 1).min(hay.len());
            let end = first_non_word(hay, start, cap);
            if end - start >= self.min_len {
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
    count: u64,
}

impl<W: Write> Sink for RedactSink<W> {
    fn key(&mut self, _: &[u8], _: u64, start: usize, end: usize, _: &KeyFormat, hint_len: usize) {
        self.pending.push((start, end, hint_len));
    }

    fn flush(&mut self, block: &[u8], _: u64, consumed: usize) -> io::Result<()> {
        let mut at = 0;
        for (start, end, hint_len) in self.pending.drain(..) {
            self.output.write_all(&block[at..start + hint_len])?;
            self.output.write_all(REDACTED)?;
            at = end;
            self.count += 1;
        }
        self.output.write_all(&block[at..consumed])
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
