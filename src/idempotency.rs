//! `Idempotency-Key` on ingest (IETF httpapi draft "The Idempotency-Key HTTP
//! Header Field"): a request that repeats a key gets the first request's
//! outcome instead of appending its events again.
//!
//! Durability follows the batch. The entry (scope, key, SHA-256 of the body,
//! the response) travels in the WAL inside the batch's first record, as an
//! internal header that replay never produces, so it is fsynced by the same
//! group commit as the records: a 202 implies the key survived. The writer
//! calls [`Pending::complete`] after that fdatasync and before it publishes
//! the records to readers, so every key whose records replay can see is in
//! this index. The converse does not hold after a power cut: the first
//! record (with the entry) can survive while later ones of its batch were
//! torn off, so the rebuild takes a key from the WAL only once its whole
//! batch was read ([`Index::rebuild`]).
//!
//! The index in memory is bounded (`idempotency.max-keys`,
//! `idempotency.max-bytes`, oldest evicted first) and forgets keys older
//! than `idempotency.window-secs`. It is checkpointed into its own
//! append-only file, `DATA_DIR/idempotency.log` ([`keylog`]), by every
//! offset commit, with the sequence number it covers ("indexed through"),
//! fdatasynced before that commit's flush and fsync; GC runs only after a
//! commit, and only below the committed offset, which is never above the
//! watermark, so a segment is never unlinked while its keys are only in
//! memory. Open reads the log and rescans only the records above the
//! watermark (and above the committed offset), so restart cost does not
//! grow with the backlog. Before version 0.9 the checkpoint was a sled tree
//! in the offsets store; open moves its rows into the log once.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::wal::{ReadItem, Record, SeqRange, Wal};

mod keylog;
use keylog::KeyLog;

/// Headers whose names start with this are sluice's own metadata: kept in
/// the WAL, never produced to Kafka.
pub const INTERNAL_PREFIX: &str = ":sluice.";
/// The internal header that carries an [`Entry`] in a batch's first record.
pub const ENTRY_HEADER: &str = ":sluice.idempotency";
/// The request header.
pub const REQUEST_HEADER: &str = "idempotency-key";
/// The response header on a replayed outcome.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 255;
/// The body of a keyed answer is at most this long: past it, the answer
/// keeps its counts and only the first per-record errors that fit, in the
/// first answer as in its replays (which are the same bytes). So an entry
/// is bounded (about this plus the key) whatever the request, and a hostile
/// shape (one good event and many bad ones) costs the index 2 KiB a key,
/// not the 15 KB its full error list would.
pub const MAX_RESPONSE_BYTES: usize = 2 * 1024;
/// What a held key costs in memory besides its map key and its encoded
/// entry: the hash map's slot, the eviction queue's row, two reference
/// counts and the allocator's rounding. Counted against
/// `idempotency.max-bytes` with them.
pub const KEY_OVERHEAD_BYTES: usize = 160;
/// The smallest `idempotency.max-bytes`: room for a few of the largest
/// entries, so a key is never forgotten the moment it is stored.
pub const MIN_MAX_BYTES: u64 = 64 * 1024;
/// Version byte in front of every encoded entry (WAL header and sled value).
/// A later format bumps it; readers refuse versions they do not know.
/// Version 2 stores the exact answer (status, content type, body with the
/// places its sequence numbers go) and the protocol; version 1 (a JSON body
/// with null `first_seq`/`last_seq`, no protocol) is still read: see
/// [`EntryV1`].
const ENTRY_VERSION: u8 = 2;
const ENTRY_VERSION_1: u8 = 1;
/// Version byte of a row of the legacy sled tree (`version ‖ first_seq ‖
/// encoded entry`), read once to move the rows into the log.
const STORED_VERSION: u8 = 1;
/// Bytes in front of the encoded entry in a legacy sled row.
const STORED_HEAD: usize = 1 + 8;
/// The legacy sled tree of entries (before the log): key = scope ‖
/// idempotency key, value = version ‖ first_seq (u64 BE) ‖ encoded Entry.
/// The empty key holds the watermark.
const TREE: &str = "idempotency";
const WATERMARK_KEY: &[u8] = b"";

pub fn is_internal_header(name: &str) -> bool {
    name.starts_with(INTERNAL_PREFIX)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// How long a key is remembered after its request was accepted, in
    /// seconds. Default 86400 (24 h).
    pub window_secs: u64,
    /// Keys remembered at most; the oldest is forgotten first. About 300
    /// bytes each plus the response. Default 100000.
    pub max_keys: usize,
    /// Memory the remembered keys may take, in bytes: each counts its
    /// stored entry (the bytes checkpointed into `idempotency.log`: key,
    /// body hash, answer), its key again as the map's key, and
    /// [`KEY_OVERHEAD_BYTES`]. The oldest is forgotten first. Default
    /// 48 MiB: 100,000 keys of a typical answer (~440 bytes each) fit, the
    /// hostile shape (answers cut at 2 KiB) holds ~20,000. The log holds
    /// the rows on disk only: see docs/design.md "Memory budget".
    pub max_bytes: u64,
}

impl IdempotencyConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_bytes < MIN_MAX_BYTES {
            return Err(format!(
                "idempotency.max-bytes ({}) must be at least {MIN_MAX_BYTES}",
                self.max_bytes
            ));
        }
        Ok(())
    }
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig {
            window_secs: 24 * 3600,
            max_keys: 100_000,
            max_bytes: 48 * 1024 * 1024,
        }
    }
}

/// Which protocol answered a key: a key names one request, so a retry on
/// another protocol (or the other OTLP encoding) is refused with 422, never
/// answered with a body of the wrong kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    /// `/v1/events` and its aliases (a JSON answer with sequence numbers).
    Events,
    /// `/v1/logs` with `application/x-protobuf`.
    OtlpProtobuf,
    /// `/v1/logs` with `application/json`.
    OtlpJson,
}

impl Protocol {
    pub fn describe(self) -> &'static str {
        match self {
            Protocol::Events => "an events route",
            Protocol::OtlpProtobuf => "/v1/logs as OTLP protobuf",
            Protocol::OtlpJson => "/v1/logs as OTLP/JSON",
        }
    }
}

/// An answer exactly as sent: status, `Content-Type`, and the body with the
/// byte offsets where the decimal `first_seq` and `last_seq` go (known only
/// once the batch has its sequence numbers; empty for an answer without
/// them). The first answer and every replay are rendered by
/// [`Answer::render`] from the same value, so they are the same bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
    /// Ascending offsets into `body`: `[first_seq, last_seq]`, or none.
    pub seq_at: Vec<u32>,
}

/// How a JSON answer whose last two fields are the sequence numbers ends
/// before they are known.
const NULL_SEQS_TAIL: &[u8] = br#""first_seq":null,"last_seq":null}"#;

impl Answer {
    /// An answer without sequence numbers.
    pub fn exact(status: u16, content_type: &str, body: Vec<u8>) -> Answer {
        Answer {
            status,
            content_type: content_type.to_string(),
            body,
            seq_at: Vec::new(),
        }
    }

    /// An answer from a compact JSON object that ends with
    /// `"first_seq":null,"last_seq":null}`: the two nulls become the places
    /// of the numbers. Without that ending the body is kept as it is.
    pub fn with_seqs(status: u16, content_type: &str, mut body: Vec<u8>) -> Answer {
        let mut seq_at = Vec::new();
        if body.ends_with(NULL_SEQS_TAIL) {
            let tail = body.len() - NULL_SEQS_TAIL.len();
            let first = tail + br#""first_seq":"#.len();
            let last = first + br#","last_seq":"#.len();
            if let (Ok(f), Ok(l)) = (u32::try_from(first), u32::try_from(last)) {
                body.truncate(tail);
                body.extend_from_slice(br#""first_seq":,"last_seq":}"#);
                seq_at = vec![f, l];
            }
        }
        Answer {
            status,
            content_type: content_type.to_string(),
            body,
            seq_at,
        }
    }

    /// The body with the batch's sequence numbers in their places.
    pub fn render(&self, range: SeqRange) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + 40);
        let mut from = 0;
        for (at, seq) in self.seq_at.iter().zip([range.first, range.last]) {
            let at = (*at as usize).clamp(from, self.body.len());
            out.extend_from_slice(&self.body[from..at]);
            out.extend_from_slice(seq.to_string().as_bytes());
            from = at;
        }
        out.extend_from_slice(&self.body[from..]);
        out
    }
}

