//! What the kill -9 harness (`chaos.rs`) and the power-cut harness
//! (`powercut.rs`) share: the seeded RNG, one HTTP request per connection,
//! the topic reader that checks it read every record, and replay's lag.
//! Included with `#[path = "chaos/shared.rs"] mod shared;`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::exactly_once;

/// xorshift64*: a seeded, dependency-free RNG so a run can be replayed.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

/// One HTTP/1.1 request on a fresh connection; returns status and body.
pub fn http(addr: &str, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: sluice\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {resp:.80}")))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// What the consumer thread saw: id counts, and per partition the offsets.
#[derive(Default)]
pub struct Seen {
    pub ids: HashMap<String, u64>,
    pub offsets: HashMap<i32, (i64, i64, u64)>, // (min, max, count)
    /// Every record in partition order, for the exactly-once verdict.
    pub raw: Vec<exactly_once::Raw>,
}

/// Reads the topic from the beginning for the whole run, so that records are
/// seen long before the mock broker's retention (5 MiB or 100k message sets
/// per partition) could evict them. Stops once `stop` is set and every
/// partition was read to its high watermark.
pub fn consumer(brokers: String, seen: Arc<Mutex<Seen>>, stop: Arc<AtomicBool>) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "chaos")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some("events"), Duration::from_secs(10))
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset("events", p.id(), rdkafka::Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut idle_since = Instant::now();
    let mut stopped_at: Option<Instant> = None;
    loop {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            idle_since = Instant::now();
            let id = m
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "id").and_then(|h| h.value))
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            let header = |name: &str| {
                m.headers()
                    .and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value))
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default()
            };
            let raw = exactly_once::Raw {
                partition: m.partition(),
                instance: header("instance"),
                seq: header("seq").parse().unwrap_or(0),
                id: id.clone(),
            };
            let mut s = seen.lock().unwrap();
            s.raw.push(raw);
            *s.ids.entry(id).or_insert(0) += 1;
            let e = s.offsets.entry(m.partition()).or_insert((i64::MAX, -1, 0));
            e.0 = e.0.min(m.offset());
            e.1 = e.1.max(m.offset());
            e.2 += 1;
        }
        // After the run: stop once every partition was read up to its high
        // watermark (checked at most every 500 ms), or give up after 120 s
        // and let the completeness check below report it.
        if stop.load(Ordering::Relaxed) && idle_since.elapsed() > Duration::from_millis(500) {
            let stopped = *stopped_at.get_or_insert_with(Instant::now);
            let s = seen.lock().unwrap();
            let caught_up = md.topics()[0].partitions().iter().all(|p| {
                let high = c
                    .fetch_watermarks("events", p.id(), Duration::from_secs(5))
                    .map_or(i64::MAX, |(_, h)| h);
                high == 0 || s.offsets.get(&p.id()).is_some_and(|o| o.1 == high - 1)
            });
            if caught_up || stopped.elapsed() > Duration::from_secs(120) {
                break;
            }
            drop(s);
            idle_since = Instant::now();
        }
    }
    // The check is only valid if every record ever written was read: from
    // offset 0 to the high watermark, without holes.
    let mut s = seen.lock().unwrap();
    for p in md.topics()[0].partitions() {
        let (low, high) = c
            .fetch_watermarks("events", p.id(), Duration::from_secs(10))
            .unwrap();
        let got = s.offsets.get(&p.id()).copied().unwrap_or((i64::MAX, -1, 0));
        let complete = high == 0 || (got.0 == 0 && got.1 == high - 1 && got.2 as i64 == high);
        if !complete {
            eprintln!("partition {}: watermarks {low}..{high}, read {got:?}: the topic was not read completely", p.id());
            s.ids.insert("__incomplete__".into(), 0);
        }
    }
}

pub fn lag(addr: &str) -> Option<u64> {
    let (status, body) = http(addr, "GET", "/stats", "").ok()?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["replay"]["lag_records"].as_u64()
}
