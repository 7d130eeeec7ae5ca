//! A daemon child whose files are on the mount but whose log and address
//! file are not: a start is judged by whether it writes its address, and a
//! cut never takes the evidence with it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a start may take on a loaded machine before it counts as hung.
pub const START_WITHIN: Duration = Duration::from_secs(120);

pub struct Daemon {
    child: Child,
    addr_file: PathBuf,
    pub log: PathBuf,
    /// Where this process's lines begin in `log`.
    log_from: u64,
}

impl Daemon {
    /// Spawns `cmd` (its `--addr-file` must be `addr_file`), appending its
    /// stderr to `log` after a line naming the start.
    pub fn spawn(mut cmd: Command, addr_file: &Path, log: &Path, label: &str) -> Daemon {
        let _ = std::fs::remove_file(addr_file);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        writeln!(f, "=== powercut: {label}").expect("log file");
        let log_from = f.metadata().map_or(0, |m| m.len());
        let child = cmd
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("spawn the daemon");
        Daemon {
            child,
            addr_file: addr_file.to_owned(),
            log: log.to_owned(),
            log_from,
        }
    }

    /// Waits until the daemon serves: its address file appears (written
    /// once it listens, before it opens its storage) and `GET /health`
    /// answers (after recovery). Returns the address; a start that exits
    /// or hangs instead is an error that quotes the end of its log.
    pub fn serving(&mut self) -> Result<String, String> {
        let t0 = Instant::now();
        let mut addr = None;
        loop {
            if addr.is_none() {
                addr = std::fs::read_to_string(&self.addr_file)
                    .ok()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty());
            }
            if let Some(a) = &addr {
                // Queued in the listen backlog until the daemon accepts.
                if super::shared::http(a, "GET", "/health", "").is_ok_and(|(code, _)| code == 200) {
                    return Ok(a.clone());
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "exited with {status} before serving:\n{}",
                    self.log_tail()
                ));
            }
            if t0.elapsed() > START_WITHIN {
                return Err(format!(
                    "did not serve within {START_WITHIN:?}:\n{}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The exit status if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL, then reap: nothing of it touches the mount afterwards.
    pub fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().expect("wait for the daemon")
    }

    /// This process's lines of the log.
    pub fn log_text(&self) -> String {
        let all = std::fs::read(&self.log).unwrap_or_default();
        let from = (self.log_from as usize).min(all.len());
        String::from_utf8_lossy(&all[from..]).into_owned()
    }

    fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill_9();
    }
}

/// Every `first_seq..=last_seq` a "WAL records lost" line of `log` names.
pub fn lost_ranges(log: &str) -> Vec<(u64, u64)> {
    let field = |line: &str, name: &str| -> Option<u64> {
        let at = line.find(name)? + name.len();
        let digits: String = line[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    log.lines()
        .filter(|l| l.contains("WAL records lost"))
        .filter_map(|l| Some((field(l, " first_seq=")?, field(l, " last_seq=")?)))
        .collect()
}
