//! `sluice wal redrive`: sends records again, offline, to any broker list and
//! topic — to fail over to a backup cluster, or to re-send after a loss on the
//! consumer side. Sources: a sequence range of the retained WAL, a quarantined
//! segment copy, or the dead-letter file.
//!
//! It never opens the offset store and never writes under the data
//! directory: the daemon's committed offset and its WAL are exactly as they
//! were, so redriving cannot make the daemon skip or repeat anything.
//!
//! **A run is an instance of its own.** Each record keeps its key, value,
//! timestamp and own headers, but its `instance` and `seq` are the run's:
//! a UUID derived from what the run sends (see [`run_instance`]) and a seq
//! that is a function of the record's place in the source (`seq - from + 1`
//! for a WAL range or a segment copy, the line number for the dead-letter
//! file). The record's first identity travels in `origin-instance` and
//! `origin-seq`. So the consumer rule admits a re-sent record even where
//! later seqs of its original instance already reached the partition (the
//! gap it was sent to fill), and the same run repeated produces the same
//! (instance, seq) pairs on the same partitions, which the rule drops.
//!
//! Per partition, what a run gets written is a prefix of what it produced
//! there, in order (the replayer's argument, docs/design.md "Ordering per
//! partition"): librdkafka never times a record out, a refused batch stops
//! the producer (gapless guarantee), nothing more is queued after the first
//! failure, and a stall purges everything and stops. A failed run repeated
//! therefore fills in exactly what the first one missed.
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
use rdkafka::message::Message;
use rdkafka::producer::{
    BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig,
};
use rdkafka::ClientContext;
use sha2::{Digest, Sha256};

use crate::replay::headers::Ours;
use crate::replay::producer::HEADER_INSTANCE;
use crate::wal::format;
use crate::wal::io::StdFs;
use crate::wal::{inspect, Gap, Record};

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
    /// The source's instance id: the `origin-instance` header of records
    /// that lack an `instance` of their own, and part of the run's identity.
    /// Default: the contents of DATA_DIR/instance, if that file exists (for
    /// a segment copy or dead-letter file, DATA_DIR is two levels up from the
    /// file). At most 36 bytes (a UUID).
    #[arg(long)]
    pub instance: Option<String>,
    /// Only records of this stream (WAL and segment copies). Default: the
    /// built-in stream `default`. Records of other streams are never mixed
    /// into `--topic`: they are skipped, listed in the summary
    /// (`skipped_other`) and make the exit status 1 unless `--stream` was
    /// given. Run once per stream, each to its own topic.
    #[arg(long)]
    pub stream: Option<String>,
    /// Dead-letter file only: send the lines whose original topic is this.
    /// Default: `--topic`. Lines of other topics are skipped and listed as
    /// for `--stream`.
    #[arg(long)]
    pub source_topic: Option<String>,
    /// A sluice config file whose [kafka] section supplies compression and
    /// librdkafka properties (TLS, SASL) for the target cluster. Its brokers
    /// and topic are not used.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// How long the run waits for the topic's metadata, and with records in
    /// flight and no delivery report, before it gives up: what is still
    /// queued or in flight is purged and reported failed, and nothing more
    /// is sent.
    #[arg(long, default_value_t = 60_000)]
    pub timeout_ms: u64,
}

