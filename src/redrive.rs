//! `sluice wal redrive`: sends records again, offline, to any broker list and
//! topic — to fail over to a backup cluster, or to re-send after a loss on the
//! consumer side. Sources: a sequence range of the retained WAL, a quarantined
//! segment copy, or the dead-letter file.
//!
//! It never opens the offset store and never writes under the data
//! directory: the daemon's committed offset and its WAL are exactly as they
//! were, so redriving cannot make the daemon skip or repeat anything. Each
//! record keeps its key, value, timestamp and headers, with `seq` (and
//! `instance`, when the data directory has one) added as replay adds them, so
//! consumers that deduplicate on (`instance`, `seq`) or `id` treat a redriven
//! record as the one they may already have.
//!
//! The exit status is 0 only when every record read was confirmed by Kafka
//! (acks=all, idempotent producer) and nothing in the requested range was
//! unreadable.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, ProducerContext};
use rdkafka::ClientContext;

use crate::wal::format;
use crate::wal::io::StdFs;
use crate::wal::{inspect, Gap, Record};

use crate::replay::producer::{HEADER_INSTANCE, HEADER_SEQ};
/// Delivery failures kept for the summary (all are counted).
const FAILURES_KEPT: usize = 20;
/// The longest dead-letter line read; longer lines are skipped as
/// unreadable. A record is at most 64 MiB, base64 adds a third.
const MAX_LINE_BYTES: u64 = 96 * 1024 * 1024;
/// Read-ahead for a segment copy; a frame larger than this grows the buffer
/// to that frame, bounded by what the file holds.
const READ_CHUNK: usize = 1024 * 1024;

#[derive(clap::Args, Debug)]
#[command(group = clap::ArgGroup::new("source").required(true).args(["data_dir", "segment", "dead_letter"]))]
pub struct RedriveArgs {
    /// Kafka bootstrap servers to send to (comma-separated), e.g. the backup cluster.
    #[arg(long)]
    pub brokers: String,
    /// Topic to send to.
    #[arg(long)]
    pub topic: String,
    /// Source: the retained WAL of this data directory (read-only; the
    /// committed offset is not read or changed).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Source: a segment copy, e.g. DATA_DIR/quarantine/<name>.bad-header,
    /// .corrupt-<offset> or .tail-<offset>. Every intact frame in it is sent.
    #[arg(long)]
    pub segment: Option<PathBuf>,
    /// Source: a dead-letter file (DATA_DIR/dead-letter/dead-letter.ndjson).
    #[arg(long)]
    pub dead_letter: Option<PathBuf>,
    /// First sequence number to send.
    #[arg(long, default_value_t = 1)]
    pub from: u64,
    /// Last sequence number to send (default: the last one in the source).
    #[arg(long)]
    pub through: Option<u64>,
    /// Value of the `instance` header for records that lack one. Default:
    /// the contents of DATA_DIR/instance, if that file exists (for a segment
    /// copy or dead-letter file, DATA_DIR is two levels up from the file).
    #[arg(long)]
    pub instance: Option<String>,
    /// A sluice config file whose [kafka] section supplies compression and
    /// librdkafka properties (TLS, SASL) for the target cluster. Its brokers
    /// and topic are not used.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// How long librdkafka may try to deliver each record before reporting
    /// it failed (message.timeout.ms).
    #[arg(long, default_value_t = 60_000)]
    pub timeout_ms: u64,
}

/// What the run did; printed as one JSON object on stdout.
#[derive(Debug, Default, serde::Serialize)]
pub struct Summary {
    pub source: String,
    pub topic: String,
    pub instance: Option<String>,
    /// Records read from the source within the range.
    pub read: u64,
    pub delivered: u64,
    pub failed: u64,
    /// Records in the range that could not be read (damage, not retained, bad lines).
    pub unreadable: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub unreadable_ranges: Vec<String>,
    pub failures: Vec<String>,
    pub seconds: f64,
}

struct Reports {
    delivered: AtomicU64,
    failed: AtomicU64,
    failures: Mutex<Vec<String>>,
}

