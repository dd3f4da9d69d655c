//! `keygate`: mint, inspect, scan for and redact API keys.

use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keygate::Secret;
use keygate::format::{ApiKey, Environment, FormatSet, KeyFormat, MintSpec, Region, Segment};
use keygate::hash::{Hasher, Pepper, PepperId};
use keygate::scan::Scanner;
use serde_json::json;
use zeroize::Zeroizing;

/// Longest input `inspect` reads from stdin: far above any key, small enough
/// that a mistaken pipe cannot exhaust memory.
const STDIN_CAP: u64 = 4096;

#[derive(Parser)]
#[command(
    name = "keygate",
    version,
    about = "Mint, inspect, scan for and redact API keys",
    after_help = STATUS
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// What the help says of the exit status: scripts and CI branch on it
/// (`keygate scan` exits 1 when it finds a key), and 1 means something
/// else for each command, or nothing.
const STATUS: &str = "Exit status: 0 on success; 1 when `scan` finds a key or `inspect` or
`hash` refuses one; 2 on an error (see each command's help)";
const MINT_STATUS: &str = "Exit status:
  0  minted and printed
  2  an error: a bad argument, stdout gone";
const INSPECT_STATUS: &str = "Exit status:
  0  the key parsed, and its parts printed
  1  the key refused: not a key of a known format
  2  an error: a bad argument, stdin unreadable, stdout gone";
const HASH_STATUS: &str = "Exit status:
  0  the key parsed, and its digest printed
  1  the key refused: not a key of a known format
  2  an error: a bad argument, stdin unreadable, a pepper file unreadable or
     refused, stdout gone";
const SCAN_STATUS: &str = "Exit status:
  0  no key found
  1  a key found
  2  an error (a path that cannot be read, stdout gone), keys found or not";
const REDACT_STATUS: &str = "Exit status:
  0  all of stdin copied
  2  an error: a bad argument, stdin unreadable, stdout gone";

#[derive(Subcommand)]
enum Command {
    /// Mint a key and print it with its parts as one JSON line.
    #[command(after_help = MINT_STATUS)]
    Mint {
        /// Format: nhk, nhm, nk, sk, nh, or the portal's kgpc (code) and kgpt (access token).
        format: String,
        /// Environment, for formats that have one (default: live).
        #[arg(long)]
        env: Option<String>,
        /// Region, for formats that have one (default: us).
        #[arg(long)]
        region: Option<String>,
    },
    /// Parse a key (argument, or stdin when absent or `-`) and print its parts, never the key.
    #[command(after_help = INSPECT_STATUS)]
    Inspect {
        /// The key; read from stdin when absent or `-`.
        key: Option<String>,
    },
    /// Print the stored digest string of a key (argument, or stdin when absent or `-`).
    #[command(after_help = HASH_STATUS)]
    Hash {
        /// The key; read from stdin when absent or `-`.
        key: Option<String>,
        /// HMAC-SHA256 with the pepper in this file (raw bytes, at least 32)
        /// instead of plain SHA-256.
        #[arg(long)]
        pepper_file: Option<PathBuf>,
        /// The pepper's id, recorded in the digest string (with
        /// `--pepper-file` only).
        #[arg(long, default_value_t = 1, requires = "pepper_file")]
        pepper_id: u32,
    },
    /// Report keys found in files, directories (recursively) or stdin.
    #[command(after_help = SCAN_STATUS)]
    Scan {
        /// Files or directories; stdin when none.
        paths: Vec<PathBuf>,
    },
    /// Copy stdin to stdout with each key replaced by `{hint}[REDACTED]`.
    #[command(after_help = REDACT_STATUS)]
    Redact,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return argument_error(&e),
    };
    let Some(formats) = minted_formats() else {
        say("format names collide");
        return ExitCode::FAILURE;
    };
    match cli.command {
        Command::Mint { format, env, region } => mint(&formats, &format, env, region),
        Command::Inspect { key } => match read_key(key.as_deref()) {
            Ok(input) => inspect(&formats, &input),
            Err(code) => code,
        },
        Command::Hash { key, pepper_file, pepper_id } => match read_key(key.as_deref()) {
            Ok(input) => hash(&formats, &input, pepper_file.as_deref(), pepper_id),
            Err(code) => code,
        },
        Command::Scan { paths } => scan(formats, &paths),
        Command::Redact => redact(formats),
    }
}

