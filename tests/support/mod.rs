//! Real processes shared by the integration test crates: a `sluice serve`
//! child that is killed on drop, a `sluice dev-broker` fixture, and the one
//! `wait_file` they use to learn their addresses; `apache_kafka` starts a
//! real Apache Kafka cluster. Included with
//! `#[path = "../support/mod.rs"] mod support;` (or `#[path = "support/mod.rs"]`
//! from a top-level test file).

// Each test crate uses a different part of this module.
#![allow(dead_code)]

pub mod apache_kafka;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const EXE: &str = env!("CARGO_BIN_EXE_sluice");

/// How long a process gets to write its address file on a loaded machine.
const START_WITHIN: Duration = Duration::from_secs(60);

/// The trimmed contents of `path` once it exists and is not empty.
pub fn wait_file(path: &Path) -> String {
    let t0 = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if !s.trim().is_empty() {
                return s.trim().to_string();
            }
        }
        assert!(
            t0.elapsed() < START_WITHIN,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The `id` header of every record in the WAL, in order, read by the offline
/// `sluice wal dump` (which checks every CRC).
#[allow(dead_code)] // not every test crate reads the WAL this way
pub fn wal_dump_ids(data: &Path) -> Vec<String> {
    let out = Command::new(EXE)
        .args(["wal", "dump", "--data-dir"])
        .arg(data)
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["headers"]["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// A `sluice dev-broker` child, killed and reaped on drop.
pub struct Broker {
    pub child: Child,
    pub addr: String,
}

impl Broker {
    /// Starts a dev broker that writes its address to `dir/broker`;
    /// `partitions` None keeps the broker's default.
    pub fn start(dir: &Path, partitions: Option<u32>) -> Broker {
        let file = dir.join("broker");
        let _ = std::fs::remove_file(&file);
        let mut cmd = Command::new(EXE);
        cmd.arg("dev-broker");
        if let Some(n) = partitions {
            cmd.args(["--partitions", &n.to_string()]);
        }
        let child = cmd
            .arg("--addr-file")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr = wait_file(&file);
        Broker { child, addr }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How to start `sluice serve`; `Daemon::spawn` covers the common case.
pub struct Serve {
    data: PathBuf,
    brokers: Option<String>,
    env: Vec<(String, String)>,
    args: Vec<OsString>,
    wrapper: Vec<String>,
    log: Option<PathBuf>,
    temp: Option<tempfile::TempDir>,
}

impl Serve {
    /// As `new`, on `data` inside a fresh temp dir that lives as long as the
    /// daemon.
    pub fn temp() -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Serve::new(&dir.path().join("data"));
        s.temp = Some(dir);
        s
    }

    /// `sluice serve --listen 127.0.0.1:0 --data-dir DATA`, with no
    /// `--brokers` unless `brokers` is called.
    pub fn new(data: &Path) -> Serve {
        Serve {
            data: data.to_owned(),
            brokers: None,
            env: Vec::new(),
            args: Vec::new(),
            wrapper: Vec::new(),
            log: None,
            temp: None,
        }
    }

    pub fn brokers(mut self, brokers: &str) -> Serve {
        self.brokers = Some(brokers.to_string());
        self
    }

    pub fn envs(mut self, env: &[(&str, &str)]) -> Serve {
        self.env
            .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    /// An extra command-line argument (`--dev`, `--config`, a path).
    pub fn arg(mut self, arg: impl Into<OsString>) -> Serve {
        self.args.push(arg.into());
        self
    }

    /// Runs sluice under `wrapper` (e.g. `strace -f -o FILE`).
    pub fn wrapper(mut self, wrapper: &[&str]) -> Serve {
        self.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Where stderr (the log) goes; by default a fresh file next to DATA.
    pub fn log(mut self, path: &Path) -> Serve {
        self.log = Some(path.to_owned());
        self
    }

    /// Spawns the daemon and waits for its address; panics with the log if
    /// it exits first.
    pub fn start(self) -> Daemon {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let side = |what: &str| {
            let mut name = self.data.file_name().unwrap_or_default().to_owned();
            name.push(format!(".{what}-{}-{n}", std::process::id()));
            self.data.with_file_name(name)
        };
        let addr_file = side("addr");
        let log = self.log.clone().unwrap_or_else(|| side("log"));
        let mut cmd = match self.wrapper.split_first() {
            None => Command::new(EXE),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(EXE);
                c
            }
        };
        cmd.args(["serve", "--listen", "127.0.0.1:0"]);
        if let Some(b) = &self.brokers {
            cmd.args(["--brokers", b]);
        }
        cmd.args(&self.args)
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--addr-file")
            .arg(&addr_file)
            // No admin listener unless a test asks for one: its fixed default
            // port would clash between daemons running in parallel.
            .env("SLUICE_HTTP_ADMIN_LISTEN", "")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = cmd.spawn().unwrap();
        let t0 = Instant::now();
        let addr = loop {
            if let Ok(s) = std::fs::read_to_string(&addr_file) {
                if !s.trim().is_empty() {
                    break s.trim().to_string();
                }
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "sluice serve exited with {status} before serving:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(t0.elapsed() < START_WITHIN, "sluice serve did not start");
            std::thread::sleep(Duration::from_millis(10));
        };
        let _ = std::fs::remove_file(&addr_file);
        Daemon {
            child,
            addr,
            data: self.data,
            log,
            wrapped: !self.wrapper.is_empty(),
            _temp: self.temp,
        }
    }
}

/// A running `sluice serve`. A test that fails before the daemon exits must
/// not leave it behind, so drop kills (SIGKILL) and reaps it.
pub struct Daemon {
    pub child: Child,
    pub addr: String,
    pub data: PathBuf,
    pub log: PathBuf,
    wrapped: bool,
    _temp: Option<tempfile::TempDir>,
}

impl Daemon {
    /// `sluice serve` on `data` with `--brokers` when given and extra
    /// environment `env`.
    pub fn spawn(data: &Path, brokers: Option<&str>, env: &[(&str, &str)]) -> Daemon {
        let mut s = Serve::new(data).envs(env);
        if let Some(b) = brokers {
            s = s.brokers(b);
        }
        s.start()
    }

    pub fn socket_addr(&self) -> SocketAddr {
        self.addr.parse().unwrap()
    }

    /// The pid of sluice itself, which is not our child under a wrapper:
    /// `DATA_DIR/LOCK` holds it.
    pub fn pid(&self) -> String {
        if self.wrapped {
            std::fs::read_to_string(self.data.join("LOCK"))
                .unwrap()
                .trim()
                .to_string()
        } else {
            self.child.id().to_string()
        }
    }

    /// Sends `sig` (e.g. "TERM", "KILL") to sluice; asserts `kill` succeeded.
    pub fn signal(&self, sig: &str) {
        assert!(Command::new("kill")
            .args(["-s", sig, &self.pid()])
            .status()
            .unwrap()
            .success());
    }

    /// The exit status if the daemon exits within `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if t0.elapsed() > within {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM to sluice, then waits for the child.
    pub fn stop(mut self) -> ExitStatus {
        self.signal("TERM");
        self.child.wait().unwrap()
    }

    /// SIGKILL and reap: a crash.
    pub fn kill_9(mut self) -> ExitStatus {
        self.signal("KILL");
        self.child.wait().unwrap()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if self.wrapped {
                if let Ok(pid) = std::fs::read_to_string(self.data.join("LOCK")) {
                    let _ = Command::new("kill").args(["-9", pid.trim()]).status();
                }
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