/// What the run did; printed as one JSON object on stdout.
#[derive(Debug, Default, serde::Serialize)]
pub struct Summary {
    pub source: String,
    pub topic: String,
    /// The run's own instance id (the `instance` header it sends).
    pub instance: String,
    /// The source's instance id (the `origin-instance` header), if known.
    pub origin_instance: Option<String>,
    /// Partitions of the target topic, from its metadata.
    pub partitions: Option<i32>,
    /// Records read from the source within the range.
    pub read: u64,
    pub delivered: u64,
    /// Records not confirmed: failed, purged, or not sent after an earlier
    /// failure (`not_sent` of them).
    pub failed: u64,
    pub not_sent: u64,
    /// Records in the range that could not be read (damage, not retained, bad lines).
    pub unreadable: u64,
    /// First and last origin seq read.
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub unreadable_ranges: Vec<String>,
    pub failures: Vec<String>,
    /// Records not sent because they belong to another stream (WAL, copy)
    /// or another original topic (`topic <name>`, dead-letter file), by name.
    pub skipped_other: std::collections::BTreeMap<String, u64>,
    /// Dead-letter lines whose (instance, seq) an earlier line of the file
    /// already held (a record dead-lettered again after a crash): sent once.
    pub duplicate_lines: u64,
    /// Whether the selection was chosen explicitly (`--stream` or
    /// `--source-topic`): then skipped records do not fail the run.
    #[serde(skip)]
    pub selection_explicit: bool,
    pub seconds: f64,
}

struct Reports {
    delivered: AtomicU64,
    failed: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl Reports {
    fn fail(&self, text: impl FnOnce() -> String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if f.len() < FAILURES_KEPT {
            f.push(text());
        }
    }

    fn reported(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed)
    }
}

struct Ctx(std::sync::Arc<Reports>);

impl ClientContext for Ctx {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel::*;
        match level {
            Emerg | Alert | Critical | Error => tracing::error!(fac, message, "librdkafka"),
            // Set on purpose (see `run`): not worth a warning on every run.
            Warning if fac == "CONFWARN" && message.contains("enable.gapless.guarantee") => {}
            Warning => tracing::warn!(fac, message, "librdkafka"),
            _ => tracing::debug!(fac, message, "librdkafka"),
        }
    }
}

impl ProducerContext for Ctx {
    /// (origin seq, redrive seq)
    type DeliveryOpaque = Box<(u64, u64)>;

    fn delivery(&self, result: &DeliveryResult<'_>, seqs: Box<(u64, u64)>) {
        match result {
            Ok(_) => {
                self.0.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, m)) => self.0.fail(|| {
                format!(
                    "seq {} (redrive seq {}, partition {}): {e}",
                    seqs.0,
                    seqs.1,
                    m.partition()
                )
            }),
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

/// The producer side of a run: sends in source order, stops at the first
/// failure, and purges on a stall, so that per partition what the run gets
/// written is a prefix of what it produced there.
struct Sender<'a> {
    producer: BaseProducer<Ctx>,
    reports: std::sync::Arc<Reports>,
    topic: &'a str,
    /// None: the topic's metadata could not be had; nothing is sent.
    partitions: Option<i32>,
    instance: &'a str,
    origin_instance: Option<&'a str>,
    stall: Duration,
    /// Records handed to librdkafka; each gets exactly one delivery report.
    queued: u64,
    /// Records refused or not sent (counted failed, no report).
    unqueued: u64,
    not_sent: u64,
    first_not_sent: Option<u64>,
    /// Why nothing more is sent, once something failed.
    stopped: Option<String>,
    /// When the count of reports last moved (or the first record was queued).
    last_progress: Instant,
    last_reported: u64,
}

impl Sender<'_> {
    fn send(&mut self, origin_seq: u64, seq: u64, record: &Record) {
        if self.stopped.is_none() && self.reports.failed.load(Ordering::Relaxed) > 0 {
            self.stop("an earlier record failed".into());
        }
        let Some(partitions) = self.partitions.filter(|_| self.stopped.is_none()) else {
            self.not_sent(origin_seq);
            return;
        };
        // The record's own `instance`, if it has one (≤ a UUID's length, as
        // `value_fit` counts), else the source's.
        let origin_instance = record
            .header(HEADER_INSTANCE)
            .filter(|i| i.len() <= crate::instance::ID_LEN)
            .and_then(|i| std::str::from_utf8(i).ok())
            .or(self.origin_instance);
        let ours = Ours::new(seq, Some(self.instance)).origin(origin_instance, origin_seq);
        let key = record.key.as_deref();
        let partition = crate::replay::partition::partition_for(key, seq, partitions);
        let mut br = BaseRecord::with_opaque_to(self.topic, Box::new((origin_seq, seq)))
            .payload(&record.value)
            .headers(ours.kafka(&record.headers))
            .partition(partition)
            .timestamp(record.timestamp_ms);
        if let Some(k) = key {
            br = br.key(k);
        }
        if self.queued == 0 {
            self.last_progress = Instant::now();
        }
        loop {
            match self.producer.send(br) {
                Ok(()) => {
                    self.queued += 1;
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    br = back;
                    self.producer.poll(Duration::from_millis(50));
                    if self.stalled() {
                        self.not_sent(origin_seq);
                        break;
                    }
                }
                Err((e, _)) => {
                    // Refused before it was queued: no delivery report
                    // follows, and nothing after it may be queued.
                    self.unqueued += 1;
                    self.reports.fail(|| format!("seq {origin_seq}: {e}"));
                    self.stop(format!("seq {origin_seq} was refused"));
                    break;
                }
            }
        }
        self.producer.poll(Duration::ZERO);
    }