/// The presets and the portal's codes and access tokens (which travel in
/// URLs and cookies, so in access logs): everything keygate mints. `None`
/// if their names collided.
fn minted_formats() -> Option<FormatSet> {
    let portal = [keygate::portal::CODE, keygate::portal::ACCESS_TOKEN];
    FormatSet::new(FormatSet::presets().formats().iter().copied().chain(portal)).ok()
}

/// Reports a command line clap refused. Help, version and missing
/// arguments print as clap has them, and so does an unknown flag that
/// reads as a flag's name (`--pepperid`: see [`flag_like`]); every other
/// refusal names only its kind and argument, since clap's own message
/// quotes the offending value, and a value in the wrong place
/// (`--pepper-id <key>`, a second key, `--"$KEY"`) is often a key.
fn argument_error(e: &clap::Error) -> ExitCode {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let arg = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(a)) => Some(a.as_str()),
        _ => None,
    };
    let hidden = "(the value is not shown, as it may be a key); try `keygate --help`";
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        | ErrorKind::MissingRequiredArgument
        | ErrorKind::MissingSubcommand => e.exit(),
        ErrorKind::UnknownArgument if arg.is_some_and(flag_like) => e.exit(),
        // Clap's one kind for a conflict and a repeat; both name
        // arguments (`--env <ENV>`), never values.
        ErrorKind::ArgumentConflict
            if arg.is_some() && e.get(ContextKind::PriorArg) == e.get(ContextKind::InvalidArg) =>
        {
            fail(2, format_args!("`{}` given more than once", arg.unwrap_or_default()))
        }
        ErrorKind::InvalidValue | ErrorKind::ValueValidation if arg.is_some() => {
            fail(2, format_args!("invalid value for `{}` {hidden}", arg.unwrap_or_default()))
        }
        kind => fail(2, format_args!("{kind} {hidden}")),
    }
}

