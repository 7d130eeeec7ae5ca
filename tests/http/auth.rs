//! API keys, tenant binding, rate limits and the request deadline, through
//! `app(state)` over a real WAL. Every refusal is checked for what a client
//! sees (status, message, Retry-After) and for what it must not cause (no
//! record in the WAL).

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use serde_json::{json, Value};
use sluice::auth::keys::{append_entry, hash_key};
use sluice::auth::KeyStore;
use sluice::config::Config;
use sluice::http::AppState;
use sluice::replay::offsets::OffsetStore;
use sluice::wal::io::{Filesystem, StdFs, WalFile};
use sluice::wal::Wal;

use super::{config, ev, Harness, Reply};

pub(super) const ACME: &str = "sluice_acme-key";
const MULTI: &str = "sluice_multi-key";
const ADMIN: &str = "sluice_admin-key";

fn keys_text() -> String {
    let mut t = append_entry("", "acme", &hash_key(ACME), &["acme".into()]);
    t = append_entry(&t, "multi", &hash_key(MULTI), &["a".into(), "b".into()]);
    append_entry(&t, "admin", &hash_key(ADMIN), &["*".into()])
}

pub(super) fn harness_keys(tweak: impl FnOnce(&mut Config)) -> Harness {
    harness_keys_fs(tweak, Arc::new(StdFs))
}

fn harness_keys_fs(tweak: impl FnOnce(&mut Config), fs: Arc<dyn Filesystem>) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.toml");
    std::fs::write(&keys_file, keys_text()).unwrap();
    let mut c = config(&dir.path().join("data"));
    c.auth.keys_file = keys_file.clone();
    tweak(&mut c);
    c.validate().unwrap();
    let offsets = Arc::new(OffsetStore::open(&dir.path().join("offsets")).unwrap());
    let wal = Arc::new(Wal::open(c.wal_config(), fs, 0).unwrap().0);
    let keys = Arc::new(KeyStore::load(&keys_file).unwrap());
    let state = Arc::new(AppState::with_keys(&c, wal, offsets, Some(keys)));
    Harness { dir, state }
}

async fn post_as(h: &Harness, auth: Option<(&str, &str)>, body: Value) -> Reply {
    let mut req = Request::post("/v1/events").header(header::CONTENT_TYPE, "application/json");
    if let Some((name, value)) = auth {
        req = req.header(name, value);
    }
    h.send(req.body(Body::from(body.to_string())).unwrap())
        .await
}

fn bearer(key: &str) -> Option<(&'static str, String)> {
    Some(("authorization", format!("Bearer {key}")))
}

async fn post_key(h: &Harness, key: &str, body: Value) -> Reply {
    let (name, value) = bearer(key).unwrap();
    post_as(h, Some((name, &value)), body).await
}