    /// Counted failed, reported once for the whole run (`finish`).
    fn not_sent(&mut self, origin_seq: u64) {
        self.unqueued += 1;
        self.not_sent += 1;
        self.first_not_sent.get_or_insert(origin_seq);
        self.reports.failed.fetch_add(1, Ordering::Relaxed);
    }

    fn stop(&mut self, why: String) {
        if self.stopped.is_none() {
            eprintln!("redrive: stopping: {why}; records after it are not sent (run the same range again once the cause is fixed)");
            self.stopped = Some(why);
        }
    }

    /// True (once purged) when records are in flight and no delivery report
    /// came for `stall`: everything queued or in flight is purged (each gets
    /// a failed report) and nothing more is sent.
    fn stalled(&mut self) -> bool {
        let reported = self.reports.reported() - self.unqueued;
        if reported != self.last_reported {
            self.last_reported = reported;
            self.last_progress = Instant::now();
        }
        if reported >= self.queued || self.last_progress.elapsed() < self.stall {
            return false;
        }
        // Dying here is dying anywhere else: the daemon's state was never
        // touched, and what reached the topic is a prefix per partition.
        self.producer
            .purge(PurgeConfig::default().queue().inflight());
        self.stop(format!(
            "no delivery report for {} ms with {} records in flight",
            self.stall.as_millis(),
            self.queued - reported
        ));
        true
    }

    /// Waits for every queued record's report (success, failure, or purge).
    fn finish(&mut self, progress: &mut Progress, read: u64) {
        while self.reports.reported() < self.queued + self.unqueued {
            self.producer.poll(Duration::from_millis(200));
            self.stalled();
            progress.update(read, &self.reports);
        }
        if let Some(first) = self.first_not_sent {
            let why = self.stopped.as_deref().unwrap_or("stopped");
            let text = format!(
                "seq {first} and {} later records: not sent: {why}",
                self.not_sent - 1
            );
            let mut f = self
                .reports
                .failures
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            f.push(text);
        }
    }
}

