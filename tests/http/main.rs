//! HTTP ingest tests. Most drive `app(state)` with `oneshot` over a real WAL
//! in a temp dir; `concurrency` and `crash` use real TCP, the latter against a
//! real `sluice serve` child process.
// Fixtures use plain std::fs; the product goes through `storage`.
#![allow(clippy::disallowed_methods)]

#[cfg(feature = "kafka")]
mod admin;
mod auth;
mod bodies;
mod concurrency;
mod contract;
mod crash;
mod daemon;
mod disk_faults;
mod docs_examples;
mod gzip_members;
mod hostile;
mod lifecycle;
mod memory;
mod metrics;
mod otlp;
mod security;
mod statuses;
mod streams;
#[path = "../support/mod.rs"]
mod support;

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::Value;
use sluice::config::Config;
use sluice::http::{app, AppState};
use sluice::replay::offsets::OffsetStore;
use sluice::wal::io::{Filesystem, StdFs};
use sluice::wal::{ReadItem, Record, Wal};
use tower::ServiceExt;

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub state: Arc<AppState>,
}

pub fn config(dir: &Path) -> Config {
    let mut c = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    c.wal.min_free_bytes = 0;
    c
}

pub fn harness() -> Harness {
    harness_with(|_| {}, Arc::new(StdFs))
}

pub fn harness_with(tweak: impl FnOnce(&mut Config), fs: Arc<dyn Filesystem>) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    tweak(&mut c);
    c.validate().unwrap();
    let offsets = Arc::new(OffsetStore::open(&dir.path().join("offsets")).unwrap());
    let wal = Arc::new(Wal::open(c.wal_config(), fs, 0).unwrap().0);
    let state = Arc::new(AppState::new(&c, wal, offsets));
    Harness { dir, state }
}

impl Harness {
    pub fn app(&self) -> Router {
        app(self.state.clone())
    }

    /// POSTs `body` to `/v1/events` with a content type (None = no header).
    pub async fn post(&self, ct: Option<&str>, body: impl Into<Body>) -> Reply {
        let mut req = Request::post("/v1/events");
        if let Some(ct) = ct {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        self.send(req.body(body.into()).unwrap()).await
    }

    pub async fn send(&self, req: Request<Body>) -> Reply {
        let resp = self.app().oneshot(req).await.unwrap();
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_string());
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply {
            status,
            retry_after,
            json,
        }
    }

    /// Every record in the WAL, in order.
    pub fn wal_records(&self) -> Vec<(u64, Record)> {
        wal_records(&self.state.wal)
    }
}

pub fn wal_records(wal: &Wal) -> Vec<(u64, Record)> {
    let mut r = wal.reader(1);
    let mut out = Vec::new();
    while let Some(item) = r.try_next().unwrap() {
        match item {
            ReadItem::Record { seq, record, .. } => out.push((seq, record)),
            ReadItem::Gap(g) => panic!("gap {g:?}"),
        }
    }
    out
}

pub fn value(r: &Record) -> Value {
    serde_json::from_slice(&r.value).unwrap()
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub retry_after: Option<String>,
    pub json: Value,
}

pub const JSON: Option<&str> = Some("application/json");
pub const NDJSON: Option<&str> = Some("application/x-ndjson");
pub const CSV: Option<&str> = Some("text/csv");

pub fn ev(tenant: &str, msg: &str) -> Value {
    serde_json::json!({"tenant_id": tenant, "source": "test", "message": msg})
}

pub type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
>;

pub fn http_client() -> HttpClient {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// POSTs JSON over real TCP. `Err` is a transport error (e.g. the server died).
pub async fn post_tcp(
    client: &HttpClient,
    addr: std::net::SocketAddr,
    body: String,
) -> Result<(StatusCode, Value), String> {
    let req = Request::post(format!("http://{addr}/v1/events"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

/// Events with client-chosen ids, one in `bad_every` with an invalid tenant.
pub fn batch(prefix: &str, n: usize, bad_every: usize) -> (String, Vec<String>) {
    let mut events = Vec::new();
    let mut good_ids = Vec::new();
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        let tenant = if bad_every > 0 && i % bad_every == bad_every - 1 {
            "bad tenant"
        } else {
            good_ids.push(id.clone());
            "acme"
        };
        events.push(
            serde_json::json!({"id": id, "tenant_id": tenant, "source": "load", "message": "m"}),
        );
    }
    (Value::Array(events).to_string(), good_ids)
}
