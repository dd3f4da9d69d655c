//! The reference server's example binary, started as a real process.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

/// `target/<profile>/examples/server`. `cargo test` builds examples only as
/// test harnesses, so the suite (`scripts/test.sh`) builds the real binary
/// first with `cargo build --all-features --examples`.
pub fn example_binary() -> PathBuf {
    // Tests run from target/<profile>/deps; examples live beside it.
    let exe = std::env::current_exe().expect("test executable path");
    let profile = exe.parent().and_then(|d| d.parent()).expect("target/<profile>");
    let bin = profile.join("examples").join(format!("server{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --all-features --examples` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// A running server, killed when dropped (pass or fail).
pub struct Running {
    child: Child,
    /// The first stdout line, parsed.
    pub first: Value,
    /// The raw first line.
    pub line: String,
}

impl Running {
    /// Starts the server with `args` and `envs`, and reads its first line.
    pub fn start(args: &[&std::ffi::OsStr], envs: &[(&str, &str)]) -> Self {
        let bin = example_binary();
        let mut child = Command::new(&bin)
            .args(args)
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut running = Self { child, first: Value::Null, line: String::new() };
        BufReader::new(stdout).read_line(&mut running.line).expect("first line");
        running.first = serde_json::from_str(&running.line)
            .unwrap_or_else(|e| panic!("first line is not JSON ({e}): {:?}", running.line));
        running
    }

    /// `http://host:port`.
    pub fn base(&self) -> String {
        format!("http://{}", self.first["listening"].as_str().expect("listening"))
    }

    /// The bootstrap management token.
    pub fn token(&self) -> String {
        self.first["management_token"].as_str().expect("management_token").to_owned()
    }

    /// Stops the server with `signal` (`INT`, as Ctrl-C does, or `TERM`,
    /// as service managers do: a graceful shutdown either way) and waits
    /// for it to exit, at most 10 seconds.
    pub fn stop_with(&mut self, signal: &str) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args([&format!("-{signal}"), &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -{signal} {pid}");
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("server status") {
                break status;
            }
            assert!(start.elapsed().as_secs() < 10, "the server ignored SIG{signal}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(status.success(), "SIG{signal}: not a clean shutdown ({status})");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
