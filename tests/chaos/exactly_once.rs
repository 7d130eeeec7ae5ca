//! `CHAOS_MODE=exactly-once`: clients send every request with an
//! `Idempotency-Key` and retry it with the same key and body until it gets a
//! definitive answer, across kills (a request cut by a kill is retried
//! against the next daemon, and at the end against the draining one). The
//! verdict applies the consumer rule (drop any `seq` at or below the highest
//! seen per (instance, partition)) to the records as read, in partition
//! order, and requires lost 0, duplicates 0 and delivered-but-unacknowledged
//! 0 after the rule; on the raw topic it checks that first occurrences rise
//! per (instance, partition).

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Rng;

pub fn enabled() -> bool {
    match std::env::var("CHAOS_MODE").as_deref() {
        Ok("exactly-once") => true,
        Ok("at-least-once") | Ok("") | Err(_) => false,
        Ok(other) => panic!("CHAOS_MODE={other:?}: use at-least-once or exactly-once"),
    }
}

/// Pause hooks for the daemon: in exactly-once mode a kill also lands
/// often between confirmed deliveries and the offset flush.
pub fn pauses() -> &'static str {
    if enabled() {
        "commit=1,roll=10,gc=10,flush=15"
    } else {
        "commit=1,roll=10,gc=10"
    }
}

/// The stall limit: in exactly-once mode shorter than the outages, so
/// records in flight when the broker goes away hit the timeout path, where
/// a later record could overtake an earlier one.
pub fn message_timeout_ms() -> &'static str {
    if enabled() {
        "300"
    } else {
        "2000"
    }
}

/// The stream without a key: its `key-field` is absent from every event,
/// so its records are produced with no key (see `config()`).
pub const UNKEYED_ROUTE: &str = "/unkeyed";

/// The daemon's config in exactly-once mode: a second stream into the same
/// topic whose events carry no key, so a kill that makes replay produce a
/// record again tests that it lands on the same partition.
pub fn config() -> &'static str {
    "[[streams]]\nname = \"unkeyed\"\nroutes = [\"/unkeyed\"]\ntopic = \"events\"\ndead-letter-topic = \"events-dlq\"\nkey-field = \"no_such_field\"\n"
}

/// A request waiting for its definitive answer.
pub struct Pending {
    path: &'static str,
    key: String,
    body: String,
    ids: Vec<String>,
}

/// One client's state, kept across daemon restarts.
pub struct Client {
    tag: String,
    rng: Rng,
    next: u64,
    pending: Option<Pending>,
    /// Requests retried without a definitive answer (connection error,
    /// timeout, 503, 409).
    pub retries: u64,
    /// 202s answered from the key index (`Idempotent-Replayed: true`).
    pub replayed: u64,
}

impl Client {
    pub fn new(n: u64, seed: u64) -> Arc<Mutex<Client>> {
        Arc::new(Mutex::new(Client {
            tag: format!("c{n}"),
            rng: Rng(seed | 1),
            next: 0,
            pending: None,
            retries: 0,
            replayed: 0,
        }))
    }

    fn take_or_make(&mut self) -> &Pending {
        if self.pending.is_none() {
            let r = self.next;
            self.next += 1;
            let n = if self.rng.next() % 2 == 0 {
                1
            } else {
                self.rng.range(2, 60) as usize
            };
            let ids: Vec<String> = (0..n).map(|i| format!("{}-r{r}-{i}", self.tag)).collect();
            let events: Vec<String> = ids
                .iter()
                .map(|id| {
                    format!(
                        r#"{{"id":"{id}","tenant_id":"t{}","source":"chaos","message":"m"}}"#,
                        id.len() % 7
                    )
                })
                .collect();
            // Half the requests go to the stream without a key.
            let path = if self.rng.next() % 2 == 0 {
                "/v1/events"
            } else {
                UNKEYED_ROUTE
            };
            self.pending = Some(Pending {
                path,
                key: format!("{}-r{r}", self.tag),
                body: format!("[{}]", events.join(",")),
                ids,
            });
        }
        self.pending.as_ref().expect("just set")
    }
}

/// POST with the key; status, whether the answer was replayed, and body.
fn post(addr: &str, p: &Pending) -> std::io::Result<(u16, bool, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(
        s,
        "POST {} HTTP/1.1\r\nHost: sluice\r\nContent-Type: application/json\r\nIdempotency-Key: \"{}\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        p.path,
        p.key,
        p.body.len(),
        p.body
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {resp:.80}")))?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let replayed = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("idempotent-replayed: true")
    });
    Ok((status, replayed, body.to_string()))
}

