//! `sluice-loadgen`: load and baselines for the end-to-end benchmarks.
//!
//! - `http`: HTTP/1.1 keep-alive load, closed-loop (N connections, each
//!   sending as soon as the last answer came) or open-loop (`--rate`, a
//!   schedule per connection; latency is measured from the scheduled send
//!   time, so a stalled server is not hidden by coordinated omission).
//!   Reports requests/s, events/s, p50/p90/p99/p99.9 (hdrhistogram) and
//!   every non-202 by status. A 202 counts only when its body says the
//!   whole batch was accepted (`accepted` = batch size, and for sluice a
//!   sequence range of that length).
//! - `null-server`: an axum server that reads the body and answers 202: the
//!   HTTP ceiling of this machine, for the same client.
//! - `producer`: a plain rdkafka loop producing the same records from memory
//!   with sluice's producer settings: the Kafka ceiling for replay.
//! - `fsync-probe`: write + fdatasync loop: the disk's ceiling for commits.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(name = "sluice-loadgen", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Drive HTTP load at a sluice (or the null server).
    Http(HttpArgs),
    /// Serve POST on the ingest paths: read the body, answer 202.
    NullServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Write the bound address here once listening.
        #[arg(long)]
        addr_file: Option<PathBuf>,
    },
    /// Produce records from memory with sluice's producer settings.
    Producer {
        #[arg(long)]
        brokers: String,
        #[arg(long, default_value = "events")]
        topic: String,
        #[arg(long, default_value_t = 1_000_000)]
        records: u64,
        /// Bytes of each record value.
        #[arg(long, default_value_t = 250)]
        event_bytes: usize,
        /// Records in flight at most (sluice's replay.max-in-flight).
        #[arg(long, default_value_t = 10_000)]
        max_in_flight: usize,
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
    /// Write + fdatasync loop in a directory: fdatasyncs/s and latency.
    FsyncProbe {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 256)]
        block_bytes: usize,
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
}

#[derive(clap::Args, Clone)]
struct HttpArgs {
    /// Target, e.g. http://127.0.0.1:8080/v1/events.
    #[arg(long)]
    url: String,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Open loop: total requests per second across all connections.
    /// Without it, closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Events per request: 1 sends a single JSON object, more a JSON array.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Approximate bytes of each event's JSON.
    #[arg(long, default_value_t = 250)]
    event_bytes: usize,
    /// Tenant ids to spread requests over, round-robin (comma-separated).
    #[arg(long, default_value = "loadgen")]
    tenants: String,
    /// API key, sent as `Authorization: Bearer`.
    #[arg(long, env = "SLUICE_LOADGEN_KEY")]
    key: Option<String>,
    /// Send a unique `Idempotency-Key` with every request (prefixed with the
    /// process id and start time, so that runs against one daemon never
    /// reuse a key and every request is handled as new).
    #[arg(long)]
    idempotency_key: bool,
    /// A label for the report.
    #[arg(long, default_value = "")]
    label: String,
    #[arg(long)]
    json_out: Option<PathBuf>,
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async {
        match cli.command {
            Cmd::Http(a) => http(a).await,
            Cmd::NullServer { listen, addr_file } => null_server(listen, addr_file).await,
            Cmd::Producer {
                brokers,
                topic,
                records,
                event_bytes,
                max_in_flight,
                json_out,
            } => {
                producer(
                    &brokers,
                    &topic,
                    records,
                    event_bytes,
                    max_in_flight,
                    json_out,
                )
                .await
            }
            Cmd::FsyncProbe {
                dir,
                seconds,
                block_bytes,
                json_out,
            } => fsync_probe(&dir, seconds, block_bytes, json_out),
        }
    });
    if let Err(e) = result {
        eprintln!("sluice-loadgen: {e}");
        std::process::exit(1);
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn write_json(path: &Option<PathBuf>, v: &Value) -> Res<()> {
    println!("{v}");
    if let Some(p) = path {
        std::fs::write(p, format!("{v}\n"))?;
    }
    Ok(())
}

/// One event of about `bytes` bytes of JSON.
fn event(tenant: &str, bytes: usize, n: u64) -> Value {
    let base = json!({"tenant_id": tenant, "source": "loadgen", "severity": "INFO", "message": ""});
    let pad = bytes.saturating_sub(base.to_string().len() + 12);
    json!({"tenant_id": tenant, "source": "loadgen", "severity": "INFO",
           "message": format!("{n:010} {}", "x".repeat(pad))})
}

fn body(tenant: &str, batch: usize, bytes: usize) -> Bytes {
    if batch == 1 {
        Bytes::from(event(tenant, bytes, 0).to_string())
    } else {
        let events: Vec<Value> = (0..batch as u64).map(|i| event(tenant, bytes, i)).collect();
        Bytes::from(Value::Array(events).to_string())
    }
}

/// Quantiles reported for latency CDF plots.
const CDF_POINTS: [f64; 18] = [
    0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999,
    0.9999, 1.0,
];

/// What one connection saw.
struct Tally {
    hist: Histogram<u64>,
    statuses: BTreeMap<u16, u64>,
    /// 202s whose body did not confirm the whole batch.
    unverified: u64,
    transport_errors: u64,
    ok: u64,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            hist: Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds"),
            statuses: BTreeMap::new(),
            unverified: 0,
            transport_errors: 0,
            ok: 0,
        }
    }

    fn merge(&mut self, o: Tally) {
        let _ = self.hist.add(&o.hist);
        for (s, n) in o.statuses {
            *self.statuses.entry(s).or_default() += n;
        }
        self.unverified += o.unverified;
        self.transport_errors += o.transport_errors;
        self.ok += o.ok;
    }
}