/// One accepted keyed request, as stored in the WAL and in sled (version 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// SHA-256 of the API key's name (all zero with auth off), cut to 16
    /// bytes: keys of different API keys never meet.
    pub scope: [u8; 16],
    pub key: String,
    /// SHA-256 of the (decompressed) request body.
    pub body_sha256: [u8; 32],
    pub protocol: Protocol,
    /// The answer, exactly as first sent (at most [`MAX_RESPONSE_BYTES`]
    /// of body: a keyed answer is cut before it is sent).
    pub answer: Answer,
    pub accepted_ms: i64,
    /// Records of the batch; the entry rides in the first.
    pub records: u64,
}

/// A version-1 entry, as builds before the exact answer wrote it. Read
/// only: it becomes an [`Entry`] by [`EntryV1::upgrade`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct EntryV1 {
    scope: [u8; 16],
    key: String,
    body_sha256: [u8; 32],
    status: u16,
    /// The response body as JSON (events) with `first_seq`/`last_seq` null,
    /// or the OTLP response in its encoding.
    response: Vec<u8>,
    accepted_ms: i64,
    records: u64,
}

impl EntryV1 {
    /// The answer version 1 gave on a replay, which was the first answer:
    /// an events body (a JSON object with `accepted`) is 202 JSON with its
    /// sequence numbers; any other JSON is an OTLP/JSON 200; anything else
    /// is an OTLP protobuf 200 (version 1 stored 202 for OTLP too, but the
    /// OTLP handler answered and replayed 200).
    fn upgrade(self) -> Entry {
        let json = serde_json::from_slice::<serde_json::Value>(&self.response).ok();
        let (protocol, answer) = match json {
            Some(v) if v.get("accepted").is_some() => (
                Protocol::Events,
                Answer::with_seqs(self.status, "application/json", self.response),
            ),
            Some(_) => (
                Protocol::OtlpJson,
                Answer::exact(200, "application/json", self.response),
            ),
            None => (
                Protocol::OtlpProtobuf,
                Answer::exact(200, "application/x-protobuf", self.response),
            ),
        };
        Entry {
            scope: self.scope,
            key: self.key,
            body_sha256: self.body_sha256,
            protocol,
            answer,
            accepted_ms: self.accepted_ms,
            records: self.records,
        }
    }
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<{ 1024 * 1024 }>()
}

impl Entry {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![ENTRY_VERSION];
        out.extend(
            bincode::serde::encode_to_vec(self, bincode_config())
                .expect("encoding an Entry into a Vec cannot fail"),
        );
        out
    }

    /// Decodes bytes from disk (version 2, or version 1 upgraded): any input
    /// yields an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Entry, String> {
        fn whole<T: serde::de::DeserializeOwned>(rest: &[u8]) -> Result<T, String> {
            let (e, used): (T, usize) = bincode::serde::decode_from_slice(rest, bincode_config())
                .map_err(|e| e.to_string())?;
            if used != rest.len() {
                return Err("trailing bytes after idempotency entry".into());
            }
            Ok(e)
        }
        match bytes.split_first() {
            Some((&ENTRY_VERSION, rest)) => whole(rest),
            Some((&ENTRY_VERSION_1, rest)) => whole::<EntryV1>(rest).map(EntryV1::upgrade),
            Some((v, _)) => Err(format!("unknown idempotency entry version {v}")),
            None => Err("empty idempotency entry".into()),
        }
    }

    /// The stored body with its sequence numbers filled in.
    pub fn render(&self, first_seq: u64) -> Vec<u8> {
        let last = first_seq + self.records.saturating_sub(1);
        self.answer.render(SeqRange {
            first: first_seq,
            last,
        })
    }
}

/// The scope of a request: its API key's name, or one scope with auth off.
pub fn scope_of(api_key_name: Option<&str>) -> [u8; 16] {
    let mut s = [0u8; 16];
    if let Some(name) = api_key_name {
        let h = Sha256::digest(format!("api-key:{name}").as_bytes());
        s.copy_from_slice(&h[..16]);
    }
    s
}

/// The scope of a key on `stream`: an Idempotency-Key is scoped per API key
/// and per stream, so the same key sent to two streams names two requests.
/// The default stream keeps the scope of [`scope_of`] alone, so keys stored
/// before streams existed still match after an upgrade.
pub fn scope_for(api_key_name: Option<&str>, stream: &str) -> [u8; 16] {
    if stream == crate::wal::DEFAULT_STREAM {
        return scope_of(api_key_name);
    }
    let mut s = [0u8; 16];
    let h = Sha256::digest(
        format!("api-key:{}\nstream:{stream}", api_key_name.unwrap_or("")).as_bytes(),
    );
    s.copy_from_slice(&h[..16]);
    s
}

pub fn body_hash(body: &[u8]) -> [u8; 32] {
    Sha256::digest(body).into()
}

/// Parses the header: an sf-string (`"abc"`, as the draft specifies) or, for
/// clients that send it bare, a token of visible ASCII. 1..=255 bytes.
pub fn parse_key(raw: &[u8]) -> Result<String, &'static str> {
    let text = std::str::from_utf8(raw).map_err(|_| "Idempotency-Key is not ASCII")?;
    let text = text.trim();
    let inner = match text.strip_prefix('"') {
        Some(rest) => rest
            .strip_suffix('"')
            .ok_or("Idempotency-Key: unterminated quoted string")?,
        None => text,
    };
    if inner.is_empty() || inner.len() > MAX_KEY_BYTES {
        return Err("Idempotency-Key must be 1 to 255 characters");
    }
    if !inner
        .bytes()
        .all(|b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'\\')
    {
        return Err("Idempotency-Key must be visible ASCII without quotes or backslashes");
    }
    Ok(inner.to_string())
}

/// What to do with a keyed request.
pub enum Begin {
    /// First time seen: go ahead; the guard releases the key if the request
    /// ends before its batch is durable.
    New(Pending),
    /// Seen and accepted: answer this, append nothing.
    Replay {
        status: u16,
        content_type: String,
        body: Vec<u8>,
    },
    /// Same key, different body.
    Mismatch,
    /// Same key, first used on another protocol (this one was `stored`).
    OtherProtocol { stored: Protocol },
    /// The first request with this key has no outcome yet.
    InFlight,
}

enum Slot {
    InFlight {
        token: u64,
    },
    /// Held as its encoded entry (the bytes of the WAL header and the sled
    /// row), decoded only when a retry meets it: the decoded form would
    /// cost four more allocations a key for what is read rarely.
    Done {
        encoded: Arc<[u8]>,
        first_seq: u64,
    },
}

/// scope ‖ idempotency key. Shared by the map, the eviction order and the
/// checkpoint rows, so a keyed request copies its key once.
type MapKey = Arc<[u8]>;

/// A done key not yet in the log: its map key and its encoded entry (the bytes
/// of the WAL header), so the checkpoint neither looks it up nor encodes it.
struct Unsaved {
    map_key: MapKey,
    encoded: Arc<[u8]>,
}

/// What a held key counts against `idempotency.max-bytes`.
fn cost(map_key: &[u8], encoded: &[u8]) -> u64 {
    (map_key.len() + encoded.len() + KEY_OVERHEAD_BYTES) as u64
}

