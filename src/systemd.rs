//! systemd integration over `$NOTIFY_SOCKET` (sd-notify): READY=1 once the
//! WAL is recovered and the listener bound, STOPPING=1 when shutdown starts,
//! and WATCHDOG=1 pings at half of `WatchdogSec` from a task that pings only
//! while the WAL writer and the replayer are alive and the WAL has not
//! failed. A wedged runtime stops the pings too, since the task runs on it.
//! Outside systemd these do nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

pub fn ready(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Still starting (a retried read): says why, and asks systemd for `usec`
/// more before its start timeout.
pub fn extend_start(status: &str, usec: u32) {
    let _ = sd_notify::notify(&[
        NotifyState::ExtendTimeoutUsec(usec),
        NotifyState::Status(status),
    ]);
}

pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Pings the watchdog while `alive()` holds. Returns when the watchdog is not
/// enabled for this process (no `WATCHDOG_USEC`).
pub async fn watchdog(alive: impl Fn() -> Option<&'static str>) {
    let Some(timeout) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (timeout / 2).max(Duration::from_millis(10));
    let mut warned = false;
    loop {
        tokio::time::sleep(every).await;
        match alive() {
            None => {
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            }
            Some(dead) if !warned => {
                warned = true;
                tracing::error!(component = dead, "not pinging the systemd watchdog: a core task is gone; systemd will restart sluice");
            }
            Some(_) => {}
        }
    }
}

/// Set while a task runs; cleared when its future ends or panics.
#[derive(Clone)]
pub struct Alive(Arc<AtomicBool>);

impl Alive {
    /// A flag and the guard that clears it when dropped.
    pub fn pair() -> (Alive, AliveGuard) {
        let flag = Arc::new(AtomicBool::new(true));
        (Alive(flag.clone()), AliveGuard(flag))
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

pub struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    fn drain(sock: &UnixDatagram) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 512];
        while let Ok(n) = sock.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).trim().to_string());
        }
        out
    }

    /// The only test in this binary that touches NOTIFY_SOCKET.
    #[tokio::test]
    async fn watchdog_pings_only_while_alive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_nonblocking(true).unwrap();
        std::env::set_var("NOTIFY_SOCKET", &path);
        std::env::set_var("WATCHDOG_USEC", "40000");
        let (alive, guard) = Alive::pair();
        let a = alive.clone();
        let task = tokio::spawn(watchdog(move || (!a.get()).then_some("replayer")));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let pings = drain(&sock);
        assert!(
            pings.len() >= 4 && pings.iter().all(|p| p == "WATCHDOG=1"),
            "{pings:?}"
        );
        drop(guard); // the task it watches is gone
        tokio::time::sleep(Duration::from_millis(50)).await;
        drain(&sock);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            drain(&sock),
            Vec::<String>::new(),
            "no pings once a core task died"
        );
        task.abort();
        std::env::remove_var("NOTIFY_SOCKET");
        std::env::remove_var("WATCHDOG_USEC");
    }
}
