//! The `keygate` binary's contract, driven through the real executable.
#![cfg(feature = "cli")]

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn keygate(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command that refuses its arguments exits without reading its
    // input: the pipe may be closed before (or while) it is written.
    match child.stdin.take().unwrap().write_all(stdin) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        written => written.unwrap(),
    }
    child.wait_with_output().unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    let s = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(s.lines().count(), 1, "one line: {s}");
    serde_json::from_str(&s).unwrap()
}

#[test]
fn mint_every_format_and_inspect_it_back() {
    for (fmt, env, region, key_id) in [
        ("nhk", false, true, false),
        ("nhm", false, false, false),
        ("nk", true, false, true),
        ("sk", true, false, false),
        ("nh", false, false, false),
    ] {
        let out = keygate(&["mint", fmt], b"");
        assert!(out.status.success(), "{fmt}");
        let v = json(&out);
        assert_eq!(v["format"], fmt);
        assert_eq!(v["environment"].is_string(), env, "{fmt}");
        assert_eq!(v["region"].is_string(), region, "{fmt}");
        assert_eq!(v["key_id"].is_string(), key_id, "{fmt}");
        let key = v["key"].as_str().unwrap().to_owned();

        // From the argument…
        let out = keygate(&["inspect", &key], b"");
        assert!(out.status.success());
        let parts = json(&out);
        assert_eq!(parts["hint"], v["hint"]);
        assert!(parts.get("key").is_none());
        assert!(!String::from_utf8_lossy(&out.stdout).contains(&key));
        // …and from stdin, with one trailing newline stripped.
        let out = keygate(&["inspect"], format!("{key}\n").as_bytes());
        assert!(out.status.success());
        assert_eq!(json(&out), parts);
        let out = keygate(&["inspect", "-"], key.as_bytes());
        assert!(out.status.success());
    }
}

#[test]
fn mint_defaults_and_options() {
    let v = json(&keygate(&["mint", "sk"], b""));
    assert_eq!(v["environment"], "live");
    assert!(v["hint"].as_str().unwrap().starts_with("sk_live_"));
    let v = json(&keygate(&["mint", "nhk", "--region", "eu"], b""));
    assert!(v["key"].as_str().unwrap().starts_with("nhk_eu_"));
    let v = json(&keygate(&["mint", "nk", "--env", "test"], b""));
    assert!(v["key"].as_str().unwrap().starts_with("nk_test_"));
    assert!(v["hint"].as_str().unwrap().ends_with(v["key_id"].as_str().unwrap()));
    for bad in [
        &["mint", "zz"][..],
        &["mint", "sk", "--env", "prod"],
        &["mint", "sk", "--env", "Live"],
        &["mint", "nh", "--env", "live"],
        &["mint", "nhk", "--region", "usa"],
    ] {
        let out = keygate(bad, b"");
        assert!(!out.status.success(), "{bad:?}");
        assert!(out.stdout.is_empty());
        assert!(!out.stderr.is_empty());
    }
    // The unknown-format error lists every format `mint` takes.
    let err = String::from_utf8(keygate(&["mint", "zz"], b"").stderr).unwrap();
    assert!(err.contains("nhk") && err.contains("kgpc") && err.contains("kgpt"), "{err}");
    assert!(keygate(&["mint", "kgpt"], b"").status.success());
}

#[test]
fn inspect_rejects_without_echoing() {
    let secret = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdeF";
    for input in [
        format!("nh_{secret}"),
        format!(" nh_{}", &secret[..63]),
        format!("nh_{}\n\n", &secret[..63]),
        String::new(),
        "x".repeat(5000),
    ] {
        let out = keygate(&["inspect"], input.as_bytes());
        assert_eq!(out.status.code(), Some(1), "{input:?}");
        assert!(out.stdout.is_empty());
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(!err.contains(&secret[..20]), "{err}");
    }
    // Given as an argument, a refused key is still one line, warning and
    // all; so for `hash`.
    for command in ["inspect", "hash"] {
        let out = keygate(&[command, &format!("nh_{secret}")], b"");
        assert_eq!(out.status.code(), Some(1));
        assert!(out.stdout.is_empty());
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("invalid key") && err.contains("pipe it in"), "{err}");
        assert!(!err.contains(&secret[..20]), "{err}");
    }
}