#[derive(Default)]
struct Inner {
    map: HashMap<MapKey, Slot>,
    /// Done keys in acceptance order, for eviction (stale rows are skipped).
    order: VecDeque<(i64, u64, MapKey)>,
    /// Done keys not yet written to the log, by first_seq. Only live ones:
    /// an evicted or replaced key's row is removed with it.
    unsaved: BTreeMap<u64, Unsaved>,
    /// Keys evicted since the last checkpoint, to delete from the log.
    forgotten: Vec<MapKey>,
    /// A log write failed: the next checkpoint rewrites the log whole from
    /// the map, so deletions are not queued meanwhile (the queue would grow
    /// with every eviction for as long as the disk keeps failing).
    rewrite_pending: bool,
    done: usize,
    /// [`cost`] of the done keys, against `max_bytes`.
    bytes: u64,
}

/// Counters for `/metrics` and `/stats`.
#[derive(Debug, Default)]
pub struct IdempotencyCounters {
    pub held: AtomicU64,
    /// What the held keys count against `idempotency.max-bytes`.
    pub held_bytes: AtomicU64,
    pub evicted_age: AtomicU64,
    pub evicted_cap: AtomicU64,
    pub evicted_bytes: AtomicU64,
    /// Keys found in the WAL at open whose batch is not there whole (see
    /// [`Index::rebuild`]).
    pub evicted_torn: AtomicU64,
    pub replayed: AtomicU64,
    pub mismatched: AtomicU64,
    pub other_protocol: AtomicU64,
    pub in_flight_conflicts: AtomicU64,
    /// Entries in the WAL or the log that did not decode, and damaged log
    /// tails cut at open (skipped, logged).
    pub undecodable: AtomicU64,
}

pub struct Index {
    cfg: IdempotencyConfig,
    /// Taken by every keyed request (`begin`), by the WAL writer after each
    /// fdatasync (`complete`) and briefly by a checkpoint: never held across
    /// the log's writes or any I/O, or ingest stalls behind it.
    inner: Mutex<Inner>,
    /// Serializes checkpoints; holds the log and the last watermark
    /// written. See [`Index::checkpoint`].
    checkpoint: Mutex<Checkpointer>,
    next_token: AtomicU64,
    pub counters: IdempotencyCounters,
}

/// Every done key with its first seq and encoded entry (the `Arc`s
/// cloned): what a rewrite of the log writes.
fn done_rows(inner: &Inner) -> Vec<(MapKey, u64, Arc<[u8]>)> {
    inner
        .map
        .iter()
        .filter_map(|(k, slot)| match slot {
            Slot::Done { encoded, first_seq } => Some((k.clone(), *first_seq, encoded.clone())),
            Slot::InFlight { .. } => None,
        })
        .collect()
}