/// A 202 is verified when it says the whole batch was accepted.
fn verified(body: &[u8], batch: usize) -> bool {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    if v["accepted"].as_u64() != Some(batch as u64) {
        return false;
    }
    match (v["first_seq"].as_u64(), v["last_seq"].as_u64()) {
        (Some(f), Some(l)) => l >= f && l - f + 1 == batch as u64,
        _ => v.get("first_seq").is_none(), // the null server has no WAL
    }
}

async fn connection(
    args: Arc<HttpArgs>,
    id: usize,
    deadline: Instant,
    interval: Option<Duration>,
    bodies: Arc<Vec<Bytes>>,
    key_prefix: Arc<str>,
) -> Res<Tally> {
    let uri: hyper::Uri = args.url.parse()?;
    let authority = uri.authority().ok_or("url has no host")?.clone();
    let stream = tokio::net::TcpStream::connect(authority.as_str()).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut t = Tally::new();
    let mut next = Instant::now()
        + interval.map_or(Duration::ZERO, |i| {
            i.mul_f64(id as f64 / args.connections as f64)
        });
    let mut n = id;
    while Instant::now() < deadline {
        let scheduled = match interval {
            Some(i) => {
                if next > deadline {
                    break;
                }
                tokio::time::sleep_until(next.into()).await;
                let s = next;
                next += i;
                s
            }
            None => Instant::now(),
        };
        let body = bodies[n % bodies.len()].clone();
        n += 1;
        let mut req = hyper::Request::post(uri.clone())
            .header(hyper::header::HOST, authority.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header("x-loadgen-events", args.batch);
        if let Some(k) = &args.key {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {k}"));
        }
        if args.idempotency_key {
            req = req.header("idempotency-key", format!("{key_prefix}-{id}-{n}"));
        }
        let req = req.body(Full::new(body))?;
        if sender.ready().await.is_err() {
            t.transport_errors += 1;
            break;
        }
        let resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(_) => {
                t.transport_errors += 1;
                break;
            }
        };
        let status = resp.status().as_u16();
        let bytes = match resp.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                t.transport_errors += 1;
                break;
            }
        };
        let micros = scheduled.elapsed().as_micros().max(1) as u64;
        let _ = t.hist.record(micros.min(120_000_000));
        *t.statuses.entry(status).or_default() += 1;
        if status == 202 {
            if verified(&bytes, args.batch) {
                t.ok += 1;
            } else {
                t.unverified += 1;
            }
        }
    }
    Ok(t)
}