/// An empty directory `{name}-{pid}` under the temp dir. Emptied first: a
/// run of this process id that stopped midway (a failure, a kill) left its
/// files there (links, a FIFO), and a later process given the same id
/// found them and failed.
fn fresh_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn scan_files_directories_and_stdin() {
    let nh = json(&keygate(&["mint", "nh"], b""))["key"].as_str().unwrap().to_owned();
    let sk = json(&keygate(&["mint", "sk"], b""))["key"].as_str().unwrap().to_owned();
    let dir = fresh_dir("keygate-cli");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("a.log"), format!("ok\nauth {nh} done\n")).unwrap();
    std::fs::write(dir.join("sub/b.env"), format!("KEY={sk}\n")).unwrap();
    std::fs::write(dir.join("clean.txt"), "nothing here nh_1234\n").unwrap();

    let out = keygate(&["scan", dir.to_str().unwrap()], b"");
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].ends_with(&format!("a.log:2:6: nh {}", &nh[..7])), "{}", lines[0]);
    assert!(lines[1].ends_with(&format!("b.env:1:5: sk {}", &sk[..11])), "{}", lines[1]);
    assert!(!text.contains(&nh) && !text.contains(&sk));

    let out = keygate(&["scan", dir.join("clean.txt").to_str().unwrap()], b"");
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());

    let out = keygate(&["scan"], format!("x {nh}").as_bytes());
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("-:1:3: nh {}\n", &nh[..7]));

    let out = keygate(&["scan", dir.join("missing").to_str().unwrap()], b"");
    assert_eq!(out.status.code(), Some(2));

    // Named paths are followed wherever they point: a link to a directory,
    // a FIFO (as `<(cat f)` gives). A dangling link is an error, never a
    // silent "clean".
    #[cfg(unix)]
    {
        use std::os::unix::fs::symlink;
        symlink(dir.join("sub"), dir.join("link-to-sub")).unwrap();
        let out = keygate(&["scan", dir.join("link-to-sub").to_str().unwrap()], b"");
        assert_eq!(out.status.code(), Some(1), "a named link to a directory is scanned");
        symlink(dir.join("nowhere"), dir.join("dangling")).unwrap();
        let out = keygate(&["scan", dir.join("dangling").to_str().unwrap()], b"");
        assert_eq!(out.status.code(), Some(2), "a dangling link is reported");
        let fifo = dir.join("fifo");
        let made = Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success());
        if made {
            let path = fifo.clone();
            let key = sk.clone();
            let writer = std::thread::spawn(move || std::fs::write(path, format!("{key}\n")));
            let out = keygate(&["scan", fifo.to_str().unwrap()], b"");
            // Before joining: a scan that skipped the FIFO leaves the writer
            // blocked, and this fails instead of hanging.
            assert_eq!(out.status.code(), Some(1), "a named FIFO is read");
            writer.join().unwrap().unwrap();
        }
        // Inside a directory too, a dangling link is reported.
        let out = keygate(&["scan", dir.to_str().unwrap()], b"");
        assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains("dangling symbolic link"));
    }
    // `-` is standard input, beside files.
    let clean = dir.join("clean.txt");
    let out = keygate(&["scan", clean.to_str().unwrap(), "-"], format!("x {nh}").as_bytes());
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("-:1:3: nh {}\n", &nh[..7]));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn redact_streams_stdin_to_stdout() {
    let nh = json(&keygate(&["mint", "nh"], b""))["key"].as_str().unwrap().to_owned();
    let mut input = b"\xff\x00 bearer ".to_vec();
    input.extend_from_slice(nh.as_bytes());
    input.extend_from_slice(b"\r\n");
    let out = keygate(&["redact"], &input);
    assert!(out.status.success());
    let mut want = b"\xff\x00 bearer ".to_vec();
    want.extend_from_slice(format!("{}[REDACTED]\r\n", &nh[..7]).as_bytes());
    assert_eq!(out.stdout, want);
    // Portal codes (in URLs, so in access logs) and access tokens (in
    // cookies) too.
    let code = json(&keygate(&["mint", "kgpc"], b""))["key"].as_str().unwrap().to_owned();
    let token = json(&keygate(&["mint", "kgpt"], b""))["key"].as_str().unwrap().to_owned();
    let log = format!("GET /portal?code={code} 200\nCookie: kg_portal={token}\n");
    let out = keygate(&["redact"], log.as_bytes());
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains(&code[9..]) && !text.contains(&token[9..]), "{text}");
    assert_eq!(text.matches("[REDACTED]").count(), 2, "{text}");
}