fn tenants_in_wal(h: &Harness) -> Vec<String> {
    h.wal_records()
        .iter()
        .map(|(_, r)| {
            super::value(r)["tenant_id"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

fn metric(h: &Harness, name_and_labels: &str) -> f64 {
    h.state
        .metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_missing_malformed_or_unknown_key_gets_401_and_writes_nothing() {
    let h = harness_keys(|_| {});
    let cases: [(Option<(&str, &str)>, &str); 6] = [
        (None, "an API key is required"),
        (
            Some(("authorization", "Basic YWNtZTp4")),
            "scheme must be Bearer",
        ),
        (Some(("authorization", "Bearer")), "must be `Bearer <key>`"),
        (
            Some(("authorization", "Bearer sluice_wrong")),
            "unknown API key",
        ),
        (Some(("x-api-key", "sluice_wrong")), "unknown API key"),
        // The stored hash is not a credential.
        (Some(("x-api-key", &hash_key(ACME))), "unknown API key"),
    ];
    for (auth, want) in cases {
        let r = post_as(&h, auth, json!(ev("acme", "m"))).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{auth:?}");
        let msg = r.json["error"].as_str().unwrap();
        assert!(msg.contains(want), "{auth:?}: {msg}");
        assert!(!msg.contains("sluice_wrong"), "the key is never echoed");
    }
    assert!(h.wal_records().is_empty());
    assert_eq!(
        metric(&h, "sluice_auth_failures_total{reason=\"missing\"}"),
        1.0
    );
    assert_eq!(
        metric(&h, "sluice_auth_failures_total{reason=\"malformed\"}"),
        2.0
    );
    assert_eq!(
        metric(&h, "sluice_auth_failures_total{reason=\"unknown\"}"),
        3.0
    );
    assert_eq!(metric(&h, "sluice_auth_keys"), 3.0);

    // The 401 names the scheme, as RFC 6750 asks.
    let resp = tower::ServiceExt::oneshot(
        h.app(),
        Request::post("/v1/events").body(Body::empty()).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(
        resp.headers()[header::WWW_AUTHENTICATE],
        "Bearer realm=\"sluice\""
    );
    // Receipts need a key too; health and metrics do not.
    let get = |uri: &str, key: Option<&str>| {
        let mut req = Request::get(uri);
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        req.body(Body::empty()).unwrap()
    };
    assert_eq!(
        h.send(get("/v1/receipts/1", None)).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        h.send(get("/v1/receipts/1", Some(ACME))).await.status,
        StatusCode::OK
    );
    assert_eq!(h.send(get("/health", None)).await.status, StatusCode::OK);
    assert_eq!(h.send(get("/metrics", None)).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_single_tenant_key_fills_in_its_tenant_and_refuses_every_other() {
    let h = harness_keys(|_| {});
    // No tenant_id: filled in (tenant_id is a required field by default).
    let r = post_key(&h, ACME, json!({"source": "s", "message": "m"})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.json);
    // X-API-Key works as well as Bearer.
    let r = post_as(&h, Some(("x-api-key", ACME)), json!(ev("acme", "m"))).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(tenants_in_wal(&h), ["acme", "acme"]);
    let record = &h.wal_records()[0].1;
    assert_eq!(record.header("tenant"), Some(&b"acme"[..]));

    // Spoofing: another tenant, a different case, a trailing dot. All 403,
    // nothing written.
    for spoof in ["globex", "ACME", "Acme", "acme."] {
        let r = post_key(&h, ACME, json!(ev(spoof, "m"))).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{spoof}");
        assert_eq!(
            r.json["errors"][0]["error"],
            format!("this key may not write tenant_id {spoof:?}")
        );
    }
    // Unicode look-alikes (fullwidth a, Cyrillic а) fail the tenant pattern
    // before any comparison: refused, never folded to "acme".
    for lookalike in ["ａcme", "\u{0430}cme", "acme\u{200b}"] {
        let r = post_key(&h, ACME, json!(ev(lookalike, "m"))).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{lookalike}");
    }
    assert_eq!(tenants_in_wal(&h).len(), 2, "no refused event was written");

    // A mixed batch: the forbidden events are reported by index, the rest
    // accepted.
    let r = post_key(
        &h,
        ACME,
        json!([ev("acme", "0"), ev("globex", "1"), {"source": "s", "message": "2"}, ev("ACME", "3")]),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(r.json["accepted"], 2);
    let idx: Vec<_> = r.json["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, [1, 3]);
    assert_eq!(tenants_in_wal(&h), ["acme"; 4]);
    assert_eq!(
        metric(
            &h,
            "sluice_tenant_events_total{outcome=\"forbidden\",tenant=\"globex\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &h,
            "sluice_tenant_events_total{outcome=\"accepted\",tenant=\"acme\"}"
        ),
        4.0
    );
}

#[tokio::test]
async fn multi_tenant_and_wildcard_keys() {
    let h = harness_keys(|_| {});
    let r = post_key(&h, MULTI, json!([ev("a", "1"), ev("b", "2")])).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    // A key bound to several tenants must name one: nothing is guessed.
    // With tenant_id a required field that is a 400 (missing field); with it
    // optional, still refused, as forbidden.
    let r = post_key(&h, MULTI, json!({"source": "s", "message": "m"})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let optional = harness_keys(|c| c.events.required = vec!["message".into()]);
    let r = post_key(&optional, MULTI, json!({"source": "s", "message": "m"})).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.json["errors"][0]["error"]
        .as_str()
        .unwrap()
        .contains("tenant_id is required"));
    assert!(optional.wal_records().is_empty());
    let r = post_key(&h, MULTI, json!(ev("c", "m"))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // "*" writes any tenant, and fills in none.
    let r = post_key(&h, ADMIN, json!([ev("zeta", "1"), ev("acme", "2")])).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let r = post_key(&h, ADMIN, json!({"source": "s", "message": "m"})).await;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "tenant_id stays required"
    );
    assert_eq!(tenants_in_wal(&h), ["a", "b", "zeta", "acme"]);
}

#[tokio::test]
async fn keys_reload_on_change_and_a_broken_file_keeps_the_old_keys() {
    let h = harness_keys(|_| {});
    let keys = h.state.keys.clone().unwrap();
    let path = keys.path().to_owned();
    assert_eq!(
        post_key(&h, "sluice_new", json!(ev("n", "m"))).await.status,
        StatusCode::UNAUTHORIZED
    );
    // Replace the file as an editor would: new inode, acme's key gone.
    let text = append_entry("", "new", &hash_key("sluice_new"), &["n".into()]);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    assert_eq!(keys.reload_if_changed().unwrap().unwrap(), 1);
    assert_eq!(
        post_key(&h, "sluice_new", json!(ev("n", "m"))).await.status,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        post_key(&h, ACME, json!(ev("acme", "m"))).await.status,
        StatusCode::UNAUTHORIZED
    );
    std::fs::write(&path, "not toml [").unwrap();
    assert!(keys.reload_if_changed().unwrap().is_err());
    assert_eq!(
        post_key(&h, "sluice_new", json!(ev("n", "m"))).await.status,
        StatusCode::ACCEPTED
    );
}

#[tokio::test]
async fn tenant_event_bucket_429_math_and_retry_after() {
    let h = harness_keys(|c| {
        c.rates.tenant_events_per_sec = 2;
        c.rates.tenant_events_burst = 10;
        c.limits.max_events_per_request = 20;
    });
    let events = |t: &str, n: usize| Value::Array((0..n).map(|i| ev(t, &i.to_string())).collect());
    let r = post_key(&h, ADMIN, events("acme", 10)).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    // The bucket is empty: 4 more events need 2 s at 2/s.
    let r = post_key(&h, ADMIN, events("acme", 4)).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.retry_after.as_deref(), Some("2"));
    assert!(r.json["error"]
        .as_str()
        .unwrap()
        .contains("tenant \"acme\""));
    // One event needs 0.5 s: rounded up to 1, never 0.
    let r = post_key(&h, ADMIN, events("acme", 1)).await;
    assert_eq!(r.retry_after.as_deref(), Some("1"));
    // Another tenant is not affected (fairness, functionally).
    let r = post_key(&h, ADMIN, events("globex", 10)).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    // A batch larger than the burst can never pass: 413, not a retry loop.
    let r = post_key(&h, ADMIN, events("initech", 11)).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(r.json["error"].as_str().unwrap().contains("burst of 10"));
    // Refused requests never touched the WAL.
    assert_eq!(h.wal_records().len(), 20);
    assert_eq!(
        metric(
            &h,
            "sluice_rate_limited_requests_total{scope=\"tenant\",unit=\"events\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(
            &h,
            "sluice_tenant_events_total{outcome=\"rate_limited\",tenant=\"acme\"}"
        ),
        5.0
    );
    // After the wait the bucket admits again.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = post_key(&h, ADMIN, events("acme", 4)).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn key_request_bucket_refuses_before_reading_the_body() {
    let h = harness_keys(|c| {
        c.rates.key_requests_per_sec = 1;
        c.rates.key_requests_burst = 2;
        c.rates.tenant.insert(
            "vip".into(),
            sluice::config::TenantRates {
                events_per_sec: Some(0),
                ..Default::default()
            },
        );
    });
    for _ in 0..2 {
        assert_eq!(
            post_key(&h, ACME, json!(ev("acme", "m"))).await.status,
            StatusCode::ACCEPTED
        );
    }
    // Past the burst even an unparseable body gets 429: the body is not read.
    let req = Request::post("/v1/events")
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-api-key", ACME)
        .body(Body::from("{not json"))
        .unwrap();
    let r = h.send(req).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.retry_after.as_deref(), Some("1"));
    // Buckets are per key.
    assert_eq!(
        post_key(&h, MULTI, json!(ev("a", "m"))).await.status,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        metric(
            &h,
            "sluice_rate_limited_requests_total{scope=\"key\",unit=\"requests\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn tenant_label_cardinality_is_capped() {
    let h = harness_keys(|c| c.rates.tenant_metrics_cap = 3);
    let events = Value::Array((0..10).map(|i| ev(&format!("t{i}"), "m")).collect());
    assert_eq!(
        post_key(&h, ADMIN, events).await.status,
        StatusCode::ACCEPTED
    );
    let text = h.state.metrics.render();
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("sluice_tenant_events_total{"))
        .collect();
    assert_eq!(series.len(), 4, "3 tenants and other: {series:#?}");
    assert_eq!(
        metric(
            &h,
            "sluice_tenant_events_total{outcome=\"accepted\",tenant=\"other\"}"
        ),
        7.0
    );
}

/// A filesystem whose fdatasync takes `delay` while `slow` is set: a disk
/// stalling under the request deadline.
struct SlowFs {
    slow: Arc<AtomicBool>,
    delay: Duration,
}

struct SlowFile {
    inner: Box<dyn WalFile>,
    slow: Arc<AtomicBool>,
    delay: Duration,
}

impl WalFile for SlowFile {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_all_at(buf, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        if self.slow.load(Ordering::Relaxed) {
            std::thread::sleep(self.delay);
        }
        self.inner.sync_data()
    }
}

impl Filesystem for SlowFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        StdFs.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        StdFs.list(dir)
    }
    fn open(&self, path: &Path) -> io::Result<Box<dyn WalFile>> {
        Ok(Box::new(SlowFile {
            inner: StdFs.open(path)?,
            slow: self.slow.clone(),
            delay: self.delay,
        }))
    }
    fn create(&self, path: &Path) -> io::Result<Box<dyn WalFile>> {
        Ok(Box::new(SlowFile {
            inner: StdFs.create(path)?,
            slow: self.slow.clone(),
            delay: self.delay,
        }))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        StdFs.rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        StdFs.remove(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        StdFs.sync_dir(dir)
    }
    fn free_bytes(&self, dir: &Path) -> io::Result<u64> {
        StdFs.free_bytes(dir)
    }
}

#[tokio::test]
async fn the_request_deadline_never_half_acknowledges_a_batch() {
    let slow = Arc::new(AtomicBool::new(false));
    let fs = Arc::new(SlowFs {
        slow: slow.clone(),
        delay: Duration::from_millis(600),
    });
    let h = harness_keys_fs(|c| c.http.request_timeout_ms = 200, fs);
    slow.store(true, Ordering::Relaxed);
    let batch = Value::Array((0..50).map(|i| ev("acme", &format!("slow-{i}"))).collect());
    let r = post_key(&h, ACME, batch).await;
    // The deadline passed while the batch was being fsynced: 503, and the
    // client is told the outcome is open.
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", r.json);
    assert!(r.json["error"]
        .as_str()
        .unwrap()
        .contains("may still be delivered"));
    assert!(r.retry_after.is_some());
    // The writer finished the append: the whole batch, never a part.
    tokio::time::sleep(Duration::from_millis(800)).await;
    slow.store(false, Ordering::Relaxed);
    assert_eq!(h.wal_records().len(), 50);
    // And normal service resumes.
    assert_eq!(
        post_key(&h, ACME, json!(ev("acme", "m"))).await.status,
        StatusCode::ACCEPTED
    );
    assert_eq!(h.wal_records().len(), 51);
}