/// `sluice wal redrive`.
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
    let origin_instance = match &args.instance {
        Some(i) => Some(i.clone()),
        None => data_dir.as_deref().and_then(read_instance),
    };
    if let Some(i) = origin_instance.as_deref() {
        if i.len() > crate::instance::ID_LEN || i.is_empty() {
            return Err(format!("instance {i:?} is not an instance id (1 to 36 bytes)").into());
        }
    }
    let instance = run_instance(&args, origin_instance.as_deref())?;
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
    // Replay's producer config: librdkafka never times a record out and a
    // refused batch stops the producer (gapless guarantee), so a record can
    // fail only with everything after it on its partition failing too;
    // the stall limit is ours (`Sender::stalled`).
    let producer: BaseProducer<Ctx> = crate::replay::producer_config(&kafka, &args.brokers)
        .create_with_context(Ctx(reports.clone()))
        .map_err(|e| format!("producer: {e}"))?;
    let stall = Duration::from_millis(args.timeout_ms);
    let partitions = match partition_count(&producer, &args.topic, stall) {
        Ok(n) => Some(n),
        Err(e) => {
            eprintln!("redrive: {e}");
            reports
                .failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(e);
            None
        }
    };
    let mut summary = Summary {
        source,
        topic: args.topic.clone(),
        instance: instance.clone(),
        origin_instance: origin_instance.clone(),
        partitions,
        selection_explicit: args.stream.is_some() || args.source_topic.is_some(),
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
    let mut sender = Sender {
        producer,
        reports: reports.clone(),
        topic: &args.topic,
        partitions,
        instance: &instance,
        origin_instance: origin_instance.as_deref(),
        stall,
        queued: 0,
        unqueued: 0,
        not_sent: 0,
        first_not_sent: None,
        stopped: partitions
            .is_none()
            .then(|| "no metadata for the topic".to_string()),
        last_progress: Instant::now(),
        last_reported: 0,
    };
    let mut send = |summary: &mut Summary, origin_seq: u64, seq: u64, record: Record| {
        summary.read += 1;
        summary.first_seq.get_or_insert(origin_seq);
        summary.last_seq = Some(origin_seq);
        sender.send(origin_seq, seq, &record);
        progress.update(summary.read, &reports);
        Ok(())
    };

    // One source per run; each hands its records to `send` in source order
    // with the redrive seq its place gives (see the module doc).
    if let Some(dir) = &args.data_dir {
        from_wal(dir, &args, through, &mut summary, &mut send, &unreadable)?;
    } else if let Some(path) = &args.segment {
        from_copy(path, &args, through, &mut summary, &mut send, &unreadable)?;
    } else if let Some(path) = &args.dead_letter {
        from_dead_letters(path, &args, through, &mut summary, &mut send)?;
    }

    // Every record queued gets a report: success, failure, or purge after a
    // stall. Wait for all of them. (librdkafka's in-flight count also holds
    // protocol requests, e.g. the idempotent producer's id requests against
    // a dead broker, so count reports.)
    sender.finish(&mut progress, summary.read);
    progress.finish();
    summary.not_sent = sender.not_sent;
    summary.delivered = reports.delivered.load(Ordering::Relaxed);
    summary.failed = reports.failed.load(Ordering::Relaxed);
    summary.failures =
        std::mem::take(&mut *reports.failures.lock().unwrap_or_else(|p| p.into_inner()));
    summary.seconds = (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
    report(&summary)
}

/// The run's instance id: a UUID (RFC 9562 version 8) from SHA-256 of what
/// decides which record gets which redrive seq, so that the same run
/// repeated sends the same (instance, seq) pairs and the consumer rule drops
/// the repeats:
/// - a WAL range or segment copy (redrive seq = origin seq - from + 1): the
///   source instance (or, without one, the data directory's canonical path
///   or the copy's file name), `--from`, the topic. WAL and copies of one
///   instance share it: one origin seq is one record either way.
/// - the dead-letter file (redrive seq = line number): the source instance,
///   SHA-256 of the file's first line (a rotated or recreated file is
///   another file), `--from`, the topic.
///
/// `--through` is not part of it: a longer range from the same start gives
/// the records both runs send the same redrive seqs.
pub fn run_instance(
    args: &RedriveArgs,
    origin_instance: Option<&str>,
) -> Result<String, Box<dyn std::error::Error>> {
    let fallback = |p: &Path| -> String {
        match (&args.data_dir, p.file_name()) {
            (Some(_), _) => format!(
                "dir:{}",
                std::fs::canonicalize(p)
                    .unwrap_or_else(|_| p.to_path_buf())
                    .display()
            ),
            (None, Some(name)) => format!("copy:{}", name.to_string_lossy()),
            (None, None) => format!("copy:{}", p.display()),
        }
    };
    let source = match (&args.data_dir, &args.segment, &args.dead_letter) {
        (Some(p), _, _) | (_, Some(p), _) => match origin_instance {
            Some(i) => format!("seq:instance:{i}"),
            None => format!("seq:{}", fallback(p)),
        },
        (_, _, Some(p)) => format!(
            "dead-letter:{}:{}",
            origin_instance.unwrap_or(""),
            first_line_digest(p)?
        ),
        _ => return Err("give --data-dir, --segment or --dead-letter".into()),
    };
    let mut h = Sha256::new();
    for part in [
        "sluice wal redrive v1",
        &source,
        &args.from.to_string(),
        &args.topic,
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    Ok(uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .to_string())
}

/// Hex SHA-256 of the first line of a file (at most MAX_LINE_BYTES of it).
fn first_line_digest(path: &Path) -> Result<String, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut line = Vec::new();
    std::io::BufReader::new(file)
        .take(MAX_LINE_BYTES)
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Sha256::digest(&line)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The target topic's partition count, from the cluster's metadata.
fn partition_count(
    producer: &BaseProducer<Ctx>,
    topic: &str,
    within: Duration,
) -> Result<i32, String> {
    let metadata = producer
        .client()
        .fetch_metadata(Some(topic), within)
        .map_err(|e| format!("metadata for topic {topic}: {e}"))?;
    let t = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| format!("metadata for topic {topic}: not in the answer"))?;
    match (t.error(), t.partitions().len()) {
        (None, n) if n > 0 => {
            i32::try_from(n).map_err(|_| format!("topic {topic}: {n} partitions"))
        }
        (e, _) => Err(format!(
            "topic {topic} does not exist or has no partitions ({e:?})"
        )),
    }
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

/// Whether `r` belongs to the stream this run sends (`--stream`, default
/// the built-in one); counts it in `skipped_other` when not.
fn wanted_stream(args: &RedriveArgs, r: &Record, summary: &mut Summary) -> bool {
    let wanted = args.stream.as_deref().unwrap_or(crate::wal::DEFAULT_STREAM);
    if r.stream == wanted {
        return true;
    }
    *summary.skipped_other.entry(r.stream.clone()).or_default() += 1;
    false
}

/// One dead-letter line back into the record it holds.
pub fn dead_letter_record(line: &[u8]) -> Result<(u64, Record), String> {
    dead_letter_entry(line).map(|(seq, _, r)| (seq, r))
}

/// One dead-letter line: its seq, the topic the record was refused by (if
/// the line says), and the record.
pub fn dead_letter_entry(line: &[u8]) -> Result<(u64, Option<String>, Record), String> {
    #[derive(serde::Deserialize)]
    struct Line {
        seq: u64,
        #[serde(default)]
        topic: Option<String>,
        /// Written since the instance id existed; older lines lack it.
        #[serde(default)]
        instance: Option<String>,
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
    // The instance the line was written under, as the record's own
    // `instance` header: `Sender::send` makes it the `origin-instance`.
    let mut headers = headers;
    if let Some(i) = l.instance {
        headers.retain(|(k, _)| k != HEADER_INSTANCE);
        headers.push((HEADER_INSTANCE.to_string(), i.into_bytes()));
    }
    Ok((
        l.seq,
        l.topic,
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
    let ok = summary.failed == 0
        && summary.unreadable == 0
        && summary.delivered == summary.read
        && (summary.skipped_other.is_empty() || summary.selection_explicit);
    if !summary.skipped_other.is_empty() {
        eprintln!(
            "redrive: records of other streams or topics were not sent: {:?}{}",
            summary.skipped_other,
            if summary.selection_explicit {
                ""
            } else {
                " (run again with --stream NAME, or --source-topic for a dead-letter file, each to its own topic)"
            }
        );
    }
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

/// Hands one record to the producer, with its origin seq and its redrive seq.
type SendFn<'a> = dyn FnMut(&mut Summary, u64, u64, Record) -> std::io::Result<()> + 'a;
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
    // The first and last seq read, of any stream: what the WAL retains.
    let (mut walked_first, mut walked_last) = (None::<u64>, None::<u64>);
    inspect::for_each_record(
        &StdFs,
        &wal,
        args.from,
        |seq, r| {
            if seq > through {
                return Ok(ControlFlow::Break(()));
            }
            if seq < args.from {
                // The walk starts at --from; never number below it.
                return Ok(ControlFlow::Continue(()));
            }
            walked_first.get_or_insert(seq);
            walked_last = Some(seq);
            if !wanted_stream(args, &r, summary) {
                return Ok(ControlFlow::Continue(()));
            }
            send(summary, seq, seq - args.from + 1, r)?;
            Ok(ControlFlow::Continue(()))
        },
        |g: Gap| gaps.push(g),
    )?;
    for g in gaps {
        unreadable(summary, g.first, g.last, &g.reason.to_string());
    }
    // Numbers asked for but not in the WAL: below its first retained
    // record (delivered, then deleted by GC) or past its last one.
    match walked_first {
        Some(first) if first > args.from => {
            unreadable(summary, args.from, first - 1, "not retained")
        }
        None if args.through.is_some() => unreadable(summary, args.from, through, "not in the WAL"),
        _ => {}
    }
    if let (Some(last), Some(t)) = (walked_last, args.through) {
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
            Ok(r) if !wanted_stream(args, &r, summary) => Ok(()),
            Ok(r) => send(summary, seq, seq - args.from + 1, r),
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
    // (instance, seq) of every line sent: one entry per dead letter, which
    // are rare by construction.
    let mut seen: std::collections::HashSet<(Option<Vec<u8>>, u64)> = Default::default();
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
        match dead_letter_entry(&line) {
            // The line number is the redrive seq: lines are only ever
            // appended, and one seq may appear on two lines (a record
            // dead-lettered again after a crash before the commit): the
            // second is the same record and is not sent again, or a rule
            // consumer would see it twice under two redrive seqs.
            Ok((seq, topic, r)) if seq >= args.from && seq <= through => {
                let wanted = args.source_topic.as_deref().unwrap_or(&args.topic);
                if let Some(t) = topic.filter(|t| t != wanted) {
                    *summary
                        .skipped_other
                        .entry(format!("topic {t}"))
                        .or_default() += 1;
                    continue;
                }
                let instance = r
                    .headers
                    .iter()
                    .rev()
                    .find(|(k, _)| k == HEADER_INSTANCE)
                    .map(|(_, v)| v.clone());
                if !seen.insert((instance, seq)) {
                    summary.duplicate_lines += 1;
                    continue;
                }
                send(summary, seq, line_no, r)?
            }
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
        assert_eq!(r.header("instance"), None, "a line without one");
        let with = br#"{"seq":3,"instance":"0190-x","topic":"t","error":"e","key":null,"timestamp_ms":0,"headers":{},"value":{"json":1}}"#;
        assert_eq!(
            dead_letter_record(with).unwrap().1.header("instance"),
            Some(&b"0190-x"[..])
        );
        let b64 = br#"{"seq":1,"topic":"t","error":"e","key":null,"timestamp_ms":0,"headers":{},"value":{"base64":"AAEC"}}"#;
        assert_eq!(dead_letter_record(b64).unwrap().1.value, vec![0, 1, 2]);
        assert!(dead_letter_record(b"{\"seq\":1}").is_err());
        assert!(dead_letter_record(b"garbage").is_err());
    }
}