#[derive(Default)]
struct Checkpointer {
    /// Opened by [`Index::rebuild`]; a checkpoint before it writes nothing.
    log: Option<KeyLog>,
    last_watermark: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Map updates are single inserts/removes: consistent across a panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn map_key(scope: &[u8; 16], key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(scope.len() + key.len());
    k.extend_from_slice(scope);
    k.extend_from_slice(key.as_bytes());
    k
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Index {
    pub fn new(cfg: IdempotencyConfig) -> Arc<Index> {
        Arc::new(Index {
            cfg: IdempotencyConfig {
                window_secs: cfg.window_secs.max(1),
                max_keys: cfg.max_keys.max(1),
                max_bytes: cfg.max_bytes.max(MIN_MAX_BYTES),
            },
            inner: Mutex::new(Inner::default()),
            checkpoint: Mutex::new(Checkpointer::default()),
            next_token: AtomicU64::new(1),
            counters: IdempotencyCounters::default(),
        })
    }

    fn window_ms(&self) -> i64 {
        i64::try_from(self.cfg.window_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
    }

    /// What to do with a request carrying `key` on `protocol`. A key is
    /// one request: the same body on another protocol is refused too (a
    /// replay there would be an answer of the wrong kind).
    pub fn begin(
        self: &Arc<Self>,
        scope: [u8; 16],
        key: &str,
        body_sha256: [u8; 32],
        protocol: Protocol,
    ) -> Begin {
        let mk = map_key(&scope, key);
        let mut inner = lock(&self.inner);
        self.evict(&mut inner, now_ms());
        let done = match inner.map.get(&mk[..]) {
            Some(Slot::Done { encoded, first_seq }) => Some((Entry::decode(encoded), *first_seq)),
            Some(Slot::InFlight { .. }) => {
                self.counters
                    .in_flight_conflicts
                    .fetch_add(1, Ordering::Relaxed);
                return Begin::InFlight;
            }
            None => None,
        };
        match done {
            Some((Ok(entry), first_seq)) => {
                if entry.body_sha256 != body_sha256 {
                    self.counters.mismatched.fetch_add(1, Ordering::Relaxed);
                    return Begin::Mismatch;
                }
                if entry.protocol != protocol {
                    self.counters.other_protocol.fetch_add(1, Ordering::Relaxed);
                    return Begin::OtherProtocol {
                        stored: entry.protocol,
                    };
                }
                self.counters.replayed.fetch_add(1, Ordering::Relaxed);
                let body = entry.render(first_seq);
                return Begin::Replay {
                    status: entry.answer.status,
                    content_type: entry.answer.content_type,
                    body,
                };
            }
            Some((Err(why), _)) => {
                // Unreachable: every held entry decoded (or was encoded
                // here) before it was inserted. Handled as the WAL's
                // undecodable entries are: the key is forgotten.
                self.counters.undecodable.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %why, "held idempotency entry does not decode; key forgotten");
                self.forget(&mut inner, &mk);
            }
            None => {}
        }
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let mk: MapKey = mk.into();
        inner.map.insert(mk.clone(), Slot::InFlight { token });
        Begin::New(Pending {
            index: self.clone(),
            map_key: mk,
            token,
            done: false,
        })
    }

    /// Removes a done key now (its row in the eviction queue goes stale).
    fn forget(&self, inner: &mut Inner, mk: &[u8]) {
        if let Some(Slot::Done { encoded, first_seq }) = inner.map.remove(mk) {
            inner.unsaved.remove(&first_seq);
            inner.done -= 1;
            inner.bytes -= cost(mk, &encoded);
            if !inner.rewrite_pending {
                inner.forgotten.push(mk.into());
            }
        }
    }

    /// Records a durable outcome (from the writer, or from the WAL or the
    /// log at open). `unsaved`: the log does not have the entry yet.
    fn insert_done(
        &self,
        inner: &mut Inner,
        mk: MapKey,
        encoded: Arc<[u8]>,
        accepted_ms: i64,
        first_seq: u64,
        unsaved: bool,
    ) {
        inner.order.push_back((accepted_ms, first_seq, mk.clone()));
        if unsaved {
            inner.unsaved.insert(
                first_seq,
                Unsaved {
                    map_key: mk.clone(),
                    encoded: encoded.clone(),
                },
            );
        }
        inner.bytes += cost(&mk, &encoded);
        match inner
            .map
            .insert(mk.clone(), Slot::Done { encoded, first_seq })
        {
            Some(Slot::Done {
                first_seq: old,
                encoded: was,
            }) => {
                // Replaced (the rebuild meets a key in the log and again in
                // the WAL): the newer row is the one to write.
                inner.bytes -= cost(&mk, &was);
                if old != first_seq {
                    inner.unsaved.remove(&old);
                }
            }
            _ => inner.done += 1,
        }
        self.evict(inner, now_ms());
    }

    /// Forgets keys past the window, then the oldest while over either cap
    /// (`max-keys`, `max-bytes`).
    fn evict(&self, inner: &mut Inner, now: i64) {
        let horizon = now.saturating_sub(self.window_ms());
        while let Some((accepted, first_seq, mk)) = inner.order.front().cloned() {
            let live = matches!(inner.map.get(&mk), Some(Slot::Done { first_seq: f, .. }) if *f == first_seq);
            if !live {
                inner.order.pop_front();
                continue;
            }
            let c = if accepted < horizon {
                &self.counters.evicted_age
            } else if inner.done > self.cfg.max_keys {
                &self.counters.evicted_cap
            } else if inner.bytes > self.cfg.max_bytes {
                &self.counters.evicted_bytes
            } else {
                break;
            };
            inner.order.pop_front();
            self.forget(inner, &mk);
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.counters
            .held
            .store(inner.done as u64, Ordering::Relaxed);
        self.counters
            .held_bytes
            .store(inner.bytes, Ordering::Relaxed);
    }

    /// Appends every entry not yet in the log, the deletions of forgotten
    /// keys and the watermark `durable_next - 1` to `idempotency.log`, and
    /// fdatasyncs it; or, when the log has grown past twice the live rows
    /// (or an earlier write failed), rewrites it whole from the index. The
    /// caller (an offset commit) flushes and fsyncs the offset after this
    /// returns. `durable_next` must be read before this call: the writer
    /// completes entries before it publishes, so every entry below it is in
    /// the index by then.
    ///
    /// The index lock is held only to take the rows (two `mem::take`s, and
    /// for a rewrite a clone of the map's `Arc`s), never while the log is
    /// written: every keyed request and the WAL writer's completion hook
    /// take that lock, and a second of keyed ingest is tens of thousands of
    /// rows (writing them under the lock stalled every request for ~100 ms
    /// once a second, when they went to sled).
    ///
    /// Invariant: a watermark is never durable past rows that are not.
    /// Rows and watermark go into one append whose watermark frame is last
    /// (a torn append is cut at open back to the previous watermark);
    /// checkpoints run one at a time, so a later checkpoint cannot write a
    /// watermark while rows an earlier one took are still on their way; and
    /// rows a failed write did not make durable are put back before the
    /// next checkpoint may run (which then rewrites the log whole).
    ///
    /// If the process dies:
    /// - after the rows are taken, before the fdatasync returns: the log
    ///   holds the previous checkpoint (and perhaps a torn tail, cut at
    ///   open); the rows are in the WAL above its watermark (GC never passes
    ///   the committed offset, and this commit has not happened), so the
    ///   rebuild rescans them;
    /// - after the fdatasync, before the caller's flush and fsync: the log
    ///   is ahead of the offset; the rebuild scans from the higher of the
    ///   two;
    /// - during a rewrite: the old log (and a `.tmp`, removed at open) or,
    ///   once the rename is durable, the new one.
    pub fn checkpoint(&self, durable_next: u64) -> std::io::Result<()> {
        self.checkpoint_with(|| Ok(()), durable_next)
    }

    /// [`Index::checkpoint`] with a step run just before the log is
    /// written (the rows taken, the checkpoint lock held): tests stall it
    /// or make it fail, as a full disk would.
    fn checkpoint_with(
        &self,
        before_write: impl FnOnce() -> std::io::Result<()>,
        durable_next: u64,
    ) -> std::io::Result<()> {
        let mut guard = lock(&self.checkpoint);
        let ck = &mut *guard;
        let Some(log) = ck.log.as_mut() else {
            return Ok(());
        };
        let (forgotten, unsaved, snapshot) = {
            let mut inner = lock(&self.inner);
            self.evict(&mut inner, now_ms());
            // A rewrite's rows: every done key, taken with the rows below
            // so that the two agree (a row taken is in the snapshot).
            let snapshot = (inner.rewrite_pending || log.wants_rewrite(inner.bytes)).then(|| {
                // Deletions are queued again from here: if this rewrite
                // fails, the flag is set again and the queue dropped.
                inner.rewrite_pending = false;
                done_rows(&inner)
            });
            (
                std::mem::take(&mut inner.forgotten),
                std::mem::take(&mut inner.unsaved),
                snapshot,
            )
        };
        // A checkpoint that read the frontier earlier but got the lock later
        // must not move the watermark back (it would only cost a longer
        // rescan, but it is never needed: these rows include every row below
        // the higher one too).
        let through = durable_next.saturating_sub(1).max(ck.last_watermark);
        let written = before_write().and_then(|()| match &snapshot {
            Some(rows) => log.rewrite(rows.iter().map(|(k, f, e)| (&k[..], *f, &e[..])), through),
            // Deletions first: a key forgotten and accepted again since the
            // last checkpoint is in both lists, and the last frame of a key
            // wins.
            None => log.append(
                forgotten.iter().map(|k| &k[..]),
                unsaved
                    .iter()
                    .map(|(f, row)| (&row.map_key[..], *f, &row.encoded[..])),
                through,
            ),
        });
        if let Err(e) = written {
            // Not durable: put the rows back for the next checkpoint (which
            // cannot start before this returns, and rewrites the log whole
            // after a failed append). A row whose key was forgotten
            // meanwhile stays out; its deletion is queued.
            // The rewrite writes every held key: pending rows and deletions
            // are not needed, and deletions stop being queued until it has
            // succeeded.
            log.needs_rewrite = true;
            let mut inner = lock(&self.inner);
            inner.rewrite_pending = true;
            inner.forgotten.clear();
            drop((forgotten, unsaved));
            return Err(e);
        }
        if let Some(rows) = snapshot {
            tracing::debug!(
                rows = rows.len(),
                bytes = log.len(),
                "idempotency log rewritten"
            );
        }
        ck.last_watermark = through;
        Ok(())
    }

    /// Rebuilds the index at open: the log's rows (and, once, the rows a
    /// build before the log left in the sled tree `legacy`), then the WAL
    /// records above both the watermark and the committed offset
    /// (everything above the committed offset is still in the WAL; GC never
    /// passes it).
    pub fn rebuild(
        &self,
        log_path: &std::path::Path,
        legacy: &sled::Tree,
        wal: &Wal,
        committed: u64,
    ) -> Result<RebuildReport, String> {
        let now = now_ms();
        let horizon = now.saturating_sub(self.window_ms());
        let (mut log, read) = KeyLog::open(log_path)
            .map_err(|e| format!("idempotency log {}: {e}", log_path.display()))?;
        if let Some((at, len, why)) = &read.cut {
            self.counters.undecodable.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                path = %log_path.display(),
                offset = at,
                bytes = len,
                reason = %why,
                "idempotency log: cut from this offset (a torn last write, or damage); keys written after it are forgotten unless the WAL rescan finds them"
            );
        }
        if read.created {
            tracing::info!(path = %log_path.display(), "idempotency log created");
        }
        let mut watermark = read.watermark;
        let mut rows = read.rows;
        let (cut, created) = (read.cut.is_some(), read.created);
        // Rows of the sled tree a build before the log wrote: merged over
        // the log's (a downgrade and upgrade leaves both; sled's are then
        // the newer), written into the log whole below, and only then
        // removed from sled (made durable by the next offset commit). Dying
        // between the two: both hold them, and this runs again.
        let mut legacy_rows = 0usize;
        for row in legacy.iter() {
            let (k, v) = row.map_err(|e| e.to_string())?;
            if k.as_ref() == WATERMARK_KEY {
                let w = v.as_ref().try_into().map(u64::from_be_bytes).map_err(|_| {
                    "malformed idempotency watermark in the offsets store".to_string()
                })?;
                watermark = watermark.max(w);
                continue;
            }
            legacy_rows += 1;
            match v.split_first() {
                Some((&STORED_VERSION, rest)) if rest.len() >= STORED_HEAD - 1 => {
                    let mut f = [0u8; 8];
                    f.copy_from_slice(&rest[..8]);
                    rows.insert(k.to_vec(), (u64::from_be_bytes(f), rest[8..].to_vec()));
                }
                _ => {
                    self.counters.undecodable.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        "idempotency entry in the offsets store does not decode; key forgotten"
                    );
                }
            }
        }
        let mut loaded: Vec<(i64, u64, MapKey, Arc<[u8]>)> = Vec::with_capacity(rows.len());
        let mut stale = Vec::new();
        for (k, (first_seq, encoded)) in rows {
            match Entry::decode(&encoded) {
                Ok(entry) if entry.accepted_ms >= horizon => {
                    loaded.push((entry.accepted_ms, first_seq, k.into(), encoded.into()))
                }
                Ok(_) => stale.push(MapKey::from(k)),
                Err(why) => {
                    self.counters.undecodable.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(first_seq, error = %why, "idempotency entry in the log does not decode; key forgotten");
                    stale.push(MapKey::from(k));
                }
            }
        }
        // Oldest first, so that over a cap the oldest are the ones dropped.
        loaded.sort_by_key(|(accepted_ms, f, _, _)| (*accepted_ms, *f));
        let from_log = loaded.len();
        let mut inner = lock(&self.inner);
        for (accepted_ms, first_seq, mk, encoded) in loaded {
            self.insert_done(&mut inner, mk, encoded, accepted_ms, first_seq, false);
        }
        inner.forgotten.extend(stale);
        drop(inner);
        if legacy_rows > 0 || !legacy.is_empty() {
            let rows = done_rows(&lock(&self.inner));
            log.rewrite(rows.iter().map(|(k, f, e)| (&k[..], *f, &e[..])), watermark)
                .map_err(|e| format!("idempotency log {}: {e}", log_path.display()))?;
            lock(&self.inner).forgotten.clear();
            legacy.clear().map_err(|e| e.to_string())?;
            tracing::info!(
                rows = legacy_rows,
                kept = rows.len(),
                path = %log_path.display(),
                "idempotency keys moved from the offsets store into their own log"
            );
        }
        let end = wal.durable().borrow().next_seq;
        // The log's watermark says every key at or below it is in the log.
        // Not to be believed when the log was cut (damage or a torn tail:
        // keys after the cut are gone), when it is missing while the WAL has
        // history, or when it is at or past the WAL's end (the WAL started
        // over, or lost its tail, and seqs are reused): then the rescan
        // covers every record the WAL still holds, below the committed
        // offset too, so every key whose record survives is found.
        let doubt = if cut {
            Some("the log was cut")
        } else if created && (committed > 0 || end > 1) {
            Some("the log is missing while the WAL has history")
        } else if watermark < committed {
            // Every commit checkpoints first (the hook runs before the
            // offset moves), so an intact log is never behind the offset.
            Some("the log's watermark is below the committed offset (it lost checkpoints)")
        } else if watermark >= end {
            Some("the log's watermark is at or past the WAL's end (the WAL started over or lost its tail)")
        } else {
            None
        };
        let start = match doubt {
            None => watermark.max(committed) + 1,
            Some(why) => {
                tracing::warn!(
                    watermark,
                    committed,
                    wal_end = end,
                    reason = why,
                    "idempotency log not trusted: rescanning every record the WAL holds for keys"
                );
                1
            }
        };
        {
            let mut ck = lock(&self.checkpoint);
            ck.log = Some(log);
            // A watermark from another WAL life must not hold the next
            // checkpoints' watermarks up.
            ck.last_watermark = if watermark >= end { 0 } else { watermark };
        }
        let mut reader = wal.reader(start);
        let mut scanned = 0u64;
        let mut from_wal = 0;
        let mut torn = 0;
        // A key counts only once every record of its batch is read: the
        // entry rides in the first record, and a power cut can keep that
        // record while the batch's later ones were torn off (the tail cut,
        // or a hole that recovery reports lost). Such a batch was never
        // acknowledged, since its group commit's fdatasync did not finish;
        // replaying its answer would acknowledge records that are gone.
        let mut pending: Option<Rescanned> = None;
        while reader.next_seq() < end {
            match reader
                .try_next()
                .map_err(|e| format!("{WAL_READ_ERROR}{e}"))?
            {
                None => break,
                Some(ReadItem::Gap(gap)) => {
                    if let Some(p) = pending.take() {
                        torn += 1;
                        self.forget_torn(
                            &p,
                            &format!("records {}..={} are lost", gap.first, gap.last),
                        );
                    }
                }
                Some(ReadItem::Record { seq, record, .. }) => {
                    scanned += 1;
                    if let Some(p) = pending.take_if(|p| seq >= p.last) {
                        if seq == p.last {
                            self.insert_rebuilt(p);
                            from_wal += 1;
                        } else {
                            torn += 1;
                            self.forget_torn(&p, &format!("record {} is missing", p.last));
                        }
                    }
                    if let Some((entry, encoded)) = self.entry_of(seq, &record) {
                        if entry.accepted_ms >= horizon {
                            let candidate = Rescanned {
                                map_key: map_key(&entry.scope, &entry.key).into(),
                                encoded: encoded.into(),
                                accepted_ms: entry.accepted_ms,
                                first: seq,
                                last: seq + entry.records.saturating_sub(1),
                            };
                            if candidate.last <= seq {
                                self.insert_rebuilt(candidate);
                                from_wal += 1;
                            } else if let Some(p) = pending.replace(candidate) {
                                // Unreachable: the reader reports every
                                // missing number as a gap.
                                torn += 1;
                                self.forget_torn(&p, &format!("record {seq} starts another batch"));
                            }
                        }
                    }
                }
            }
        }
        if let Some(p) = pending {
            torn += 1;
            self.forget_torn(&p, &format!("the WAL ends at {}", end.saturating_sub(1)));
        }
        Ok(RebuildReport {
            from_log,
            from_legacy: legacy_rows,
            from_wal,
            torn,
            scanned_records: scanned,
            scanned_from: start,
        })
    }

    fn insert_rebuilt(&self, c: Rescanned) {
        let mut inner = lock(&self.inner);
        self.insert_done(
            &mut inner,
            c.map_key,
            c.encoded,
            c.accepted_ms,
            c.first,
            true,
        );
    }

    /// Counts and logs a key whose batch the WAL does not hold whole: it
    /// stays unknown, so a retry appends the batch again.
    fn forget_torn(&self, c: &Rescanned, why: &str) {
        self.counters.evicted_torn.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            first_seq = c.first,
            last_seq = c.last,
            reason = why,
            "idempotency key of a batch the WAL does not hold whole (a write torn by a crash before its fdatasync, so never acknowledged): forgotten; a retry appends the batch again"
        );
    }

