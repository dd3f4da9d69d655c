//! A throwaway `redis-server` for tests and benches: loopback only, a port
//! chosen at run time, no persistence, killed on drop.

#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where `name` is on `PATH` (plus the usual sbin folders).
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A running `redis-server`.
pub struct RedisServer {
    bin: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free loopback port.
    ///
    /// # Panics
    ///
    /// When no `redis-server` binary is installed (with a message saying how
    /// to install one), or it does not come up within 10 s.
    pub fn start() -> Self {
        let bin = find_binary("redis-server").unwrap_or_else(|| {
            panic!(
                "redis-server not found on PATH: the redis feature's tests need a real Redis. \
                 Install it (Debian/Ubuntu: `apt-get install redis-server`; macOS: `brew install \
                 redis`); `bash scripts/test.sh` installs it automatically when run as root."
            )
        });
        // Redis has no `--port 0`: take a free port from the OS, release
        // it, and hand it to the server.
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
            l.local_addr().expect("local addr").port()
        };
        let mut s = Self { bin, port, child: None };
        s.restart();
        s
    }

    /// The server's working directory (under the system's temp dir).
    fn dir(&self) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("keygate-redis-{}", self.port))
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (as a crash would).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port (empty: no persistence).
    ///
    /// # Panics
    ///
    /// When it does not answer `PING` within 10 s.
    pub fn restart(&mut self) {
        self.stop();
        // Its own working directory: a server made a replica writes the
        // data it syncs (`dump.rdb`) there, not into the crate.
        let dir = self.dir();
        std::fs::create_dir_all(&dir).expect("create the server's directory");
        let child = Command::new(&self.bin)
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .arg("--dir")
            .arg(&dir)
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "yes"])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not answer PING within 10 s", self.port);
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// Sends a signal (`STOP`, `CONT`) to the server.
    pub fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let ok = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(pid.to_string())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "kill -{sig} {pid}");
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // A stopped (SIGSTOP) server must be continued to die cleanly.
        if self.child.is_some() {
            let _ =
                Command::new("kill").arg("-CONT").arg(self.pid().unwrap_or(0).to_string()).status();
        }
        self.stop();
        let _ = std::fs::remove_dir_all(self.dir());
    }
}