/// Whether `arg`, an unknown argument, can be shown: a flag's name, as
/// flags are spelled (`-`, then lower-case letters, digits and `-`, no
/// longer than a name is). A key glued after dashes (`--"$KEY"`) is no
/// flag: every key has a `_` (the one after its format's name), and a
/// pepper or a key of hex alone is longer than any name.
fn flag_like(arg: &str) -> bool {
    arg.len() <= 32
        && arg.starts_with('-')
        && arg.bytes().all(|b| b == b'-' || b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Prints `line` to stdout: success, or exit status 2 when stdout is gone
/// (a closed pipe), where `println!` would panic.
fn print_line(line: impl std::fmt::Display) -> ExitCode {
    match writeln!(io::stdout().lock(), "{line}") {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(2, format_args!("stdout: {e}")),
    }
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    say(msg);
    ExitCode::from(code)
}

/// Writes `keygate: {msg}` on stderr. Not `eprintln!`: it panics when
/// stderr is a closed pipe (`keygate scan … 2>&1 | head -1`), and the
/// command would exit with a panic's 101 instead of its own status.
fn say(msg: impl std::fmt::Display) {
    let _ = writeln!(io::stderr().lock(), "keygate: {msg}");
}

fn parts_json(key: &ApiKey) -> serde_json::Value {
    json!({
        "format": key.format().name(),
        "environment": key.environment().map(|e| e.to_string()),
        "region": key.region().map(|r| r.to_string()),
        "key_id": key.key_id().map(|k| k.to_string()),
        "hint": key.hint(),
    })
}

fn mint(formats: &FormatSet, name: &str, env: Option<String>, region: Option<String>) -> ExitCode {
    let Some(format) = formats.get(name) else {
        let known = formats.formats().iter().map(KeyFormat::name).collect::<Vec<_>>().join(", ");
        // The name is not echoed: a key given to `mint` by mistake (for
        // `inspect`) would land on stderr.
        return fail(2, format_args!("unknown format (expected one of {known})"));
    };
    let mut spec = MintSpec::new();
    // Defaults apply only where the format has the segment, so
    // `keygate mint nh` works without flags.
    match (format.segment(), env) {
        (Segment::Environments(_), Some(e)) => match e.parse::<Environment>() {
            Ok(e) => spec = spec.environment(e),
            Err(err) => return fail(2, err),
        },
        (_, Some(_)) => return fail(2, format_args!("format `{name}` has no environment")),
        _ => {}
    }
    match (format.segment(), region) {
        (Segment::Region, Some(r)) => match r.parse::<Region>() {
            Ok(r) => spec = spec.region(r),
            Err(err) => return fail(2, err),
        },
        (_, Some(_)) => return fail(2, format_args!("format `{name}` has no region")),
        _ => {}
    }
    match format.mint(spec) {
        Ok(key) => print_minted(&key),
        Err(e) => fail(2, e),
    }
}

/// Prints the minted `key` with its parts and digest as one JSON line.
///
/// The line is built in one buffer, reserved up front and wiped on drop,
/// and written straight to the file descriptor: a `serde_json::Value`
/// would hold an unwiped copy of the key, and std's stdout buffer
/// another, for the rest of the process.
fn print_minted(key: &ApiKey) -> ExitCode {
    let digest = Hasher::sha256().digest(key.expose_secret().as_bytes()).to_string();
    let parts = parts_json(key).to_string();
    let mut line =
        Zeroizing::new(Vec::with_capacity(parts.len() + 3 * key.expose_secret().len() + 128));
    // `parts` is an object: its fields, then the key and the digest.
    line.extend_from_slice(parts.strip_suffix('}').unwrap_or(&parts).as_bytes());
    line.extend_from_slice(b",\"key\":");
    // Written straight into the buffer (a key needs no escaping).
    if serde_json::to_writer(&mut *line, key.expose_secret()).is_err() {
        return fail(2, "cannot encode the key");
    }
    line.extend_from_slice(b",\"digest\":");
    if serde_json::to_writer(&mut *line, &digest).is_err() {
        return fail(2, "cannot encode the digest");
    }
    line.extend_from_slice(b"}\n");
    match raw_stdout().write_all(&line) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(2, format_args!("stdout: {e}")),
    }
}

/// The key from the argument, else stdin; wiped when dropped. Read from the
/// file descriptor into one buffer of the cap's size, so neither std's
/// stdin buffer nor a reallocation leaves a copy behind.
fn read_key(key: Option<&str>) -> Result<Input, ExitCode> {
    if let Some(k) = key.filter(|k| *k != "-") {
        return Ok(Input { key: Zeroizing::new(k.to_owned()), from_argument: true });
    }
    let cap = usize::try_from(STDIN_CAP).unwrap_or(4096) + 1;
    let mut buf = Zeroizing::new(Vec::with_capacity(cap));
    // A failed read is a failure (2, as an unreadable file is for `scan`),
    // not a refused key (1): a script tells the two apart by the status.
    if let Err(e) = raw_stdin().take(STDIN_CAP + 1).read_to_end(&mut buf) {
        return Err(fail(2, format_args!("cannot read stdin: {e}")));
    }
    if buf.len() as u64 > STDIN_CAP {
        return Err(fail(1, format_args!("input longer than {STDIN_CAP} bytes")));
    }
    // Strip exactly one trailing newline (as `echo` adds), nothing else.
    if buf.ends_with(b"\r\n") {
        let n = buf.len() - 2;
        buf.truncate(n);
    } else if buf.ends_with(b"\n") {
        let n = buf.len() - 1;
        buf.truncate(n);
    }
    match std::str::from_utf8(&buf) {
        Ok(text) => Ok(Input { key: Zeroizing::new(text.to_owned()), from_argument: false }),
        Err(_) => Err(fail(1, "key is not valid UTF-8")),
    }
}

/// A key to inspect or hash, and whether it came as an argument.
struct Input {
    key: Zeroizing<String>,
    from_argument: bool,
}

/// Said on stderr for a key given as an argument: on its own line after a
/// success, inside the error's line for a refused key (a refusal is one
/// line).
const ARGUMENT_WARNING: &str =
    "a key given as an argument shows in `ps` and shell history; pipe it in";

impl Input {
    /// The refusal of this input's key, in one line.
    fn refuse(&self, e: impl std::fmt::Display) -> ExitCode {
        if self.from_argument {
            fail(1, format_args!("invalid key: {e} (and {ARGUMENT_WARNING})"))
        } else {
            fail(1, format_args!("invalid key: {e}"))
        }
    }

    /// `code`, after the warning if the key was an argument.
    fn warned(&self, code: ExitCode) -> ExitCode {
        if self.from_argument {
            say(ARGUMENT_WARNING);
        }
        code
    }
}

/// Standard input without std's process-wide 8 KiB buffer, which would keep
/// a copy of the key that nothing wipes.
fn raw_stdin() -> Box<dyn Read> {
    match own_descriptor(&io::stdin()) {
        Some(file) => Box::new(file),
        None => Box::new(io::stdin()),
    }
}

/// Standard output without std's process-wide buffer (see [`raw_stdin`]).
fn raw_stdout() -> Box<dyn Write> {
    match own_descriptor(&io::stdout()) {
        Some(file) => Box::new(file),
        None => Box::new(io::stdout()),
    }
}

/// A file on a duplicate of `stream`'s descriptor: reads and writes go
/// straight to it, past std's buffer. `None` where there is none.
#[cfg(unix)]
fn own_descriptor(stream: &impl std::os::fd::AsFd) -> Option<fs::File> {
    stream.as_fd().try_clone_to_owned().ok().map(fs::File::from)
}

#[cfg(not(unix))]
fn own_descriptor<T>(_: &T) -> Option<fs::File> {
    None
}

fn inspect(formats: &FormatSet, input: &Input) -> ExitCode {
    match formats.parse(&input.key) {
        Ok(key) => input.warned(print_line(parts_json(&key))),
        // Parse errors never contain the input.
        Err(e) => input.refuse(e),
    }
}

fn hash(
    formats: &FormatSet,
    input: &Input,
    pepper_file: Option<&Path>,
    pepper_id: u32,
) -> ExitCode {
    let key = match formats.parse(&input.key) {
        Ok(k) => k,
        Err(e) => return input.refuse(e),
    };
    let hasher = match pepper_file {
        None => Hasher::sha256(),
        Some(path) => {
            let bytes = match read_pepper(path) {
                Ok(b) => b,
                Err(e) => return fail(2, e),
            };
            match Pepper::new(PepperId(pepper_id), bytes).and_then(|p| Hasher::hmac(vec![p])) {
                Ok(h) => h,
                Err(e) => return fail(2, e),
            }
        }
    };
    input.warned(print_line(hasher.digest(key.expose_secret().as_bytes())))
}

/// Largest pepper file read, in bytes.
const MAX_PEPPER: u64 = 4096;

/// The pepper's raw bytes, read in bounded memory into one buffer that is
/// wiped on drop, a failed read's included (no growth, so no unwiped
/// copies). Warns on stderr about
/// a trailing newline (a text editor or `echo` adds one, and it becomes
/// part of the key) and about a file others can read. Errs with the
/// message to print.
fn read_pepper(path: &Path) -> Result<Secret<Vec<u8>>, String> {
    // A path that does not open may be no path at all but the pepper
    // itself (`--pepper-file "$PEPPER"`): named by its option, never
    // echoed. Once open, the path is a file's and is shown.
    let file = fs::File::open(path).map_err(|e| {
        format!("--pepper-file: {e} (the path is not shown, as it may be the pepper)")
    })?;
    let failed = |e: io::Error| format!("{}: {e}", shown(path));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if file.metadata().map_err(failed)?.permissions().mode() & 0o077 != 0 {
            say(format_args!("warning: {} is readable by others (chmod 600)", shown(path)));
        }
    }
    // Wiped on drop from the start: a read that fails part way has
    // already put pepper bytes in the buffer.
    let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(
        usize::try_from(MAX_PEPPER).unwrap_or(4096) + 1,
    ));
    file.take(MAX_PEPPER + 1).read_to_end(&mut bytes).map_err(failed)?;
    let bytes = Secret::new(std::mem::take(&mut *bytes));
    if bytes.expose_secret().len() as u64 > MAX_PEPPER {
        return Err(format!("{}: a pepper file holds at most {MAX_PEPPER} bytes", shown(path)));
    }
    if bytes.expose_secret().ends_with(b"\n") {
        say(format_args!(
            "warning: {} ends with a newline, which is part of the pepper",
            shown(path)
        ));
    }
    Ok(bytes)
}