    fn entry_of(&self, seq: u64, record: &Record) -> Option<(Entry, Vec<u8>)> {
        let raw = record.header(ENTRY_HEADER)?;
        match Entry::decode(raw) {
            Ok(e) => Some((e, raw.to_vec())),
            Err(why) => {
                self.counters.undecodable.fetch_add(1, Ordering::Relaxed);
                tracing::error!(seq, error = %why, "idempotency entry in the WAL does not decode; its key is forgotten (a retry appends again)");
                None
            }
        }
    }

    pub fn held(&self) -> u64 {
        self.counters.held.load(Ordering::Relaxed)
    }
}

/// Name, help, and (label value, counter) rows of one counter family.
type Family<'a> = (&'a str, &'a str, &'a [(&'a str, &'a AtomicU64)]);

/// A key the WAL rescan found, held until the last record of its batch
/// (`first..=last`) is read.
struct Rescanned {
    map_key: MapKey,
    encoded: Arc<[u8]>,
    accepted_ms: i64,
    first: u64,
    last: u64,
}

/// Exposes the index's counters on `/metrics`.
pub struct Collector(pub Arc<Index>);

impl prometheus::core::Collector for Collector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        Vec::new()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let c = &self.0.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = Vec::new();
        for (name, help, value) in [
            (
                "sluice_idempotency_keys_held",
                "Idempotency keys remembered in memory",
                &c.held,
            ),
            (
                "sluice_idempotency_bytes_held",
                "What the remembered idempotency keys count against idempotency.max-bytes",
                &c.held_bytes,
            ),
        ] {
            if let Ok(g) = prometheus::IntGauge::new(name, help) {
                g.set(get(value) as i64);
                out.extend(prometheus::core::Collector::collect(&g));
            }
        }
        let families: [Family; 2] = [
            (
                "sluice_idempotency_keys_evicted_total",
                "Idempotency keys forgotten, by reason (age: past the window; cap: over max-keys; bytes: over max-bytes; torn: at open, the WAL lacks part of the key's batch)",
                &[
                    ("age", &c.evicted_age),
                    ("cap", &c.evicted_cap),
                    ("bytes", &c.evicted_bytes),
                    ("torn", &c.evicted_torn),
                ],
            ),
            (
                "sluice_idempotency_requests_total",
                "Keyed requests answered from the index, by outcome",
                &[
                    ("replayed", &c.replayed),
                    ("mismatch", &c.mismatched),
                    ("other_protocol", &c.other_protocol),
                    ("in_flight", &c.in_flight_conflicts),
                    ("undecodable_entry", &c.undecodable),
                ],
            ),
        ];
        for (name, help, rows) in families {
            let label = if name.ends_with("evicted_total") {
                "reason"
            } else {
                "outcome"
            };
            let Ok(v) = prometheus::IntCounterVec::new(prometheus::Opts::new(name, help), &[label])
            else {
                continue;
            };
            for (l, a) in rows {
                v.with_label_values(&[*l]).inc_by(get(a));
            }
            out.extend(prometheus::core::Collector::collect(&v));
        }
        out
    }
}