#[test]
fn hash_prints_the_stored_digest() {
    let v = json(&keygate(&["mint", "sk"], b""));
    let key = v["key"].as_str().unwrap();
    let digest = v["digest"].as_str().unwrap();
    assert!(digest.starts_with("sha256$") && digest.len() == 7 + 64);
    let out = keygate(&["hash", key], b"");
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("{digest}\n"));
    // An argument shows in `ps` and shell history: said so, on stderr.
    assert!(String::from_utf8(out.stderr).unwrap().contains("pipe it in"));
    let out = keygate(&["hash"], format!("{key}\n").as_bytes());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("{digest}\n"));
    assert!(out.stderr.is_empty(), "stdin is the quiet way");

    let dir = fresh_dir("keygate-pepper");
    let pepper = dir.join("pepper");
    std::fs::write(&pepper, [7u8; 32]).unwrap();
    let out =
        keygate(&["hash", key, "--pepper-file", pepper.to_str().unwrap(), "--pepper-id", "3"], b"");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("hmac-sha256$3$"), "{text}");
    assert_ne!(text.trim_end(), digest);
    std::fs::write(&pepper, [7u8; 8]).unwrap();
    let out = keygate(&["hash", key, "--pepper-file", pepper.to_str().unwrap()], b"");
    assert_eq!(out.status.code(), Some(2));
    // A trailing newline is kept (random bytes may end in one) but flagged;
    // a huge file is refused in bounded memory.
    let mut text_pepper = vec![b'a'; 64];
    text_pepper.push(b'\n');
    std::fs::write(&pepper, &text_pepper).unwrap();
    let out = keygate(&["hash", key, "--pepper-file", pepper.to_str().unwrap()], b"");
    assert!(out.status.success());
    assert!(String::from_utf8(out.stderr).unwrap().contains("ends with a newline"));
    std::fs::write(&pepper, vec![7u8; 5000]).unwrap();
    let out = keygate(&["hash", key, "--pepper-file", pepper.to_str().unwrap()], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8(out.stderr).unwrap().contains("at most 4096 bytes"));
    std::fs::remove_dir_all(&dir).unwrap();

    let out = keygate(&["hash", "sk_live_nope"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
}

/// The first line `keygate scan [PATH]` reports for a key written to its
/// stdin, which stays open while it is read (or `None` after 10 s).
fn first_report_while_stdin_is_open(path: Option<&str>) -> Option<String> {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("scan")
        .args(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let hex = "0123456789abcdef".repeat(4);
    writeln!(stdin, "GET /ping token=nh_{hex} 200").unwrap();
    stdin.flush().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let got = rx.recv_timeout(std::time::Duration::from_secs(10)).ok();
    drop(stdin);
    let _ = child.wait();
    got
}

#[test]
fn scan_reports_a_key_while_stdin_stays_open() {
    // `tail -f app.log | keygate scan`: a key is reported as its line
    // arrives, not when the input ends.
    assert_eq!(
        first_report_while_stdin_is_open(None).as_deref(),
        Some("-:1:17: nh nh_0123\n"),
        "reported while the pipe is open"
    );
}

#[cfg(target_os = "linux")]
#[test]
fn scan_reports_a_key_while_a_named_pipe_stays_open() {
    // `keygate scan <(tail -f app.log)`, or `/dev/stdin` named as a path:
    // a pipe given by name is reported on as promptly as `-`.
    assert_eq!(
        first_report_while_stdin_is_open(Some("/dev/stdin")).as_deref(),
        Some("/dev/stdin:1:17: nh nh_0123\n"),
        "reported while the pipe is open"
    );
}

#[test]
fn argument_errors_never_echo_a_key() {
    // A key put where another value belongs (`mint` for `inspect`, an
    // option's value, a second positional) is refused without printing it:
    // stderr ends up in CI logs and terminals' scrollback.
    let v = json(&keygate(&["mint", "sk"], b""));
    let key = v["key"].as_str().unwrap().to_owned();
    let tail = &key[v["hint"].as_str().unwrap().len()..];
    let dashed = format!("--{key}");
    // Glued after word bytes (`dir_` + key, as `"dir_$KEY"` expands): the
    // key is no whole run, but is still hidden.
    let glued = format!("dir_{key}");
    for args in [
        vec!["mint", key.as_str()],
        vec!["inspect", "x", key.as_str()],
        vec!["hash", "--pepper-id", key.as_str()],
        vec!["hash", &key, &key],
        vec!["mint", "sk", "--env", key.as_str()],
        vec!["mint", "nhk", "--region", key.as_str()],
        vec![key.as_str()],
        // `scan` takes paths: a key given instead is reported unreadable,
        // by its hint.
        vec!["scan", key.as_str()],
        vec!["scan", glued.as_str()],
        vec!["hash", key.as_str(), "--pepper-file", key.as_str()],
        // Read as an unknown flag (`--"$KEY"`), whose name clap's message
        // quotes.
        vec!["inspect", dashed.as_str()],
        vec!["scan", "-", dashed.as_str()],
    ] {
        let out = keygate(&args, b"");
        assert!(!out.status.success(), "{args:?}");
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!all.is_empty());
        for w in tail.as_bytes().windows(8) {
            let w = std::str::from_utf8(w).unwrap();
            assert!(!all.contains(w), "{args:?} leaked {w:?}: {all}");
        }
    }
    // Help and version still print as usual.
    let out = keygate(&["--help"], b"");
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("inspect"));
    assert!(keygate(&["--version"], b"").status.success());
    let out = keygate(&["hash"], b"");
    assert!(!out.status.success());
}