fn scan(formats: FormatSet, paths: &[PathBuf]) -> ExitCode {
    let scanner = Scanner::new(formats);
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let mut found = false;
    let mut errors = false;
    // `live`: the input is not a regular file (stdin, a FIFO or
    // `/dev/stdin` named as a path) and may stay open.
    let mut report = |label: &str,
                      live: bool,
                      input: &mut dyn Read,
                      out: &mut dyn Write|
     -> Result<(), Failed> {
        // Set by the first failed write: the input then reads as ended, so
        // a scan whose stdout is gone stops (`tail -f log | keygate scan |
        // head -1` would otherwise read until the log ends, never).
        let write_err = std::cell::Cell::new(None);
        let stopped = std::cell::Cell::new(false);
        let input = UntilStopped { input, stopped: &stopped };
        scanner
            .scan_reader(input, |m| {
                found = true;
                if stopped.get() {
                    return;
                }
                let written = writeln!(
                    out,
                    "{label}:{}:{}: {} {}",
                    m.line(),
                    m.column(),
                    m.format(),
                    m.hint()
                )
                // A pipe may stay open (`tail -f log | keygate scan`): report
                // each key now, not when the buffer fills or the input ends.
                .and_then(|()| if live { out.flush() } else { Ok(()) });
                if let Err(e) = written {
                    write_err.set(Some(e));
                    stopped.set(true);
                }
            })
            .map_err(Failed::Read)?;
        write_err.into_inner().map_or(Ok(()), |e| Err(Failed::Write(e)))
    };
    let stdin = [PathBuf::from("-")];
    let paths = if paths.is_empty() { &stdin[..] } else { paths };
    let mut files = Vec::new();
    for p in paths {
        collect(p, &mut files, &mut errors, true);
    }
    let mut stdout_gone = false;
    for f in files {
        let label = shown(&f);
        // `-` is standard input, as for `inspect` and `hash`.
        let result = if f.as_os_str() == "-" {
            report(&label, true, &mut io::stdin().lock(), &mut out)
        } else {
            fs::File::open(&f).map_err(Failed::Read).and_then(|mut file| {
                let live = file.metadata().map_or(true, |m| !m.is_file());
                report(&label, live, &mut file, &mut out)
            })
        };
        match result {
            Ok(()) => {}
            Err(Failed::Read(e)) => {
                errors = true;
                say(format_args!("{label}: {e}"));
            }
            // Said once, naming stdout: the rest of the files would only
            // repeat it (each under its own name, as if it were unreadable).
            Err(Failed::Write(e)) => {
                errors = true;
                stdout_gone = true;
                say(format_args!("stdout: {e}"));
                break;
            }
        }
    }
    if !stdout_gone && let Err(e) = out.flush() {
        errors = true;
        say(format_args!("stdout: {e}"));
    }
    match (errors, found) {
        (true, _) => ExitCode::from(2),
        (false, true) => ExitCode::from(1),
        (false, false) => ExitCode::SUCCESS,
    }
}