/// Prefix of a rebuild error that is a failed WAL read (I/O), which `serve`
/// retries at start; any other rebuild error (a malformed store) is not.
pub const WAL_READ_ERROR: &str = "WAL read error: ";

/// What open found.
#[derive(Debug, Clone, Copy)]
pub struct RebuildReport {
    /// Keys read from the log (or moved from the legacy tree) and kept.
    pub from_log: usize,
    /// Rows found in the legacy sled tree (moved into the log).
    pub from_legacy: usize,
    pub from_wal: usize,
    /// Keys in the WAL whose batch is not there whole: forgotten.
    pub torn: usize,
    pub scanned_records: u64,
    pub scanned_from: u64,
}

/// The legacy sled tree (read once by [`Index::rebuild`], then emptied).
pub fn tree(db: &sled::Db) -> sled::Result<sled::Tree> {
    db.open_tree(TREE)
}

/// A key whose request has no outcome yet. Dropped without
/// [`Pending::complete`] (the request failed, was refused, or the WAL never
/// wrote it), the key is released so that a retry is handled afresh.
pub struct Pending {
    index: Arc<Index>,
    map_key: MapKey,
    token: u64,
    done: bool,
}

impl Pending {
    /// Puts the encoded entry ([`Entry::encode`]) into the first payload of
    /// the batch, so it is durable with the records: the payload's header
    /// list grows in place, without decoding and re-encoding the record.
    pub fn stamp(first_payload: &mut Vec<u8>, encoded_entry: &[u8]) -> Result<(), String> {
        crate::wal::record::push_header(first_payload, ENTRY_HEADER, encoded_entry)
            .map_err(|e| e.to_string())
    }

