//! The `[http]` section.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Seconds a client is told to wait (`Retry-After`) when the WAL is full,
    /// the disk is low or the daemon is shutting down. Default 5.
    pub retry_after_secs: u64,
    /// A request body must arrive within this many milliseconds, else 408.
    /// Default 30000.
    pub body_timeout_ms: u64,
    /// Request headers must arrive within this many milliseconds, else the
    /// connection is closed (slowloris). It also bounds how long an idle
    /// keep-alive connection waits for its next request. Default 10000.
    pub header_timeout_ms: u64,
    /// Largest request head (request line and headers) in bytes; larger gets
    /// 431. At least 8192. Default 65536.
    pub max_header_bytes: usize,
    /// Open connections at most; past it, new connections are closed at
    /// once. Default 10000 (raise LimitNOFILE to match).
    pub max_connections: usize,
    /// Deadline for a whole ingest request, from its head to the answer, in
    /// milliseconds. It never cuts a WAL append in half: a batch handed to
    /// the writer is written whole or not at all, and a client whose
    /// deadline passes while its batch is being fsynced gets 503 (the
    /// events may still be delivered; their ids make a retry safe to
    /// deduplicate). Default 60000.
    pub request_timeout_ms: u64,
    /// PEM certificate chain for HTTPS. Empty (with `tls-key-file`) serves
    /// plain HTTP. Reloaded on SIGHUP. Default empty.
    pub tls_cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) for `tls-cert-file`.
    /// Default empty.
    pub tls_key_file: PathBuf,
    /// Address of the admin listener: `/metrics`, `/stats`, `/health`,
    /// `/ready` and, with `profiling`, `/debug/pprof/profile`. Plain HTTP and
    /// no keys, hence loopback by default. Empty turns it off. Must differ
    /// from `listen`. Default `127.0.0.1:9181`.
    pub admin_listen: String,
    /// Serve CPU profiles on the admin listener. Default false.
    pub profiling: bool,
    /// Also serve `/metrics` and `/stats` on `listen`; false leaves them to
    /// the admin listener. Default true.
    pub metrics_on_ingest: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            retry_after_secs: 5,
            body_timeout_ms: 30_000,
            header_timeout_ms: 10_000,
            max_header_bytes: 64 * 1024,
            max_connections: 10_000,
            request_timeout_ms: 60_000,
            tls_cert_file: PathBuf::new(),
            tls_key_file: PathBuf::new(),
            admin_listen: "127.0.0.1:9181".into(),
            profiling: false,
            metrics_on_ingest: true,
        }
    }
}

impl HttpConfig {
    pub fn validate(&self) -> Result<(), String> {
        let h = self;
        if h.max_header_bytes < 8192 {
            return Err("http.max-header-bytes must be at least 8192".into());
        }
        if h.max_connections == 0
            || h.header_timeout_ms == 0
            || h.body_timeout_ms == 0
            || h.request_timeout_ms == 0
        {
            return Err("http.max-connections and the http timeouts must be positive".into());
        }
        if h.tls_cert_file.as_os_str().is_empty() != h.tls_key_file.as_os_str().is_empty() {
            return Err("http.tls-cert-file and http.tls-key-file must be set together".into());
        }
        self.validate_admin()
    }

    /// The admin listener's address; `None` when it is off.
    pub fn admin_addr(&self) -> Result<Option<SocketAddr>, String> {
        let raw = self.admin_listen.trim();
        if raw.is_empty() {
            return Ok(None);
        }
        raw.parse().map(Some).map_err(|_| {
            format!(
                "http.admin-listen {raw:?} is not an address such as 127.0.0.1:9181 (empty turns it off)"
            )
        })
    }

    fn validate_admin(&self) -> Result<(), String> {
        let Some(admin) = self.admin_addr()? else {
            if self.profiling {
                return Err(
                    "http.profiling needs http.admin-listen: profiles are served only there".into(),
                );
            }
            if !self.metrics_on_ingest {
                return Err("http.metrics-on-ingest = false with http.admin-listen off would serve /metrics nowhere".into());
            }
            return Ok(());
        };
        // Port 0 is a fresh ephemeral port each time, so it cannot clash.
        let (a, l) = (admin, self.listen);
        let overlap = a.ip() == l.ip() || a.ip().is_unspecified() || l.ip().is_unspecified();
        if a.port() != 0 && a.port() == l.port() && overlap {
            return Err(format!(
                "http.admin-listen {a} is the same port as http.listen {l}: give the admin listener its own port, or \"\" to turn it off"
            ));
        }
        Ok(())
    }
}