/// Why scanning one input failed: reading it, or writing the report.
enum Failed {
    Read(io::Error),
    Write(io::Error),
}

/// `input` until `stopped` is set, then the end of input.
struct UntilStopped<'a, R: ?Sized> {
    input: &'a mut R,
    stopped: &'a std::cell::Cell<bool>,
}

impl<R: Read + ?Sized> Read for UntilStopped<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.stopped.get() { Ok(0) } else { self.input.read(buf) }
    }
}

/// `path` as printed: any key in it (a key given where a path belongs)
/// as `{hint}[REDACTED]`.
fn shown(path: &Path) -> String {
    // Built once: `scan` labels every file it reads with its path.
    static KEYS: std::sync::LazyLock<Scanner> = std::sync::LazyLock::new(|| {
        Scanner::new(minted_formats().unwrap_or_else(FormatSet::presets))
    });
    let text = path.display().to_string();
    let mut out = Vec::with_capacity(text.len());
    match KEYS.redact(text.as_bytes(), &mut out) {
        Ok(_) => String::from_utf8_lossy(&out).into_owned(),
        Err(_) => "(path)".to_owned(),
    }
}

/// Files under `path`, depth first in name order. A path named on the
/// command line is followed wherever it points (a symbolic link, a FIFO
/// such as `<(cat f)` or `/dev/stdin`: anything that is not a directory is
/// read); inside a directory, symbolic links to directories are not
/// followed, so a link loop cannot hang the scan, and only regular files
/// (or links to them) are read. Whatever cannot be read is reported and
/// makes the exit status 2: a skipped path is never a silent "clean".
fn collect(path: &Path, files: &mut Vec<PathBuf>, errors: &mut bool, named: bool) {
    if named && path.as_os_str() == "-" {
        files.push(path.to_path_buf());
        return;
    }
    let meta = if named { fs::metadata(path) } else { fs::symlink_metadata(path) };
    let meta = match meta {
        Ok(m) => m,
        Err(e) => {
            *errors = true;
            say(format_args!("{}: {e}", shown(path)));
            return;
        }
    };
    if meta.is_dir() {
        let entries = match fs::read_dir(path) {
            Ok(rd) => rd,
            Err(e) => {
                *errors = true;
                say(format_args!("{}: {e}", shown(path)));
                return;
            }
        };
        let mut paths = Vec::new();
        for entry in entries {
            match entry {
                Ok(e) => paths.push(e.path()),
                Err(e) => {
                    *errors = true;
                    say(format_args!("{}: {e}", shown(path)));
                }
            }
        }
        paths.sort();
        for p in paths {
            collect(&p, files, errors, false);
        }
    } else if named || meta.is_file() || (meta.file_type().is_symlink() && path.is_file()) {
        files.push(path.to_path_buf());
    } else if meta.file_type().is_symlink() && !path.exists() {
        // A link to nothing cannot be read: say so rather than pass it by.
        *errors = true;
        say(format_args!("{}: dangling symbolic link", shown(path)));
    }
}

fn redact(formats: FormatSet) -> ExitCode {
    let scanner = Scanner::new(formats);
    let stdout = io::stdout();
    let input = Named { inner: io::stdin().lock(), name: "stdin" };
    let output = Named { inner: BufWriter::new(stdout.lock()), name: "stdout" };
    match scanner.redact(input, output) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => fail(2, e),
    }
}

/// `inner`, its errors prefixed with `name` (`stdin: Is a directory`):
/// [`Scanner::redact`] fails with the error of either side, which alone
/// does not say whether the input or the output failed.
struct Named<T> {
    inner: T,
    name: &'static str,
}

impl<T> Named<T> {
    /// `e`, named; its kind is kept (an `Interrupted` read is retried).
    fn name(&self, e: &io::Error) -> io::Error {
        io::Error::new(e.kind(), format!("{}: {e}", self.name))
    }
}

impl<R: Read> Read for Named<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(|e| self.name(&e))
    }
}

impl<W: Write> Write for Named<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf).map_err(|e| self.name(&e))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().map_err(|e| self.name(&e))
    }
}