    /// Called by the WAL writer after the fdatasync that made the batch
    /// durable and before the batch becomes visible to replay. `encoded` is
    /// the entry as stamped, kept for the next checkpoint.
    pub fn complete(mut self, encoded: Vec<u8>, accepted_ms: i64, range: SeqRange) {
        self.done = true;
        let index = self.index.clone();
        let mut inner = lock(&index.inner);
        index.insert_done(
            &mut inner,
            self.map_key.clone(),
            encoded.into(),
            accepted_ms,
            range.first,
            true,
        );
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut inner = lock(&self.index.inner);
        if matches!(inner.map.get(&self.map_key), Some(Slot::InFlight { token }) if *token == self.token)
        {
            inner.map.remove(&self.map_key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, hash: u8, ms: i64) -> Entry {
        Entry {
            scope: [0; 16],
            key: key.into(),
            body_sha256: [hash; 32],
            protocol: Protocol::Events,
            answer: Answer::with_seqs(
                202,
                "application/json",
                br#"{"accepted":2,"first_seq":null,"last_seq":null}"#.to_vec(),
            ),
            accepted_ms: ms,
            records: 2,
        }
    }

    /// The writer's completion of `e` at `range`.
    fn finish(p: Pending, e: Entry, range: SeqRange) {
        p.complete(e.encode(), e.accepted_ms, range);
    }

    #[test]
    fn outcomes_and_eviction() {
        let idx = Index::new(IdempotencyConfig {
            window_secs: 3600,
            max_keys: 2,
            ..Default::default()
        });
        let Begin::New(p) = idx.begin([0; 16], "a", [1; 32], Protocol::Events) else {
            panic!("new key")
        };
        assert!(matches!(
            idx.begin([0; 16], "a", [1; 32], Protocol::Events),
            Begin::InFlight
        ));
        finish(p, entry("a", 1, now_ms()), SeqRange { first: 5, last: 6 });
        match idx.begin([0; 16], "a", [1; 32], Protocol::Events) {
            Begin::Replay {
                status,
                content_type,
                body,
            } => {
                assert_eq!((status, &content_type[..]), (202, "application/json"));
                assert_eq!(body, br#"{"accepted":2,"first_seq":5,"last_seq":6}"#);
            }
            _ => panic!("replay"),
        }
        assert!(matches!(
            idx.begin([0; 16], "a", [2; 32], Protocol::Events),
            Begin::Mismatch
        ));
        // The same body on another protocol names another request.
        for other in [Protocol::OtlpJson, Protocol::OtlpProtobuf] {
            assert!(matches!(
                idx.begin([0; 16], "a", [1; 32], other),
                Begin::OtherProtocol {
                    stored: Protocol::Events
                }
            ));
        }
        // Another scope never sees it.
        assert!(matches!(
            idx.begin([9; 16], "a", [1; 32], Protocol::Events),
            Begin::New(_)
        ));
        // A dropped guard releases the key.
        drop(idx.begin([0; 16], "b", [1; 32], Protocol::Events));
        assert!(matches!(
            idx.begin([0; 16], "b", [1; 32], Protocol::Events),
            Begin::New(_)
        ));
        // Cap 2: the third completed key evicts the oldest.
        for (k, seq) in [("c", 10), ("d", 20)] {
            let Begin::New(p) = idx.begin([0; 16], k, [1; 32], Protocol::Events) else {
                panic!()
            };
            finish(
                p,
                entry(k, 1, now_ms()),
                SeqRange {
                    first: seq,
                    last: seq + 1,
                },
            );
        }
        assert_eq!(idx.held(), 2);
        assert_eq!(idx.counters.evicted_cap.load(Ordering::Relaxed), 1);
        assert!(matches!(
            idx.begin([0; 16], "a", [1; 32], Protocol::Events),
            Begin::New(_)
        ));
    }

    #[test]
    fn the_oldest_keys_are_forgotten_over_the_byte_budget() {
        let idx = Index::new(IdempotencyConfig {
            max_bytes: MIN_MAX_BYTES,
            ..Default::default()
        });
        let big = |key: &str| {
            let mut e = entry(key, 1, now_ms());
            e.answer = Answer::exact(200, "application/json", vec![b'x'; MAX_RESPONSE_BYTES]);
            e
        };
        let one = cost(&map_key(&[0; 16], "k-0"), &big("k-0").encode());
        let fits = MIN_MAX_BYTES / one;
        for i in 0..fits + 3 {
            let key = format!("k-{i}");
            let Begin::New(p) = idx.begin([0; 16], &key, [1; 32], Protocol::Events) else {
                panic!("{key} is not new")
            };
            finish(
                p,
                big(&key),
                SeqRange {
                    first: i + 1,
                    last: i + 1,
                },
            );
        }
        assert_eq!(idx.held(), fits);
        assert_eq!(idx.counters.evicted_bytes.load(Ordering::Relaxed), 3);
        assert_eq!(idx.counters.evicted_cap.load(Ordering::Relaxed), 0);
        assert!(idx.counters.held_bytes.load(Ordering::Relaxed) <= MIN_MAX_BYTES);
        for gone in ["k-0", "k-1", "k-2"] {
            assert!(matches!(
                idx.begin([0; 16], gone, [1; 32], Protocol::Events),
                Begin::New(_)
            ));
        }
        assert!(matches!(
            idx.begin([0; 16], "k-3", [1; 32], Protocol::Events),
            Begin::Replay { .. }
        ));
        // Forgotten keys leave the log at the next checkpoint.
        assert_eq!(lock(&idx.inner).forgotten.len(), 3);
    }

    #[test]
    fn expired_keys_are_forgotten() {
        let idx = Index::new(IdempotencyConfig {
            window_secs: 60,
            max_keys: 10,
            ..Default::default()
        });
        let Begin::New(p) = idx.begin([0; 16], "old", [1; 32], Protocol::Events) else {
            panic!()
        };
        finish(
            p,
            entry("old", 1, now_ms() - 61_000),
            SeqRange { first: 1, last: 2 },
        );
        assert!(matches!(
            idx.begin([0; 16], "old", [1; 32], Protocol::Events),
            Begin::New(_)
        ));
        assert_eq!(idx.counters.evicted_age.load(Ordering::Relaxed), 1);
    }

    fn temp_tree() -> sled::Tree {
        let db = sled::Config::new().temporary(true).open().unwrap();
        tree(&db).unwrap()
    }

    fn empty_wal(dir: &std::path::Path) -> crate::wal::Wal {
        crate::wal::Wal::open(
            crate::wal::WalConfig::new(dir),
            Arc::new(crate::wal::io::StdFs),
            0,
        )
        .unwrap()
        .0
    }

    /// An index whose log is `dir/idempotency.log` (rebuilt from it).
    fn opened(cfg: IdempotencyConfig, dir: &std::path::Path) -> (Arc<Index>, RebuildReport) {
        let idx = Index::new(cfg);
        let wal = empty_wal(&dir.join("wal"));
        let report = idx
            .rebuild(&dir.join("idempotency.log"), &temp_tree(), &wal, 0)
            .unwrap();
        (idx, report)
    }

    /// Completes a new key at `first_seq` (one record).
    fn accept(idx: &Arc<Index>, key: &str, first_seq: u64) {
        let Begin::New(p) = idx.begin([0; 16], key, [1; 32], Protocol::Events) else {
            panic!("{key} is not new")
        };
        finish(
            p,
            entry(key, 1, now_ms()),
            SeqRange {
                first: first_seq,
                last: first_seq,
            },
        );
    }

    /// The keys and the watermark the log at `dir` holds, as a restart
    /// reads them.
    fn log_keys(dir: &std::path::Path) -> (Vec<String>, u64) {
        let (_, l) = KeyLog::open(&dir.join("idempotency.log")).unwrap();
        let mut keys: Vec<String> = l
            .rows
            .keys()
            .map(|k| String::from_utf8_lossy(&k[16..]).into_owned())
            .collect();
        keys.sort();
        (keys, l.watermark)
    }

    /// Generous: a request answered only after this is a stall, not a slow
    /// machine.
    const PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

    /// A checkpoint on its own thread, stalled just before it writes the
    /// log (which it has reached when this returns) until the sender is
    /// used.
    fn stalled_checkpoint(
        idx: &Arc<Index>,
        durable_next: u64,
    ) -> (
        std::thread::JoinHandle<std::io::Result<()>>,
        std::sync::mpsc::Sender<()>,
    ) {
        let (in_write, writing) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let idx = idx.clone();
        let handle = std::thread::spawn(move || {
            idx.checkpoint_with(
                || {
                    in_write.send(()).unwrap();
                    released.recv().unwrap();
                    Ok(())
                },
                durable_next,
            )
        });
        writing.recv_timeout(PATIENCE).unwrap();
        (handle, release)
    }

    #[test]
    fn requests_and_the_writer_never_wait_for_the_log_during_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (idx, _) = opened(IdempotencyConfig::default(), dir.path());
        accept(&idx, "a", 1);
        let (checkpoint, release) = stalled_checkpoint(&idx, 2);
        // The log is "busy": a keyed request's begin and the writer's
        // completion hook must still go through.
        let (done, answered) = std::sync::mpsc::channel();
        let request = {
            let idx = idx.clone();
            std::thread::spawn(move || {
                accept(&idx, "b", 2);
                done.send(()).unwrap();
            })
        };
        let outcome = answered.recv_timeout(PATIENCE);
        release.send(()).unwrap();
        request.join().unwrap();
        checkpoint.join().unwrap().unwrap();
        assert!(
            outcome.is_ok(),
            "a keyed request waited for the checkpoint's write"
        );
        // "b" came after the rows were taken: the next checkpoint has it.
        assert_eq!(log_keys(dir.path()), (vec!["a".into()], 1));
        idx.checkpoint(3).unwrap();
        assert_eq!(log_keys(dir.path()), (vec!["a".into(), "b".into()], 2));
    }

    #[test]
    fn a_failed_write_keeps_rows_and_deletions_for_the_next_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = IdempotencyConfig {
            window_secs: 3600,
            max_keys: 2,
            ..Default::default()
        };
        let (idx, _) = opened(cfg.clone(), dir.path());
        accept(&idx, "a", 1);
        accept(&idx, "b", 2);
        idx.checkpoint(3).unwrap();
        assert_eq!(log_keys(dir.path()), (vec!["a".into(), "b".into()], 2));
        // "c" evicts "a" (cap 2).
        accept(&idx, "c", 3);
        let failed = idx.checkpoint_with(|| Err(std::io::Error::other("disk on fire")), 4);
        assert!(failed.is_err());
        assert_eq!(
            log_keys(dir.path()),
            (vec!["a".into(), "b".into()], 2),
            "nothing written"
        );
        // A failed append leaves a partial frame behind: the next
        // checkpoint rewrites the log from the index, whatever is there.
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(dir.path().join("idempotency.log"))
                .unwrap();
            f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        }
        idx.checkpoint(4).unwrap();
        assert_eq!(log_keys(dir.path()), (vec!["b".into(), "c".into()], 3));
        // And a restart finds what the index holds.
        drop(idx);
        let (again, report) = opened(IdempotencyConfig::default(), dir.path());
        assert_eq!((report.from_log, report.from_wal), (2, 0));
        assert!(matches!(
            again.begin([0; 16], "a", [1; 32], Protocol::Events),
            Begin::New(_)
        ));
        assert!(matches!(
            again.begin([0; 16], "c", [1; 32], Protocol::Events),
            Begin::Replay { .. }
        ));
    }

    #[test]
    fn a_checkpoint_never_writes_its_watermark_before_rows_an_earlier_one_took() {
        let dir = tempfile::tempdir().unwrap();
        let (idx, _) = opened(IdempotencyConfig::default(), dir.path());
        accept(&idx, "a", 10);
        accept(&idx, "b", 20);
        // The first checkpoint takes both and stalls before its write.
        let (first, release) = stalled_checkpoint(&idx, 11);
        // The second (the other committer) covers both: when it writes its
        // watermark, "a" must already be in the log.
        let (entered, second_writing) = std::sync::mpsc::channel();
        let second = {
            let (idx, d) = (idx.clone(), dir.path().to_path_buf());
            std::thread::spawn(move || {
                idx.checkpoint_with(
                    || {
                        let _ = entered.send(());
                        let a_written = log_keys(&d).0.contains(&"a".to_string());
                        assert!(
                            a_written,
                            "watermark 20 about to be written while a (seq 10) was not"
                        );
                        Ok(())
                    },
                    21,
                )
            })
        };
        // Give the second one every chance to overtake; it must wait.
        assert!(
            second_writing
                .recv_timeout(std::time::Duration::from_millis(500))
                .is_err(),
            "a second checkpoint wrote while the first was writing"
        );
        release.send(()).unwrap();
        first.join().unwrap().unwrap();
        second.join().unwrap().unwrap();
        assert_eq!(log_keys(dir.path()), (vec!["a".into(), "b".into()], 20));
        // A checkpoint that read an older frontier does not move it back.
        idx.checkpoint(5).unwrap();
        assert_eq!(log_keys(dir.path()).1, 20);
    }