/// Sends requests until `stop` is set and the current one has no answer
/// (the daemon is gone); a request without an answer stays pending for the
/// next daemon. With `finish`, returns as soon as nothing is pending.
pub fn run(
    addr: &str,
    client: &Mutex<Client>,
    ledger: &Mutex<std::fs::File>,
    stop: &AtomicBool,
    finish: bool,
) -> usize {
    let mut c = client.lock().unwrap();
    let mut acked = 0;
    loop {
        if finish && c.pending.is_none() {
            return acked;
        }
        if !finish && c.pending.is_none() && stop.load(Ordering::Relaxed) {
            return acked;
        }
        let p = c.take_or_make();
        match post(addr, p) {
            Ok((202, replayed, resp)) => {
                let v: serde_json::Value = serde_json::from_str(&resp).expect("202 body is JSON");
                assert_eq!(v["accepted"], p.ids.len(), "{resp}");
                let first = v["first_seq"].as_u64().unwrap();
                let mut f = ledger.lock().unwrap();
                for (i, id) in p.ids.iter().enumerate() {
                    writeln!(f, "{id} {}", first + i as u64).unwrap();
                }
                acked += p.ids.len();
                c.replayed += u64::from(replayed);
                c.pending = None;
            }
            // No definitive answer yet: the same key again.
            Ok((503 | 409, _, _)) => {
                c.retries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok((status, _, resp)) => panic!("unexpected {status} for key {}: {resp}", p.key),
            Err(_) => {
                c.retries += 1;
                if stop.load(Ordering::Relaxed) && !finish {
                    return acked; // killed: retried against the next daemon
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// One consumed record, in partition order.
pub struct Raw {
    pub partition: i32,
    pub instance: String,
    pub seq: u64,
    pub id: String,
}

pub struct Verdict {
    pub lost: usize,
    pub duplicates: u64,
    pub unacknowledged: usize,
    pub raw_duplicates: u64,
    pub order_violations: u64,
    pub dropped_by_rule: u64,
    /// Ids kept more than once after the rule, with the seq of each copy.
    pub repeated: Vec<(String, Vec<u64>)>,
}

/// Applies the consumer rule to `raw` (read in partition order) and checks
/// the first-occurrence order on the raw records.
pub fn verdict(acked: &HashMap<String, u64>, raw: &[Raw]) -> Verdict {
    let mut high: HashMap<(&str, i32), u64> = HashMap::new();
    let mut first_high: HashMap<(&str, i32), u64> = HashMap::new();
    let mut seen_seq: HashSet<(&str, u64)> = HashSet::new();
    let mut kept: HashMap<&str, Vec<u64>> = HashMap::new();
    let mut raw_ids: HashMap<&str, u64> = HashMap::new();
    let (mut order_violations, mut dropped_by_rule) = (0, 0);
    for r in raw {
        let k = (r.instance.as_str(), r.partition);
        *raw_ids.entry(&r.id).or_insert(0) += 1;
        if seen_seq.insert((&r.instance, r.seq)) {
            let h = first_high.entry(k).or_insert(0);
            if r.seq <= *h {
                order_violations += 1;
                if order_violations <= 10 {
                    eprintln!(
                        "ORDER: partition {} instance {}: first occurrence of seq {} after {}",
                        r.partition, r.instance, r.seq, h
                    );
                }
            } else {
                *h = r.seq;
            }
        }
        let h = high.entry(k).or_insert(0);
        if r.seq > *h {
            *h = r.seq;
            kept.entry(&r.id).or_default().push(r.seq);
        } else {
            dropped_by_rule += 1;
        }
    }
    Verdict {
        lost: acked
            .keys()
            .filter(|id| !kept.contains_key(id.as_str()))
            .count(),
        duplicates: kept.values().map(|c| c.len() as u64 - 1).sum(),
        unacknowledged: kept.keys().filter(|id| !acked.contains_key(**id)).count(),
        raw_duplicates: raw_ids.values().map(|c| c - 1).sum(),
        order_violations,
        dropped_by_rule,
        repeated: kept
            .iter()
            .filter(|(_, seqs)| seqs.len() > 1)
            .map(|(id, seqs)| (id.to_string(), seqs.clone()))
            .collect(),
    }
}