#[test]
fn pepper_id_without_a_pepper_file_is_refused() {
    // `--pepper-id` names the pepper of `--pepper-file`; alone it printed a
    // plain SHA-256 digest, as if it had been taken.
    let key = json(&keygate(&["mint", "sk"], b""))["key"].as_str().unwrap().to_owned();
    let out = keygate(&["hash", "--pepper-id", "3"], format!("{key}\n").as_bytes());
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("--pepper-file"), "{err}");
    assert!(!err.contains(&key[8..]), "{err}");
    // With the key as an argument too, the refusal does not show it.
    let out = keygate(&["hash", &key, "--pepper-id", "3"], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&out.stderr).contains(&key[8..]));
}

/// A pipe whose reading end is already closed, as `| head -0` leaves
/// stdout: every write to it fails with `EPIPE`.
fn closed_pipe() -> std::io::PipeWriter {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    writer
}

#[test]
fn a_closed_stderr_is_no_panic() {
    // `keygate … 2>&1 | head -1`: stderr is the closed pipe too. Each
    // command still exits with its own status, not 101 from a panic in
    // `eprintln!`.
    for (args, stdin, code) in [
        (&["mint", "zz"][..], &b""[..], 2),
        (&["mint", "sk"], b"", 2),
        (&["inspect"], b"nope", 1),
        (&["hash", "-"], b"", 1),
        (&["scan", "/nonexistent/keygate"], b"", 2),
    ] {
        let pipe = closed_pipe();
        let status = Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(pipe.try_clone().unwrap())
            .stderr(pipe)
            .spawn()
            .and_then(|mut child| {
                child.stdin.take().unwrap().write_all(stdin)?;
                child.wait()
            })
            .unwrap();
        assert_eq!(status.code(), Some(code), "{args:?}");
    }
}

#[test]
fn scan_stops_at_a_closed_stdout() {
    // `keygate scan dir | head -1`: once stdout is gone the scan stops, with
    // one error naming stdout (not one per remaining file, each blaming
    // that file).
    let sk = json(&keygate(&["mint", "sk"], b""))["key"].as_str().unwrap().to_owned();
    let dir = fresh_dir("keygate-cli-closed");
    let lines = format!("x {sk}\n").repeat(1000);
    for i in 0..20 {
        std::fs::write(dir.join(format!("f{i:02}")), &lines).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["scan", dir.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(closed_pipe())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("stdout") && !err.contains("f0"), "{err}");

    // `tail -f app.log | keygate scan | head -1`: the input never ends, so
    // the scan must stop on the failed write, not at the end of input.
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("scan")
        .stdin(Stdio::piped())
        .stdout(closed_pipe())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "x {sk}").unwrap();
    stdin.flush().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    drop(stdin);
    let _ = child.wait();
    assert_eq!(status.and_then(|s| s.code()), Some(2), "exits while its input stays open");
}