    /// Hostile review D4: while the log keeps failing, deletions are not
    /// queued (the queue grew with every eviction); the rewrite that
    /// follows writes the held keys only.
    #[test]
    fn a_failing_log_queues_no_deletions_and_the_rewrite_holds_the_live_keys() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = IdempotencyConfig {
            max_keys: 2,
            ..Default::default()
        };
        let (idx, _) = opened(cfg, dir.path());
        let mut seq = 0;
        for round in 0..20 {
            for i in 0..50 {
                seq += 1;
                accept(&idx, &format!("k-{round}-{i}"), seq);
            }
            let failed = idx.checkpoint_with(|| Err(std::io::Error::other("EIO")), seq + 1);
            assert!(failed.is_err());
            assert_eq!(lock(&idx.inner).forgotten.len(), 0, "round {round}");
        }
        idx.checkpoint(seq + 1).unwrap();
        assert_eq!(
            log_keys(dir.path()),
            (vec!["k-19-48".into(), "k-19-49".into()], seq)
        );
    }

    /// The log stays within twice the live rows (and its floor) however
    /// many keys come and go: a checkpoint rewrites it from the index.
    #[test]
    fn churn_keeps_the_log_near_the_live_rows() {
        let dir = tempfile::tempdir().unwrap();
        let (idx, _) = opened(
            IdempotencyConfig {
                max_keys: 1000,
                ..Default::default()
            },
            dir.path(),
        );
        let path = dir.path().join("idempotency.log");
        let mut largest = 0;
        for round in 0..60u64 {
            for i in 0..1000 {
                accept(&idx, &format!("k-{round}-{i}"), round * 1000 + i + 1);
            }
            idx.checkpoint(round * 1000 + 1001).unwrap();
            largest = largest.max(std::fs::metadata(&path).unwrap().len());
        }
        let live = idx.counters.held_bytes.load(Ordering::Relaxed);
        assert!(
            largest <= keylog::COMPACT_MIN_BYTES.max(2 * live) + live,
            "log reached {largest} bytes for {live} live bytes"
        );
        let (keys, watermark) = log_keys(dir.path());
        assert_eq!((keys.len(), watermark), (1000, 60_000));
        assert!(keys.iter().all(|k| k.starts_with("k-59-")));
    }

    /// Rows a build before the log left in sled are moved into the log
    /// once, and sled's tree is emptied.
    #[test]
    fn rows_in_the_legacy_sled_tree_move_into_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let t = temp_tree();
        let e = entry("old", 1, now_ms());
        let mut v = vec![STORED_VERSION];
        v.extend_from_slice(&7u64.to_be_bytes());
        v.extend_from_slice(&e.encode());
        t.insert(map_key(&[0; 16], "old"), v).unwrap();
        t.insert(b"", &9u64.to_be_bytes()[..]).unwrap();
        t.insert(map_key(&[0; 16], "junk"), &b"\x09junk"[..])
            .unwrap();
        let idx = Index::new(IdempotencyConfig::default());
        let wal = empty_wal(&dir.path().join("wal"));
        let r = idx
            .rebuild(&dir.path().join("idempotency.log"), &t, &wal, 0)
            .unwrap();
        // Watermark 9 past the empty WAL's end: not trusted, the rescan starts at 1.
        assert_eq!((r.from_log, r.from_legacy, r.scanned_from), (1, 2, 1));
        assert_eq!(idx.counters.undecodable.load(Ordering::Relaxed), 1);
        assert!(t.is_empty());
        assert_eq!(log_keys(dir.path()), (vec!["old".into()], 9));
        assert!(matches!(
            idx.begin([0; 16], "old", [1; 32], Protocol::Events),
            Begin::Replay { .. }
        ));
    }

    #[test]
    fn keys_parse_per_the_draft() {
        assert_eq!(parse_key(br#""8e03978e-40d5""#).unwrap(), "8e03978e-40d5");
        assert_eq!(parse_key(b"abc").unwrap(), "abc");
        assert!(parse_key(b"").is_err());
        assert!(parse_key(b"\"").is_err());
        assert!(parse_key(b"a b").is_err());
        assert!(parse_key(&[b'x'; 256]).is_err());
    }

    #[test]
    fn entries_decode_only_known_versions() {
        let e = entry("k", 3, 1);
        assert_eq!(e.encode()[0], 2);
        assert_eq!(Entry::decode(&e.encode()).unwrap(), e);
        let mut v3 = e.encode();
        v3[0] = 3;
        assert!(Entry::decode(&v3).is_err());
        let mut as_v1 = e.encode();
        as_v1[0] = 1;
        assert!(Entry::decode(&as_v1).is_err(), "a v2 body is no v1 entry");
        assert!(Entry::decode(&[]).is_err());
        assert!(Entry::decode(&[1, 0xff, 0xff]).is_err());
        assert!(Entry::decode(&[2, 0xff, 0xff]).is_err());
    }

    /// A version-1 entry as the previous build encoded it.
    fn v1(status: u16, response: &[u8]) -> Vec<u8> {
        let old = EntryV1 {
            scope: [7; 16],
            key: "k".into(),
            body_sha256: [3; 32],
            status,
            response: response.to_vec(),
            accepted_ms: 11,
            records: 3,
        };
        let mut out = vec![1];
        out.extend(bincode::serde::encode_to_vec(&old, bincode_config()).unwrap());
        out
    }

    #[test]
    fn version_1_entries_still_answer_as_they_did() {
        // Events: the 202 JSON with its sequence numbers, as first sent.
        let body = br#"{"accepted":3,"rejected":0,"errors":[],"first_seq":null,"last_seq":null}"#;
        let e = Entry::decode(&v1(202, body)).unwrap();
        assert_eq!(
            (e.protocol, e.records, e.accepted_ms),
            (Protocol::Events, 3, 11)
        );
        assert_eq!(
            (e.scope, &e.key[..], e.body_sha256),
            ([7; 16], "k", [3; 32])
        );
        assert_eq!(
            e.render(5),
            br#"{"accepted":3,"rejected":0,"errors":[],"first_seq":5,"last_seq":7}"#
        );
        assert_eq!(
            (e.answer.status, &e.answer.content_type[..]),
            (202, "application/json")
        );
        // OTLP: 200 in the encoding of the stored body, unchanged.
        let e = Entry::decode(&v1(202, br#"{"partialSuccess":null}"#)).unwrap();
        assert_eq!(e.protocol, Protocol::OtlpJson);
        assert_eq!(e.render(5), br#"{"partialSuccess":null}"#);
        assert_eq!(
            (e.answer.status, &e.answer.content_type[..]),
            (200, "application/json")
        );
        for pb in [&b""[..], &b"\x0a\x03\x08\x01"[..]] {
            let e = Entry::decode(&v1(202, pb)).unwrap();
            assert_eq!(e.protocol, Protocol::OtlpProtobuf);
            assert_eq!(e.render(9), pb);
            assert_eq!(e.answer.content_type, "application/x-protobuf");
        }
    }

    #[test]
    fn an_answer_renders_its_sequence_numbers_in_place() {
        let a = Answer::with_seqs(
            202,
            "application/json",
            br#"{"errors":["\"first_seq\":null"],"first_seq":null,"last_seq":null}"#.to_vec(),
        );
        assert_eq!(
            a.render(SeqRange {
                first: 10,
                last: 12345
            }),
            br#"{"errors":["\"first_seq\":null"],"first_seq":10,"last_seq":12345}"#
        );
        let plain = Answer::exact(200, "application/x-protobuf", vec![1, 2]);
        assert_eq!(plain.render(SeqRange { first: 1, last: 2 }), [1, 2]);
    }
}