struct Ctx(std::sync::Arc<Reports>);

impl ClientContext for Ctx {}

impl ProducerContext for Ctx {
    type DeliveryOpaque = Box<u64>;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: Box<u64>) {
        match result {
            Ok(_) => {
                self.0.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, m)) => {
                self.0.failed.fetch_add(1, Ordering::Relaxed);
                let mut f = self.0.failures.lock().unwrap_or_else(|p| p.into_inner());
                if f.len() < FAILURES_KEPT {
                    f.push(format!("seq {seq} (partition {}): {e}", m.partition()));
                }
            }
        }
    }
}

/// Progress on stderr: a bar on a terminal, else a plain line every 2 s.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    last_line: Instant,
}

impl Progress {
    fn new(total: Option<u64>) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = match total {
                Some(n) => indicatif::ProgressBar::new(n),
                None => indicatif::ProgressBar::new_spinner(),
            };
            let template = if total.is_some() {
                "[{elapsed_precise}] {wide_bar} {pos}/{len} sent {per_sec} {msg}"
            } else {
                "{spinner} [{elapsed_precise}] {pos} sent {per_sec} {msg}"
            };
            let style = indicatif::ProgressStyle::with_template(template)
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        Progress {
            bar,
            last_line: Instant::now(),
        }
    }

    fn update(&mut self, sent: u64, r: &Reports) {
        let (ok, bad) = (
            r.delivered.load(Ordering::Relaxed),
            r.failed.load(Ordering::Relaxed),
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(sent);
                bar.set_message(format!("{ok} confirmed, {bad} failed"));
            }
            None if self.last_line.elapsed() >= Duration::from_secs(2) => {
                self.last_line = Instant::now();
                eprintln!("redrive: {sent} sent, {ok} confirmed, {bad} failed");
            }
            None => {}
        }
    }

    fn finish(&self) {
        // The summary line that follows says the same, on a line of its own.
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// `sluice wal redrive`.
// Longer than 100 lines on purpose: `send` is a closure over the producer,
// the report counters and the progress bar, shared by the three sources
// (`from_wal`, `from_copy`, `from_dead_letters`) and then awaited below; a
// struct holding those borrows would only move the same lines elsewhere.
pub fn run(args: RedriveArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let started = Instant::now();
    let through = args.through.unwrap_or(u64::MAX);
    if args.from > through {
        return Err(format!("--from {} is after --through {through}", args.from).into());
    }
    let (source, data_dir) = match (&args.data_dir, &args.segment, &args.dead_letter) {
        (Some(d), _, _) => (format!("wal {}", d.display()), Some(d.clone())),
        (_, Some(s), _) => (format!("segment {}", s.display()), grandparent(s)),
        (_, _, Some(f)) => (format!("dead-letter {}", f.display()), grandparent(f)),
        _ => return Err("give --data-dir, --segment or --dead-letter".into()),
    };
    let instance = match &args.instance {
        Some(i) => Some(i.clone()),
        None => data_dir.as_deref().and_then(read_instance),
    };
    let mut kafka = match &args.config {
        Some(path) => crate::config::Config::from_file(path)?.kafka,
        None => crate::replay::KafkaConfig::default(),
    };
    kafka.message_timeout_ms = args.timeout_ms;
    let reports = std::sync::Arc::new(Reports {
        delivered: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        failures: Mutex::new(Vec::new()),
    });
    // Replay's producer never times a record out (it keeps order by dropping
    // the whole producer on a stall instead); an offline re-send must end,
    // so a record still unconfirmed after --timeout-ms is reported failed.
    let producer: BaseProducer<Ctx> = crate::replay::producer_config(&kafka, &args.brokers)
        .set("message.timeout.ms", args.timeout_ms.to_string())
        // A gap in a re-send is reported per record, not made fatal (and
        // librdkafka warns about the experimental property whenever set).
        .remove("enable.gapless.guarantee")
        .create_with_context(Ctx(reports.clone()))
        .map_err(|e| format!("producer: {e}"))?;

    let mut summary = Summary {
        source,
        topic: args.topic.clone(),
        instance: instance.clone(),
        ..Summary::default()
    };
    let unreadable = |summary: &mut Summary, first: u64, last: u64, why: &str| {
        let (first, last) = (first.max(args.from), last.min(through));
        if first <= last {
            summary.unreadable += last - first + 1;
            let text = format!("{first}..={last} ({} records, {why})", last - first + 1);
            eprintln!("unreadable {text}");
            summary.unreadable_ranges.push(text);
        }
    };
    // The total is known only for a bounded WAL range.
    let total = match (&args.data_dir, args.through) {
        (Some(_), Some(t)) => Some(t - args.from + 1),
        _ => None,
    };
    let mut progress = Progress::new(total);
    // Records handed to librdkafka; each gets exactly one delivery report.
    let mut queued = 0u64;
    // Records librdkafka refused to queue (counted as failed, no report).
    let mut refused = 0u64;
    let mut send = |summary: &mut Summary, seq: u64, record: Record| -> std::io::Result<()> {
        summary.read += 1;
        summary.first_seq.get_or_insert(seq);
        summary.last_seq = Some(seq);
        let headers = headers(&record, seq, instance.as_deref());
        let mut br = BaseRecord::with_opaque_to(&args.topic, Box::new(seq))
            .payload(&record.value)
            .headers(headers)
            .timestamp(record.timestamp_ms);
        if let Some(k) = &record.key {
            br = br.key(k);
        }
        loop {
            match producer.send(br) {
                Ok(()) => {
                    queued += 1;
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    br = back;
                    producer.poll(Duration::from_millis(50));
                }
                Err((e, _)) => {
                    // Refused before it was queued: no delivery report follows.
                    refused += 1;
                    reports.failed.fetch_add(1, Ordering::Relaxed);
                    let mut f = reports.failures.lock().unwrap_or_else(|p| p.into_inner());
                    if f.len() < FAILURES_KEPT {
                        f.push(format!("seq {seq}: {e}"));
                    }
                    break;
                }
            }
        }
        producer.poll(Duration::ZERO);
        progress.update(summary.read, &reports);
        Ok(())
    };

    // One source per run; each hands its records to `send` in seq order.
    if let Some(dir) = &args.data_dir {
        from_wal(dir, &args, through, &mut summary, &mut send, &unreadable)?;
    } else if let Some(path) = &args.segment {
        from_copy(path, &args, through, &mut summary, &mut send, &unreadable)?;
    } else if let Some(path) = &args.dead_letter {
        from_dead_letters(path, &args, through, &mut summary, &mut send)?;
    }

    // Every record queued gets a report: success, or failure once
    // message.timeout.ms has passed. Wait for all of them. (librdkafka's
    // in-flight count also holds protocol requests, e.g. the idempotent
    // producer's id requests against a dead broker, so count reports.)
    let reported =
        |r: &Reports| r.delivered.load(Ordering::Relaxed) + r.failed.load(Ordering::Relaxed);
    while reported(&reports) < queued + refused {
        producer.poll(Duration::from_millis(200));
        progress.update(summary.read, &reports);
    }
    progress.finish();
    summary.delivered = reports.delivered.load(Ordering::Relaxed);
    summary.failed = reports.failed.load(Ordering::Relaxed);
    summary.failures =
        std::mem::take(&mut *reports.failures.lock().unwrap_or_else(|p| p.into_inner()));
    summary.seconds = (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
    report(&summary)
}

fn report_bad_line(summary: &mut Summary, path: &Path, line_no: u64, why: &str) {
    summary.unreadable += 1;
    let text = format!("{}:{line_no}: {why}", path.display());
    eprintln!("unreadable {text}");
    summary.unreadable_ranges.push(text);
}

/// DATA_DIR for a file at DATA_DIR/<dir>/<file>.
fn grandparent(p: &Path) -> Option<PathBuf> {
    p.parent()?.parent().map(Path::to_path_buf)
}

/// DATA_DIR/instance, trimmed, if it exists and is a short single line.
fn read_instance(data_dir: &Path) -> Option<String> {
    let path = data_dir.join(crate::instance::FILE);
    let mut text = String::new();
    std::fs::File::open(&path)
        .ok()?
        .take(256)
        .read_to_string(&mut text)
        .ok()?;
    let id = text.trim();
    (!id.is_empty() && !id.contains('\n')).then(|| id.to_string())
}

/// The record's own headers (any stale `seq` dropped), then `seq`, then
/// `instance` unless the record carries one.
fn headers(record: &Record, seq: u64, instance: Option<&str>) -> OwnedHeaders {
    let seq_text = seq.to_string();
    let mut h = OwnedHeaders::new_with_capacity(record.headers.len() + 2);
    for (key, value) in record.headers.iter().filter(|(k, _)| k != HEADER_SEQ) {
        h = h.insert(Header {
            key,
            value: Some(value),
        });
    }
    h = h.insert(Header {
        key: HEADER_SEQ,
        value: Some(seq_text.as_bytes()),
    });
    if let Some(i) = instance {
        if record.header(HEADER_INSTANCE).is_none() {
            h = h.insert(Header {
                key: HEADER_INSTANCE,
                value: Some(i.as_bytes()),
            });
        }
    }
    h
}

/// One dead-letter line back into the record it holds.
pub fn dead_letter_record(line: &[u8]) -> Result<(u64, Record), String> {
    #[derive(serde::Deserialize)]
    struct Line {
        seq: u64,
        key: Option<String>,
        timestamp_ms: i64,
        #[serde(default)]
        headers: serde_json::Map<String, serde_json::Value>,
        value: Value,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Value {
        Json(Box<serde_json::value::RawValue>),
        Base64(String),
    }
    let l: Line =
        serde_json::from_slice(line).map_err(|e| format!("not a dead-letter line: {e}"))?;
    let value = match l.value {
        // The file embeds a JSON value as written; its raw text is the
        // compact JSON the record held.
        Value::Json(raw) => raw.get().as_bytes().to_vec(),
        Value::Base64(b) => base64::engine::general_purpose::STANDARD
            .decode(b)
            .map_err(|e| format!("value: {e}"))?,
    };
    let headers = l
        .headers
        .into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k, s.into_bytes())),
            other => Err(format!("header {k} is not a string: {other}")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((
        l.seq,
        Record {
            stream: crate::wal::DEFAULT_STREAM.to_string(),
            key: l.key.map(String::into_bytes),
            value,
            headers,
            timestamp_ms: l.timestamp_ms,
        },
    ))
}

/// Calls `each` for every intact frame in a segment copy, in file order. A
/// copy may start with a segment header (good or bad) or, for a cut region,
/// with no header at all, and may hold garbage between frames: each offset
/// that does not start a frame whose checksum holds is skipped byte by byte.
///
/// Only a candidate whose length fits in the rest of the file and whose
/// sequence number is plausible is read whole and checksummed, so garbage
/// costs one 16-byte look per byte, not a checksum of up to 64 MiB per byte.
/// Plausible: above the last frame found, and at most one number per 17
/// bytes of the file past it (a frame is at least 17 bytes); before the
/// first frame, within the range the copy's name allows (recovery names
/// copies `<segment>.bad-header`, `<segment>.corrupt-<offset>`,
/// `<segment>.tail-<offset>`), or anything for a copy with another name.
pub fn scan_copy(
    path: &Path,
    mut each: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> Result<(), String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file_len = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    let per_frame = format::frame_len(1) as u64;
    let mut window = match copy_origin(path) {
        Some((first, offset)) => {
            first..=first.saturating_add(offset.saturating_add(file_len) / per_frame + 1)
        }
        None => 0..=u64::MAX,
    };
    let mut buf: Vec<u8> = Vec::new();
    // File offset of buf[0], and bytes of the file read so far.
    let mut buf_start = 0u64;
    let mut read_to = 0u64;
    let mut pos = 0usize;
    loop {
        if let Some(head) = buf.get(pos..pos + format::FRAME_HEADER_LEN) {
            let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
            let seq = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
            let left = file_len - (buf_start + pos as u64);
            if len == 0
                || len > format::MAX_PAYLOAD_BYTES
                || format::frame_len(len as usize) as u64 > left
                || !window.contains(&seq)
            {
                pos += 1;
                continue;
            }
        }
        match format::decode_frame(&buf[pos..]) {
            Ok(frame) => {
                let len = frame.disk_len();
                each(frame.seq, frame.payload).map_err(|e| e.to_string())?;
                let next = frame.seq.saturating_add(1);
                window = next..=next.saturating_add(file_len / per_frame + 1);
                pos += len;
                continue;
            }
            Err(format::FrameError::Incomplete { need, .. }) => {
                let have = buf.len() - pos;
                let in_file = (file_len - read_to) as usize;
                if in_file == 0 {
                    // The file ends inside this candidate: try the next byte,
                    // or stop when nothing is left.
                    if have == 0 {
                        return Ok(());
                    }
                    pos += 1;
                    continue;
                }
                // `need` is bounded by MAX_PAYLOAD_BYTES and, past the check
                // above, by the file; never read past the file.
                let want = (need - have).max(READ_CHUNK).min(in_file);
                buf.drain(..pos);
                buf_start += pos as u64;
                pos = 0;
                let old = buf.len();
                buf.resize(old + want, 0);
                file.read_exact(&mut buf[old..])
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                read_to += want as u64;
                debug_assert_eq!(buf_start + buf.len() as u64, read_to);
            }
            Err(_) => pos += 1,
        }
    }
}

/// The segment's first sequence number and the copy's offset in it, from a
/// quarantine name: `<segment>.bad-header` (offset 0), `<segment>.corrupt-N`
/// or `<segment>.tail-N`, each followed by recovery's `.<unix ms>[-n]`.
fn copy_origin(path: &Path) -> Option<(u64, u64)> {
    let name = path.file_name()?.to_str()?;
    let (segment, what) = name.split_at(name.find(".wal.")? + 4);
    let first = format::parse_segment_name(segment)?;
    // Recovery adds `.<unix ms>` (and `-n` if taken) so that evidence is
    // never overwritten: the kind is what comes before it.
    let kind = what.strip_prefix('.')?;
    let kind = kind.split_once('.').map_or(kind, |(k, _)| k);
    let offset = match kind {
        "bad-header" => 0,
        other => {
            let n = other
                .strip_prefix("corrupt-")
                .or_else(|| other.strip_prefix("tail-"))?;
            n.parse().ok()?
        }
    };
    Some((first, offset))
}

/// One line for the operator on stderr, the JSON summary on stdout, and the
/// exit status: 0 only if every record read was confirmed and nothing in the
/// range was unreadable.
fn report(summary: &Summary) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let ok = summary.failed == 0 && summary.unreadable == 0 && summary.delivered == summary.read;
    eprintln!(
        "redrive {}: {} read, {} confirmed by Kafka, {} failed, {} unreadable, seq {}..{} to {} in {:.1} s",
        if ok { "OK" } else { "INCOMPLETE" },
        summary.read,
        summary.delivered,
        summary.failed,
        summary.unreadable,
        summary.first_seq.map_or("-".into(), |s| s.to_string()),
        summary.last_seq.map_or("-".into(), |s| s.to_string()),
        summary.topic,
        summary.seconds,
    );
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, summary)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Hands one record (with its seq) to the producer.
type SendFn<'a> = dyn FnMut(&mut Summary, u64, Record) -> std::io::Result<()> + 'a;
/// Records a range of the source that could not be read.
type UnreadableFn<'a> = dyn Fn(&mut Summary, u64, u64, &str) + 'a;
type Result2 = Result<(), Box<dyn std::error::Error>>;

/// A seq range of the retained WAL; numbers asked for but not retained
/// (delivered and deleted by GC, or past the end) are reported unreadable.
fn from_wal(
    dir: &Path,
    args: &RedriveArgs,
    through: u64,
    summary: &mut Summary,
    send: &mut SendFn,
    unreadable: &UnreadableFn,
) -> Result2 {
    let wal = dir.join("wal");
    if !wal.is_dir() {
        return Err(format!("{} has no wal/ directory", dir.display()).into());
    }
    let mut gaps = Vec::new();
    inspect::for_each_record(
        &StdFs,
        &wal,
        args.from,
        |seq, r| {
            if seq > through {
                return Ok(ControlFlow::Break(()));
            }
            send(summary, seq, r)?;
            Ok(ControlFlow::Continue(()))
        },
        |g: Gap| gaps.push(g),
    )?;
    for g in gaps {
        unreadable(summary, g.first, g.last, &g.reason.to_string());
    }
    // Numbers asked for but not in the WAL: below its first retained
    // record (delivered, then deleted by GC) or past its last one.
    match summary.first_seq {
        Some(first) if first > args.from => {
            unreadable(summary, args.from, first - 1, "not retained")
        }
        None if args.through.is_some() => unreadable(summary, args.from, through, "not in the WAL"),
        _ => {}
    }
    if let (Some(last), Some(t)) = (summary.last_seq, args.through) {
        if last < t {
            unreadable(summary, last + 1, t, "not in the WAL");
        }
    }
    Ok(())
}

/// A quarantined segment copy: every intact frame in the range.
fn from_copy(
    path: &Path,
    args: &RedriveArgs,
    through: u64,
    summary: &mut Summary,
    send: &mut SendFn,
    unreadable: &UnreadableFn,
) -> Result2 {
    let mut n = 0u64;
    scan_copy(path, |seq, payload| {
        if seq < args.from || seq > through {
            return Ok(());
        }
        match Record::decode(payload) {
            Ok(r) => send(summary, seq, r),
            Err(e) => {
                unreadable(summary, seq, seq, &format!("undecodable record: {e}"));
                Ok(())
            }
        }
        .map(|()| n += 1)
    })?;
    if n == 0 {
        eprintln!(
            "no intact frame in {} within {}..={through}",
            path.display(),
            args.from
        );
    }
    Ok(())
}

/// The dead-letter file: one JSON record per line; a bad or over-long line
/// is reported by its number and skipped.
fn from_dead_letters(
    path: &Path,
    args: &RedriveArgs,
    through: u64,
    summary: &mut Summary,
    send: &mut SendFn,
) -> Result2 {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut reader = std::io::BufReader::new(file);
    let mut line = Vec::new();
    let mut line_no = 0u64;
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE_BYTES + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if n as u64 > MAX_LINE_BYTES {
            // Skip the rest of an over-long line.
            let mut rest = Vec::new();
            reader.read_until(b'\n', &mut rest)?;
            report_bad_line(summary, path, line_no, "longer than the limit");
            continue;
        }
        match dead_letter_record(&line) {
            Ok((seq, r)) if seq >= args.from && seq <= through => send(summary, seq, r)?,
            Ok(_) => {}
            Err(why) => report_bad_line(summary, path, line_no, &why),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(seqs: std::ops::RangeInclusive<u64>) -> Vec<u8> {
        let mut out = Vec::new();
        for seq in seqs {
            let r = Record {
                stream: crate::wal::DEFAULT_STREAM.to_string(),
                key: Some(b"k".to_vec()),
                value: format!("{{\"n\":{seq}}}").into_bytes(),
                headers: vec![("id".into(), format!("e{seq}").into_bytes())],
                timestamp_ms: seq as i64,
            };
            format::encode_frame(&mut out, seq, &r.encode());
        }
        out
    }

    #[test]
    fn a_copy_with_a_bad_header_and_garbage_between_frames_yields_every_intact_frame() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = format::encode_header(7).to_vec();
        bytes[0] ^= 0xff;
        bytes.extend(frames(7..=9));
        bytes.extend([0xAB; 37]);
        bytes.extend(frames(10..=11));
        let mut damaged = frames(12..=12);
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        bytes.extend(damaged);
        bytes.extend(&frames(13..=13)[..10]);
        let path = dir.path().join("copy");
        std::fs::write(&path, &bytes).unwrap();
        let mut seen = Vec::new();
        scan_copy(&path, |seq, payload| {
            let r = Record::decode(payload).unwrap();
            assert_eq!(r.value, format!("{{\"n\":{seq}}}").into_bytes());
            seen.push(seq);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![7, 8, 9, 10, 11]);
    }

    #[test]
    fn quarantine_names_give_the_segment_and_offset() {
        let p = |n: &str| copy_origin(Path::new(n));
        assert_eq!(p("q/00000000000000004097.wal.bad-header"), Some((4097, 0)));
        assert_eq!(p("00000000000000000001.wal.corrupt-8192"), Some((1, 8192)));
        assert_eq!(p("00000000000000000001.wal.tail-24"), Some((1, 24)));
        assert_eq!(
            p("00000000000000000019.wal.bad-header.1795707643493"),
            Some((19, 0))
        );
        assert_eq!(
            p("00000000000000000001.wal.corrupt-8192.1795707643493-2"),
            Some((1, 8192))
        );
        assert_eq!(p("copy.bin"), None);
        assert_eq!(p("00000000000000000001.wal.other"), None);
    }

    /// Garbage whose windows claim 60 MiB frames is skipped without reading
    /// them, and an intact frame whose number cannot belong to the segment
    /// the copy came from (1 + (100 + file length) / 17 at most) is not sent.
    #[test]
    fn garbage_and_out_of_place_frames_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = Vec::new();
        for _ in 0..4096 {
            bytes.extend([0u8, 0, 0, 0]);
            bytes.extend((60u32 << 20).to_le_bytes());
        }
        bytes.extend(frames(1_000_000..=1_000_000));
        bytes.extend(frames(3..=4));
        let path = dir.path().join("00000000000000000001.wal.corrupt-100");
        std::fs::write(&path, &bytes).unwrap();
        let mut seen = Vec::new();
        scan_copy(&path, |seq, _| {
            seen.push(seq);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![3, 4]);
        // Under another name nothing bounds the first number.
        let other = dir.path().join("copy.bin");
        std::fs::write(&other, &bytes).unwrap();
        let mut seen = Vec::new();
        scan_copy(&other, |seq, _| {
            seen.push(seq);
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![1_000_000],
            "3 and 4 are below a frame already found"
        );
    }

    #[test]
    fn a_copy_larger_than_the_read_chunk_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = frames(1..=60_000);
        assert!(bytes.len() > 2 * READ_CHUNK);
        let path = dir.path().join("copy");
        std::fs::write(&path, &bytes).unwrap();
        let mut n = 0;
        scan_copy(&path, |seq, _| {
            n += 1;
            assert_eq!(seq, n);
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 60_000);
    }

    #[test]
    fn a_dead_letter_line_gives_back_the_record() {
        let line = br#"{"seq":42,"topic":"events","error":"too big","key":"acme","timestamp_ms":5,"headers":{"id":"a-1","tenant":"acme"},"value":{"json":{"b":1.50,"a":[1,2]}}}"#;
        let (seq, r) = dead_letter_record(line).unwrap();
        assert_eq!(seq, 42);
        assert_eq!(r.key.as_deref(), Some(&b"acme"[..]));
        assert_eq!(r.value, br#"{"b":1.50,"a":[1,2]}"#.to_vec());
        assert_eq!(r.header("id"), Some(&b"a-1"[..]));
        let b64 = br#"{"seq":1,"topic":"t","error":"e","key":null,"timestamp_ms":0,"headers":{},"value":{"base64":"AAEC"}}"#;
        assert_eq!(dead_letter_record(b64).unwrap().1.value, vec![0, 1, 2]);
        assert!(dead_letter_record(b"{\"seq\":1}").is_err());
        assert!(dead_letter_record(b"garbage").is_err());
    }
}
