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
#[derive(Clone)]
pub struct Scanner {
    formats: FormatSet,
    /// Searches for every format's literal prefix: `{name}_`, or
    /// `{name}_{env}_` for each environment of a format that has them.
    prefixes: Prefixes,
    /// Pattern `i` belongs to format `owners[i]`.
    owners: Vec<usize>,
    max_len: usize,
    /// Bytes read per streaming step.
    chunk: usize,
}

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

    /// The first prefix at or after `from`: (start, end, pattern index).
    #[inline]
    fn find(&self, hay: &[u8], from: usize) -> Option<(usize, usize, usize)> {
        match self {
            Self::Packed(s) => s
                .find_in(hay, Span::from(from..hay.len()))
                .map(|m| (m.start(), m.end(), m.pattern().as_usize())),
            Self::Automaton(ac) => ac
                .find(Input::new(hay).range(from..))
                .map(|m| (m.start(), m.end(), m.pattern().as_usize())),
        }
    }
}

/// The literal prefixes to search for, and the format each belongs to.
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

const fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
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
        let prefixes = Prefixes::new(&patterns);
        let max_len = formats.max_len();
        Self { formats, prefixes, owners, max_len, chunk: CHUNK }
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
        let mut pos = 0;
        let mut last_end = 0;
        while pos < limit {
            let Some((start, hit_end, pattern)) = self.prefixes.find(hay, pos) else { break };
            if start >= limit {
                break;
            }
            let before = if start == 0 { prev } else { Some(hay[start - 1]) };
            if before.is_some_and(is_word) {
                // Inside a word: no key can start anywhere in this word.
                pos = hit_end;
                continue;
            }
            let format = &self.formats.formats()[self.owners[pattern]];
            // The token runs to the next non-word byte; keys are never longer
            // than `max_len`, so look no further than that.
            let cap = (start + self.max_len + 1).min(hay.len());
            let end =
                hay[hit_end..cap].iter().position(|&b| !is_word(b)).map_or(cap, |i| hit_end + i);
            if end - start <= self.max_len
                && let Ok(parts) = format.parse_bytes(&hay[start..end])
            {
                let hint_len = format.hint_of(&hay[start..end], &parts).len();
                on_key(start, end, format, hint_len);
                last_end = end;
            }
            pos = end.max(hit_end);
        }
        last_end
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