#[test]
fn an_unreadable_stdin_is_an_error_not_a_refused_key() {
    // Status 1 from `inspect` and `hash` says the input is not a key (a
    // script tells it from a failure by that); a read that fails is a
    // failure, 2, as for an unreadable file in `scan` or `--pepper-file`.
    let dir = fresh_dir("keygate-cli-stdin-dir");
    for command in ["inspect", "hash"] {
        let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
            .arg(command)
            .stdin(std::fs::File::open(&dir).unwrap())
            .output()
            .unwrap();
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(2), "{command}: {err}");
        assert!(out.stdout.is_empty());
        assert!(err.contains("stdin"), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_pepper_given_in_place_of_its_file_is_not_echoed() {
    // `--pepper-file "$PEPPER"`: the pepper where its path belongs. As for
    // a misplaced key, the refusal names the option, not the value.
    let key = json(&keygate(&["mint", "sk"], b""))["key"].as_str().unwrap().to_owned();
    let pepper = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    for pepper in [pepper.to_owned(), format!("sub/{pepper}")] {
        let out = keygate(&["hash", "--pepper-file", &pepper], format!("{key}\n").as_bytes());
        assert_eq!(out.status.code(), Some(2));
        assert!(out.stdout.is_empty());
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains("--pepper-file"), "{err}");
        assert!(!err.contains(&pepper[pepper.len() - 16..]), "{err}");
    }
}

#[test]
fn help_states_the_exit_statuses() {
    // Scripts and CI branch on the status (`keygate scan` exits 1 when it
    // finds a key, `inspect` when it refuses one): each command's help
    // says what its statuses mean, and `mint` and `redact` have no 1.
    for (command, one) in [
        ("mint", None),
        ("inspect", Some("refused")),
        ("hash", Some("refused")),
        ("scan", Some("key")),
        ("redact", None),
    ] {
        let out = keygate(&[command, "--help"], b"");
        assert!(out.status.success());
        let help = String::from_utf8(out.stdout).unwrap();
        let statuses = help.split_once("Exit status:").map(|(_, s)| s).unwrap_or_default();
        let status = |n: char| statuses.lines().find(|l| l.trim_start().starts_with(n));
        assert!(status('0').is_some() && status('2').is_some(), "{command}: {help}");
        match one {
            Some(word) => assert!(status('1').is_some_and(|l| l.contains(word)), "{help}"),
            None => assert!(status('1').is_none(), "{command}: {help}"),
        }
    }
}

#[test]
fn a_failed_redact_names_the_stream() {
    // `keygate: Broken pipe` or `keygate: Is a directory` alone does not
    // say which side failed; `scan` says `stdout: …` and `-: …`.
    let dir = fresh_dir("keygate-cli-redact-stdin");
    let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("redact")
        .stdin(std::fs::File::open(&dir).unwrap())
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.starts_with("keygate: stdin: "), "{err}");

    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("redact")
        .stdin(Stdio::piped())
        .stdout(closed_pipe())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The write fails once the output is flushed, at the latest at the end
    // of input; the command may exit before all of it is written.
    let _ = child.stdin.take().unwrap().write_all(b"a line\n");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.starts_with("keygate: stdout: "), "{err}");
}

#[test]
fn a_repeated_option_is_named() {
    // `--env live --env test` was refused as "an argument cannot be used
    // with one or more of the other specified arguments", naming none.
    for (args, name) in [
        (&["mint", "sk", "--env", "live", "--env", "test"][..], "--env"),
        (&["hash", "--pepper-file", "a", "--pepper-file", "b"], "--pepper-file"),
    ] {
        let out = keygate(args, b"");
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(name) && err.contains("more than once"), "{args:?}: {err}");
    }
}