async fn http(args: HttpArgs) -> Res<()> {
    let tenants: Vec<&str> = args.tenants.split(',').map(str::trim).collect();
    let bodies: Arc<Vec<Bytes>> = Arc::new(
        tenants
            .iter()
            .map(|t| body(t, args.batch, args.event_bytes))
            .collect(),
    );
    let interval = args
        .rate
        .map(|r| Duration::from_secs_f64(args.connections as f64 / r.max(1e-9)));
    let key_prefix: Arc<str> = format!(
        "lg{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    )
    .into();
    let args = Arc::new(args);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.duration);
    let mut tasks = Vec::new();
    for id in 0..args.connections {
        tasks.push(tokio::spawn(connection(
            args.clone(),
            id,
            deadline,
            interval,
            bodies.clone(),
            key_prefix.clone(),
        )));
    }
    let mut total = Tally::new();
    let mut connect_errors = 0u64;
    for t in tasks {
        match t.await? {
            Ok(tally) => total.merge(tally),
            Err(e) => {
                connect_errors += 1;
                eprintln!("connection failed: {e}");
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let requests: u64 = total.statuses.values().sum();
    let q = |p: f64| total.hist.value_at_quantile(p) as f64 / 1000.0;
    let report = json!({
        "label": args.label,
        "mode": if args.rate.is_some() { "open" } else { "closed" },
        "connections": args.connections,
        "batch": args.batch,
        "event_bytes": args.event_bytes,
        "idempotency_key": args.idempotency_key,
        "target_rate": args.rate,
        "seconds": secs,
        "requests": requests,
        "requests_per_sec": requests as f64 / secs,
        "accepted_requests": total.ok,
        "events_per_sec": (total.ok * args.batch as u64) as f64 / secs,
        "latency_ms": {"p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "p999": q(0.999), "max": total.hist.max() as f64 / 1000.0},
        "cdf_ms": CDF_POINTS.iter().map(|&p| json!([p, q(p)])).collect::<Vec<_>>(),
        "statuses": total.statuses.iter().map(|(s, n)| (s.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
        "unverified_202": total.unverified,
        "transport_errors": total.transport_errors,
        "connect_errors": connect_errors,
    });
    eprintln!(
        "{} {} conns batch {}: {:.0} req/s, {:.0} events/s, p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms, statuses {:?}, unverified {}",
        args.label,
        args.connections,
        args.batch,
        report["requests_per_sec"].as_f64().unwrap_or(0.0),
        report["events_per_sec"].as_f64().unwrap_or(0.0),
        q(0.5),
        q(0.99),
        q(0.999),
        total.statuses,
        total.unverified
    );
    write_json(&args.json_out, &report)?;
    if total.unverified > 0 {
        return Err(format!(
            "{} 202 answers did not confirm their batch",
            total.unverified
        )
        .into());
    }
    Ok(())
}

async fn null_server(listen: SocketAddr, addr_file: Option<PathBuf>) -> Res<()> {
    use axum::routing::post;
    async fn accept(
        headers: axum::http::HeaderMap,
        body: Bytes,
    ) -> impl axum::response::IntoResponse {
        // The loadgen says how many events it sent; the null server parses
        // nothing, it only reads the body, like the cheapest possible ingest.
        let n: u64 = headers
            .get("x-loadgen-events")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(1);
        let _ = body.len();
        (
            axum::http::StatusCode::ACCEPTED,
            axum::Json(json!({"accepted": n, "rejected": 0, "errors": []})),
        )
    }
    let mut app = axum::Router::new();
    for p in sluice::http::INGEST_PATHS {
        app = app.route(p, post(accept));
    }
    // axum refuses bodies over 2 MB by default; sluice takes up to
    // limits.max-body-bytes (10 MiB), and 10,000-event batches are 2.5 MB.
    let app = app.layer(axum::extract::DefaultBodyLimit::max(64 << 20));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    if let Some(f) = addr_file {
        std::fs::write(f, addr.to_string())?;
    }
    eprintln!("null server on {addr}");
    axum::serve(listener, app).await?;
    Ok(())
}

async fn producer(
    brokers: &str,
    topic: &str,
    records: u64,
    event_bytes: usize,
    max_in_flight: usize,
    json_out: Option<PathBuf>,
) -> Res<()> {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let kafka = sluice::config::KafkaConfig::default();
    let producer: FutureProducer = sluice::replay::producer_config(&kafka, brokers).create()?;
    // The records sluice's replay sends, built by sluice's own normalizer
    // (a distinct normalized event per record with its id, timestamp, tenant
    // key and headers) before the clock starts; 65,536 of them are cycled.
    let normalizer = sluice::ingest::Normalizer::new(
        sluice::config::Limits::default(),
        sluice::config::EventsConfig::default(),
    );
    let now = chrono::Utc::now();
    let built = (0..65_536u64)
        .map(|i| {
            let e =
                normalizer.normalize(event(&format!("tenant-{}", i % 64), event_bytes, i), now)?;
            Ok(sluice::wal::Record::decode(&e.payload)?)
        })
        .collect::<Res<Vec<_>>>()?;
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    let mut delivered = 0u64;
    let mut failed = 0u64;
    for i in 0..records {
        while pending.len() >= max_in_flight {
            match pending.next().await {
                Some(Ok(Ok(_))) => delivered += 1,
                _ => failed += 1,
            }
        }
        let record = &built[(i % 65_536) as usize];
        let mut rec = FutureRecord::to(topic)
            .payload(&record.value)
            .headers(sluice::replay::headers::Ours::new(i + 1, None).kafka(&record.headers))
            .timestamp(record.timestamp_ms);
        if let Some(k) = &record.key {
            rec = rec.key(k);
        }
        match producer.send_result(rec) {
            Ok(f) => pending.push(f),
            Err(_) => failed += 1,
        }
    }
    while let Some(r) = pending.next().await {
        match r {
            Ok(Ok(_)) => delivered += 1,
            _ => failed += 1,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    write_json(
        &json_out,
        &json!({"records": records, "delivered": delivered, "failed": failed,
                "seconds": secs, "records_per_sec": delivered as f64 / secs,
                "event_bytes": event_bytes, "max_in_flight": max_in_flight}),
    )
}

fn fsync_probe(
    dir: &std::path::Path,
    seconds: f64,
    block_bytes: usize,
    json_out: Option<PathBuf>,
) -> Res<()> {
    use std::os::unix::fs::FileExt;
    let path = dir.join(format!(".sluice-fsync-probe-{}", std::process::id()));
    let f = std::fs::File::create(&path)?;
    let block = vec![7u8; block_bytes];
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let started = Instant::now();
    let mut off = 0u64;
    let mut n = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        f.write_all_at(&block, off)?;
        // The fdatasync probe measures the raw syscall, not the storage
        // layer: nothing it writes is kept.
        #[allow(clippy::disallowed_methods)]
        f.sync_data()?;
        hist.record(t.elapsed().as_micros().max(1) as u64)?;
        off += block_bytes as u64;
        n += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    let q = |p: f64| hist.value_at_quantile(p) as f64 / 1000.0;
    write_json(
        &json_out,
        &json!({"fdatasyncs": n, "seconds": secs, "fdatasyncs_per_sec": n as f64 / secs,
                "block_bytes": block_bytes,
                "latency_ms": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999)}}),
    )
}
