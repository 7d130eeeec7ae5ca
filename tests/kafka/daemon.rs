//! Real processes for the tests that need one: `sluice dev-broker`, `sluice
//! serve` (optionally under a wrapper such as strace), and plain HTTP/1.1.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const EXE: &str = env!("CARGO_BIN_EXE_sluice");

pub fn wait_file(path: &Path) -> String {
    let t0 = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if !s.trim().is_empty() {
                return s.trim().to_string();
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One HTTP/1.1 request; returns the status and the body.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

pub fn get(addr: &str, path: &str) -> String {
    http(addr, "GET", path, "text/plain", b"").1
}

pub fn get_json(addr: &str, path: &str) -> serde_json::Value {
    serde_json::from_str(&get(addr, path)).unwrap()
}

/// A sample of a Prometheus metric without labels.
pub fn metric(addr: &str, name: &str) -> f64 {
    get(addr, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing"))
}

/// POSTs events `{id: prefix-n, tenant_id, source, message}` for `range`;
/// returns the response's last_seq.
pub fn post_events(addr: &str, prefix: &str, range: std::ops::Range<usize>) -> u64 {
    let events: Vec<_> = range
        .map(|n| serde_json::json!({"id": format!("{prefix}-{n}"), "tenant_id": "t", "source": "test", "message": format!("event {n} of {prefix}")}))
        .collect();
    let (status, body) = http(
        addr,
        "POST",
        "/v1/events",
        "application/json",
        &serde_json::to_vec(&events).unwrap(),
    );
    assert_eq!(status, 202, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["last_seq"].as_u64().unwrap()
}

pub struct Broker {
    child: Child,
    pub addr: String,
}

impl Broker {
    pub fn start(dir: &Path) -> Broker {
        let file = dir.join("broker-addr");
        let child = Command::new(EXE)
            .args(["dev-broker", "--partitions", "1", "--addr-file"])
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

pub struct Daemon {
    child: Child,
    pub addr: String,
    pub data: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// `sluice serve` on `data` with 4 KiB segments and a 20 ms commit
    /// interval (so GC runs constantly), prefixed by `wrapper` if not empty.
    pub fn start(
        dir: &Path,
        data: &Path,
        brokers: &str,
        env: &[(&str, &str)],
        wrapper: &[&str],
    ) -> Daemon {
        let n = std::fs::read_dir(dir).unwrap().count();
        let addr_file = dir.join(format!("addr-{n}"));
        let log = dir.join(format!("serve-{n}.log"));
        let mut cmd = match wrapper.split_first() {
            None => Command::new(EXE),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(EXE);
                c
            }
        };
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--brokers", brokers])
            .arg("--data-dir")
            .arg(data)
            .arg("--addr-file")
            .arg(&addr_file)
            .env("SLUICE_WAL_SEGMENT_BYTES", "4096")
            .env("SLUICE_WAL_MIN_FREE_BYTES", "0")
            .env("SLUICE_REPLAY_COMMIT_INTERVAL_MS", "20")
            .env("SLUICE_LOG_FORMAT", "json")
            // No admin listener: its fixed default port would clash between parallel daemons.
            .env("SLUICE_HTTP_ADMIN_LISTEN", "")
            .envs(env.iter().copied())
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
            assert!(t0.elapsed() < Duration::from_secs(60), "no address");
            std::thread::sleep(Duration::from_millis(10));
        };
        Daemon {
            child,
            addr,
            data: data.to_owned(),
            log,
        }
    }

    /// Waits until every record up to `seq` is committed.
    pub fn wait_committed(&self, seq: u64) {
        let t0 = Instant::now();
        loop {
            let stats = get_json(&self.addr, "/stats");
            if stats["replay"]["committed"].as_u64() >= Some(seq) {
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "{stats}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM to sluice itself (its pid is in `DATA_DIR/LOCK`, which works
    /// under a wrapper too), then waits for the child.
    pub fn stop(mut self) -> ExitStatus {
        let pid = std::fs::read_to_string(self.data.join("LOCK")).unwrap();
        Command::new("kill").arg(pid.trim()).status().unwrap();
        self.child.wait().unwrap()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A test that fails before `stop` must not leave a daemon behind.
impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // sluice itself, which is not our child under a wrapper.
            if let Ok(pid) = std::fs::read_to_string(self.data.join("LOCK")) {
                let _ = Command::new("kill").args(["-9", pid.trim()]).status();
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Every `seq` and `id` header in `topic`, in consumed order.
pub fn consume_all(brokers: &str, topic: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    sluice::dev::consume::consume(brokers, topic, true, None, Duration::from_secs(3), |c| {
        out.push((
            c.header("seq").unwrap().parse().unwrap(),
            c.header("id").unwrap().to_string(),
        ))
    })
    .unwrap();
    out
}
