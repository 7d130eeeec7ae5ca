//! `sluice serve`: open the data directory, recover the WAL, serve HTTP, and
//! shut down in order.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config::Config;
use crate::datadir::DataDirLock;
use crate::dev::dev_broker::DevBroker;
use crate::http::{app, AppState};
use crate::metrics::{Metrics, Sources};
use crate::replay::dead_letter::DeadLetterFile;
use crate::replay::offsets::OffsetStore;
use crate::replay::replayer::Replayer;
use crate::wal::io::{Filesystem, StdFs};
use crate::wal::Wal;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Lock(#[from] crate::datadir::LockError),
    #[error(transparent)]
    Offsets(#[from] crate::replay::offsets::OffsetError),
    #[error("WAL recovery failed: {0}")]
    Wal(#[from] crate::wal::WalError),
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
    #[error("Kafka: {0}")]
    Kafka(String),
    #[error(transparent)]
    Keys(#[from] crate::auth::KeysError),
    #[error(transparent)]
    Tls(#[from] crate::http::tls::TlsError),
    #[error("{0}")]
    UnknownStreams(String),
    /// A read at start (the stream scan, the idempotency rebuild) failed;
    /// retried in place, as replay retries the same reads.
    #[error("reading at start: {0}")]
    StartupRead(String),
}

/// How the daemon ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Clean shutdown.
    Clean,
    /// The WAL failed (sticky); exit non-zero so systemd restarts into
    /// recovery.
    WalFailed,
}

/// The handlers' state. The counters come first: the metrics registry reads
/// them at scrape time, and the handlers and the replayer (through the
/// state) update them.
fn build_state(
    config: &Config,
    wal: Arc<Wal>,
    offsets: Arc<OffsetStore>,
    keys: Option<Arc<crate::auth::KeyStore>>,
) -> Arc<AppState> {
    let sources = Sources::new(
        wal,
        config.limits.max_inflight_bytes,
        config.rates.tenant_metrics_cap(),
    );
    let metrics =
        Metrics::install(&sources).expect("metric names and labels are static and unique");
    metrics.zero_streams(config.streams().all().iter().map(|s| s.name.as_str()));
    Arc::new(AppState::assemble(config, sources, metrics, offsets, keys))
}

/// Runs the daemon on `listener` (and the admin listener, when bound) until
/// `shutdown` resolves or the WAL fails.
// About 110 lines: the start-up order (credentials, storage, Kafka,
// replayer, listeners, watchdog) is the crash-ordering argument of the
// daemon, so it reads top to bottom in one place; each step is a function.
pub async fn run(
    config: Config,
    listener: TcpListener,
    admin: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Exit, ServeError> {
    config.validate()?;
    let mut config = config;
    // An event larger than the producer takes would get 202 and then go to
    // the dead letters: ingest answers 413 instead.
    let fit = config.effective_max_event_bytes()?;
    if fit < config.limits.max_event_bytes {
        tracing::info!(
            max_event_bytes = fit,
            "limits.max-event-bytes lowered from its default to what the producer's message.max.bytes carries after the key and headers"
        );
        config.limits.max_event_bytes = fit;
    }
    // Credentials first: a bad keys file or certificate is an operator error
    // to report before anything else is opened.
    let (keys, tls) = load_credentials(&config)?;
    let data_dir = config.data_dir.clone();
    // Durable: the directories must survive a power loss with the files
    // that recovery later fsyncs inside them.
    crate::wal::io::create_dir_all_durable(&data_dir).map_err(|source| ServeError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let _lock = DataDirLock::acquire(&data_dir)?;
    let (offsets, wal, offsets_reset) = open_storage(&config).await?;
    crate::debug::arm_read_failures();
    // Before replay can produce anything: every record carries this id. It
    // is replaced when the storage starts over at seq 1 (see instance.rs).
    let next = wal.durable().borrow().next_seq;
    let held = offsets.durable_through()?;
    let reuse = if next == 1 {
        Some("the WAL and the offset store hold no sequence number (wal/ and offsets/ deleted or emptied, or nothing was ever written)".to_string())
    } else if next <= held {
        Some(format!(
            "the WAL ends below what it held before: the next seq is {next}, but seqs up to {held} were durable (and may have reached Kafka) under this id; the WAL lost its tail (deleted, or damaged and cut)"
        ))
    } else {
        None
    };
    let instance =
        crate::instance::load_or_create(&data_dir, reuse.as_deref()).map_err(|source| {
            ServeError::DataDir {
                path: data_dir.join(crate::instance::FILE),
                source,
            }
        })?;
    if reuse.is_some() && held > 0 {
        // After the new id is durable: the mark belonged to the old one.
        // Dying in between makes the next start rotate again (no record
        // was produced under the id in between).
        offsets.reset_durable_through()?;
    }
    tracing::info!(%instance, "data directory identity");
    retry_startup_read("checking the streams of undelivered WAL records", || {
        check_wal_streams(&config, &wal, &offsets)
    })
    .await?;

    let (dev_broker, brokers) = start_kafka(&config)?;
    let state = build_state(&config, wal.clone(), offsets.clone(), keys);
    // Installed here, before READY, so a SIGHUP never meets the default
    // action (terminate).
    let hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGHUP handler; keys reload on file change only");
            None
        }
    };
    let reloads = tokio::spawn(reload_credentials(
        state.clone(),
        hup,
        tls.clone(),
        std::time::Duration::from_millis(config.auth.reload_interval_ms),
    ));
    retry_startup_read("rebuilding the Idempotency-Key index", || async {
        crate::server_idempotency::start(&state, &wal, &offsets, &data_dir)
            .await
            .map_err(|e| {
                // Only a failed read is worth retrying; a malformed store
                // is not going to read differently (exit 2, as before).
                let text = e.to_string();
                if text.contains(crate::idempotency::WAL_READ_ERROR) {
                    ServeError::StartupRead(text)
                } else {
                    ServeError::Http(std::io::Error::other(text))
                }
            })
    })
    .await?;
    if offsets_reset {
        state
            .replay
            .offset_store_resets
            .fetch_add(1, Ordering::Relaxed);
    }
    let (replay_stop, replayer_alive, replay_task) =
        spawn_replayer(&config, &state, wal.clone(), offsets, brokers).await?;
    let watchdog = spawn_watchdog(wal.clone(), replayer_alive);
    let addr = listener.local_addr().map_err(ServeError::Http)?;
    tracing::info!(%addr, data_dir = %data_dir.display(), "sluice listening");

    let st = state.clone();
    // The failure itself ends the process: the request that met it may be
    // gone already (deadline, client away), and a daemon that only answers
    // 503 would never be restarted into recovery.
    let wal_failed = wal.failed();
    let stop = async move {
        tokio::select! {
            _ = shutdown => tracing::info!("shutdown requested: finishing in-flight requests"),
            _ = st.fatal.notified() => tracing::error!("WAL failed: shutting down to restart into recovery"),
            _ = wal_failed => tracing::error!("WAL failed: shutting down to restart into recovery"),
        }
        crate::systemd::stopping();
        st.shutting_down.store(true, Ordering::Relaxed);
    };
    let admin = admin.map(|l| crate::http::admin::spawn(l, state.clone()));
    crate::systemd::ready(&format!("serving on {addr}"));
    crate::http::listener::serve(
        listener,
        app(state.clone()),
        &config.http,
        state.counters.clone(),
        tls,
        stop,
    )
    .await;
    // Before the drain, so nothing but the drain holds the WAL.
    if let Some(a) = admin {
        a.stop().await;
    }
    shut_down(Running {
        reloads,
        replay_stop,
        watchdog,
        replay_task,
        dev_broker,
        state,
        wal,
    })
    .await
}

/// The API keys (`None`: auth disabled) and the TLS certificate (`None`:
/// plain HTTP).
pub(crate) type Credentials = (
    Option<Arc<crate::auth::KeyStore>>,
    Option<Arc<crate::http::tls::Tls>>,
);

pub(crate) fn load_credentials(config: &Config) -> Result<Credentials, ServeError> {
    let keys = if config.auth.keys_file.as_os_str().is_empty() {
        let exposed = !config.http.listen.ip().is_loopback();
        if exposed {
            tracing::warn!(listen = %config.http.listen, "AUTH DISABLED on a non-loopback address: any client that reaches this port may write any tenant. Set auth.keys-file (docs/security.md).");
        } else {
            tracing::info!("auth disabled (no auth.keys-file); listening on loopback only");
        }
        None
    } else {
        let store = crate::auth::KeyStore::load(&config.auth.keys_file)?;
        tracing::info!(keys = store.len(), file = %config.auth.keys_file.display(), "API keys loaded");
        Some(Arc::new(store))
    };
    let tls = if config.http.tls_cert_file.as_os_str().is_empty() {
        None
    } else {
        let t = crate::http::tls::Tls::load(&config.http.tls_cert_file, &config.http.tls_key_file)?;
        tracing::info!(cert = %config.http.tls_cert_file.display(), "TLS enabled");
        Some(Arc::new(t))
    };
    Ok((keys, tls))
}

/// Runs a start-up step that reads the WAL, retrying a failed read a few
/// times in place (100 ms doubling, 6 attempts, about 6 s in all): a
/// transient read error (a path failover, a busy device) then costs a
/// moment, not a restart. A read that keeps failing ends the start with
/// `ServeError::StartupRead`, which `serve` exits 1 on, like a storage
/// failure: systemd restarts it into recovery and, if it keeps failing,
/// marks the unit failed (`StartLimitBurst`), which an operator sees.
/// Retrying forever instead left a process whose ports accepted
/// connections but answered nothing, with no metric scraped and no failed
/// unit (found by the hostile review). Replay can retry forever because
/// the daemon serves meanwhile; a start cannot serve without this step.
/// Any other error ends the start at once, as before.
async fn retry_startup_read<T, F, Fut>(what: &str, mut step: F) -> Result<T, ServeError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ServeError>>,
{
    const ATTEMPTS: u32 = 6;
    let mut wait = std::time::Duration::from_millis(100);
    let mut failures = 0u32;
    loop {
        match step().await {
            Ok(v) => {
                if failures > 0 {
                    tracing::info!(failures, "{what}: succeeded after retrying");
                }
                return Ok(v);
            }
            Err(ServeError::StartupRead(why)) => {
                failures += 1;
                crate::datadir::STARTUP_READ_FAILURES.fetch_add(1, Ordering::Relaxed);
                if failures >= ATTEMPTS {
                    tracing::error!(error = %why, failures, "{what}: read failed every time; exiting 1 so that systemd restarts into recovery");
                    return Err(ServeError::StartupRead(format!("{what}: {why}")));
                }
                tracing::error!(error = %why, failures, retry_in_ms = wait.as_millis() as u64, "{what}: read failed; retrying (not serving until it succeeds)");
                crate::systemd::extend_start(
                    &format!("{what}: read failed ({failures}x), retrying: {why}"),
                    u32::try_from((wait * 2).as_micros()).unwrap_or(u32::MAX),
                );
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Opens the offset store (reset if unreadable), recovers the WAL from the
/// committed offset, and records the ranges recovery found lost.
async fn open_storage(config: &Config) -> Result<(Arc<OffsetStore>, Arc<Wal>, bool), ServeError> {
    let data_dir = &config.data_dir;
    let wal_config = config.wal_config();
    let data_dir_ = data_dir.clone();
    // sled and recovery do blocking I/O.
    tokio::task::spawn_blocking(move || -> Result<_, ServeError> {
        let (offsets, reset) = OffsetStore::open_or_reset(&data_dir_, &wal_config.dir)?;
        if let Some(r) = &reset {
            tracing::error!(
                reason = %r.reason,
                quarantined = ?r.quarantined,
                replay_from_seq = r.committed + 1,
                "OFFSET STORE RESET: replay restarts from the oldest retained WAL segment; records already in Kafka will be delivered again (duplicates, no loss)"
            );
        }
        let committed = offsets.committed()?;
        let (wal, report) = Wal::open(
            wal_config,
            Arc::new(StdFs) as Arc<dyn Filesystem>,
            committed,
        )?;
        // Receipts must say `lost` for these; durable with the next commit,
        // which is the earliest the offset can pass them. A range that
        // reaches next_seq (a last segment with an unreadable header) will be
        // reassigned to new records, so it is not recorded.
        for gap in report.lost.iter().filter(|g| g.last < report.next_seq) {
            offsets.record_fate(gap.first, gap.last, crate::replay::offsets::Fate::Lost)?;
        }
        // Before anything is appended or produced: records below this were
        // written by a build that let librdkafka choose partitions (only
        // when the store does not say so already; a new data dir says 1).
        // Durable before returning, so the boundary never moves.
        offsets.set_pinning_since(report.next_seq)?;
        Ok((Arc::new(offsets), Arc::new(wal), reset.is_some()))
    })
    .await
    .map_err(|e| ServeError::Http(std::io::Error::other(e)))?
}

/// Key of the offset store holding the names of every stream that may have
/// records in the WAL (newline-separated): each start stores its configured
/// streams there, durably, before serving.
const WAL_STREAMS_KEY: &[u8] = b"wal-streams";

/// Refuses to start while the WAL holds records of a stream this
/// configuration does not define: acknowledged events must not be dropped
/// or produced to a topic their stream never named. The operator puts the
/// stream back, lets replay drain it, then removes it.
///
/// Invariant: every stream with records above the committed offset is in
/// the stored set, since a stream only gets records while configured and
/// the configured set is stored (flushed and fsynced) before serving. So
/// when the stored set is within this configuration nothing is read; else
/// (a stream removed, or no set: a data dir from before streams, or a reset
/// store) the undelivered records are read once before anything is served.
async fn check_wal_streams(
    config: &Config,
    wal: &Arc<Wal>,
    offsets: &Arc<OffsetStore>,
) -> Result<(), ServeError> {
    let topics = config.streams().topics();
    let configured: Vec<String> = config
        .streams()
        .all()
        .iter()
        .map(|s| s.name.clone())
        .collect();
    let stored = offsets
        .db()
        .get(WAL_STREAMS_KEY)
        .map_err(crate::replay::offsets::OffsetError::from)?
        .map(|v| {
            String::from_utf8_lossy(&v)
                .split('\n')
                .filter(|n| !n.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>()
        });
    let needs_scan = match &stored {
        None => true,
        Some(names) => names.iter().any(|n| !topics.contains(n)),
    };
    if needs_scan {
        scan_wal_streams(&topics, wal, offsets).await?;
    }
    // Dying before this is durable leaves the old set: the next start scans
    // again if that set names a stream it lacks, which is only slower.
    let offsets = offsets.clone();
    tokio::task::spawn_blocking(move || {
        offsets
            .db()
            .insert(WAL_STREAMS_KEY, configured.join("\n").into_bytes())?;
        // A commit at or below the offset flushes and fsyncs the store.
        let committed = offsets.committed()?;
        offsets.commit(committed).map(|_| ())
    })
    .await
    .map_err(|e| ServeError::Http(std::io::Error::other(e)))??;
    Ok(())
}

/// Reads every record above the committed offset and refuses to start if
/// one belongs to a stream `topics` lacks, naming each with its range.
async fn scan_wal_streams(
    topics: &crate::replay::StreamTopics,
    wal: &Arc<Wal>,
    offsets: &Arc<OffsetStore>,
) -> Result<(), ServeError> {
    let topics = topics.clone();
    let from = offsets.committed()? + 1;
    let wal = wal.clone();
    let started = std::time::Instant::now();
    let (unknown, scanned) = tokio::task::spawn_blocking(move || {
        let end = wal.durable().borrow().next_seq;
        let mut reader = wal.reader(from);
        let mut scanned = 0u64;
        // Stream name -> (first seq, last seq, records).
        let mut unknown = std::collections::BTreeMap::<String, (u64, u64, u64)>::new();
        while reader.next_seq() < end {
            match reader.try_next()? {
                None => break,
                Some(crate::wal::ReadItem::Gap(_)) => {}
                Some(crate::wal::ReadItem::Record { seq, record, .. }) => {
                    scanned += 1;
                    if !topics.contains(&record.stream) {
                        let e = unknown.entry(record.stream).or_insert((seq, seq, 0));
                        e.1 = seq;
                        e.2 += 1;
                    }
                }
            }
        }
        Ok::<_, crate::wal::WalError>((unknown, scanned))
    })
    .await
    .map_err(|e| ServeError::Http(std::io::Error::other(e)))?
    .map_err(|e| ServeError::StartupRead(format!("WAL from seq {from}: {e}")))?;
    tracing::info!(
        from_seq = from,
        scanned_records = scanned,
        ms = started.elapsed().as_millis() as u64,
        "undelivered WAL records checked for their streams"
    );
    if unknown.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = unknown
        .iter()
        .map(|(name, (first, last, n))| format!("{name:?} ({n} records, seqs {first}..={last})"))
        .collect();
    Err(ServeError::UnknownStreams(format!(
        "the WAL holds undelivered records of streams this configuration does not define: {}. Refusing to start rather than drop or misroute them: add the stream(s) back to [[streams]] until replay has delivered them",
        list.join(", ")
    )))
}

/// Kafka: the configured brokers, or the embedded dev broker (returned, so
/// it lives until shutdown), and the bootstrap servers to use.
fn start_kafka(config: &Config) -> Result<(Option<DevBroker>, String), ServeError> {
    if config.sink.kind == crate::replay::SinkKind::Files {
        // Replay writes the archive files: no broker, not even the dev one.
        tracing::info!(dir = %config.archive.dir.display(), "sink: archive files (no Kafka)");
        return Ok((None, String::new()));
    }
    let dev_broker = if config.kafka.brokers.is_empty() {
        let topics = config.streams().topics().all_topics();
        let broker =
            DevBroker::start(&topics, config.kafka.dev_partitions).map_err(ServeError::Kafka)?;
        tracing::warn!(
            bootstrap = broker.bootstrap_servers(),
            "DEV MODE: embedded mock Kafka broker. Delivered events live ONLY IN MEMORY and vanish when sluice stops. Configure kafka.brokers for real use."
        );
        Some(broker)
    } else {
        None
    };
    let brokers = dev_broker
        .as_ref()
        .map_or(config.kafka.brokers.clone(), |b| {
            b.bootstrap_servers().to_string()
        });
    Ok((dev_broker, brokers))
}

/// Repairs the dead-letter file's tail, then starts the replayer. Returns its
/// stop switch, its liveness for the watchdog, and its task.
async fn spawn_replayer(
    config: &Config,
    state: &Arc<AppState>,
    wal: Arc<Wal>,
    offsets: Arc<OffsetStore>,
    brokers: String,
) -> Result<
    (
        tokio::sync::watch::Sender<bool>,
        crate::systemd::Alive,
        tokio::task::JoinHandle<()>,
    ),
    ServeError,
> {
    let data_dir = &config.data_dir;
    let dead_letter = DeadLetterFile::new(data_dir);
    let (dead_letter, repaired) = tokio::task::spawn_blocking(move || {
        let r = dead_letter.repair_tail();
        (dead_letter, r)
    })
    .await
    .map_err(|e| ServeError::Http(std::io::Error::other(e)))?;
    match repaired {
        Ok(0) => {}
        Ok(_) => {
            state
                .replay
                .dead_letter_partial_lines
                .fetch_add(1, Ordering::Relaxed);
        }
        // Not fatal: the first append checks the tail again before writing.
        Err(e) => {
            tracing::error!(error = %e, file = %dead_letter.path().display(), "cannot check the dead-letter file's last line; the next dead letter will")
        }
    }
    let (replay_stop, replay_stop_rx) = tokio::sync::watch::channel(false);
    let replayer = Replayer {
        wal,
        offsets,
        kafka: config.kafka.clone(),
        brokers,
        cfg: config.replay.clone(),
        stats: state.replay.clone(),
        dead_letter,
        drain: std::time::Duration::from_millis(config.replay.drain_timeout_ms),
        streams: config.streams().topics(),
        files: match config.sink.kind {
            crate::replay::SinkKind::Kafka => None,
            crate::replay::SinkKind::Files => Some(crate::replay::files::FilesSink {
                writer: config
                    .archive
                    .writer_options()
                    .map_err(|e| ServeError::Config(crate::config::ConfigError::Invalid(e)))?,
                max_batch: config.archive.commit_records,
            }),
        },
        routes: Default::default(),
    };
    let (replayer_alive, guard) = crate::systemd::Alive::pair();
    let nice = config.replay.nice;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    // Replay runs on its own thread and runtime, not on the HTTP workers: a
    // burst of produces (decode, headers, librdkafka's enqueue) then never
    // holds a worker that a request waiting for its 202 needs, and the
    // kernel, not tokio's cooperative scheduling, arbitrates between them.
    // Replay only moves the committed offset over confirmed records, so
    // running it later (niced, or starved under full load) delays delivery
    // and never loses or duplicates anything beyond what a kill can.
    std::thread::Builder::new()
        .name("sluice-replay".into())
        .spawn(move || {
            // Dropped when this thread ends, panics included: the watchdog
            // then sees the replayer gone.
            let _guard = guard;
            lower_priority(nice);
            // Threads started from here (librdkafka's, the blocking pool's)
            // inherit this thread's nice value.
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name("sluice-replay-io")
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the replay runtime; replay not started");
                    return;
                }
            };
            runtime.block_on(replayer.run(replay_stop_rx));
            let _ = done_tx.send(());
        })
        .map_err(ServeError::Http)?;
    let replay_task = tokio::spawn(async move {
        if done_rx.await.is_err() {
            // The thread ended without finishing `run`: it panicked (the
            // panic was logged) or could not start its runtime.
            panic!("the replay thread ended abnormally");
        }
    });
    Ok((replay_stop, replayer_alive, replay_task))
}

/// Lowers the calling thread's priority by `nice` steps below the one it
/// inherited (ingest's; Linux keeps the nice value per thread), at most to
/// 19. Raising a nice value needs no privilege; failing to is logged and
/// replay runs at ingest's priority.
fn lower_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    let tid = rustix::thread::gettid();
    let inherited = rustix::process::getpriority_process(Some(tid)).unwrap_or(0);
    let nice = (inherited + nice).min(19);
    match rustix::process::setpriority_process(Some(tid), nice) {
        Ok(()) => tracing::debug!(nice, "replay thread priority lowered"),
        Err(e) => {
            tracing::warn!(nice, error = %e, "cannot lower the replay thread's priority; replay runs at ingest's")
        }
    }
}

/// Pings systemd's watchdog while the WAL writer and the replayer live and
/// the WAL has not failed.
fn spawn_watchdog(
    wal_for_dog: Arc<Wal>,
    replayer_alive: crate::systemd::Alive,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(crate::systemd::watchdog(move || {
        if !wal_for_dog.writer_alive() {
            Some("WAL writer")
        } else if wal_for_dog.failure().is_some() {
            Some("WAL (failed)")
        } else if !replayer_alive.get() {
            Some("replayer")
        } else {
            None
        }
    }))
}

/// What is still running when the HTTP server has stopped.
struct Running {
    reloads: tokio::task::JoinHandle<()>,
    replay_stop: tokio::sync::watch::Sender<bool>,
    watchdog: tokio::task::JoinHandle<()>,
    replay_task: tokio::task::JoinHandle<()>,
    dev_broker: Option<DevBroker>,
    state: Arc<AppState>,
    wal: Arc<Wal>,
}

/// Stops what `run` started, in order.
async fn shut_down(r: Running) -> Result<Exit, ServeError> {
    let Running {
        reloads,
        replay_stop,
        watchdog,
        replay_task,
        dev_broker,
        state,
        wal,
    } = r;
    reloads.abort();
    // Every handler has finished: each accepted request was fsynced before
    // its 202. Then the replayer drains up to its deadline and flushes the
    // committed offset; what did not drain stays in the WAL.
    let _ = replay_stop.send(true);
    watchdog.abort();
    if let Err(e) = replay_task.await {
        tracing::error!(error = %e, "replayer task failed");
    }
    drop(dev_broker);
    // Dropping the last WAL handle lets the writer finish and exit.
    let failed = wal.failure().is_some();
    drop(state);
    drop(wal);
    tracing::info!("sluice stopped");
    Ok(if failed { Exit::WalFailed } else { Exit::Clean })
}

/// Keeps credentials current: on SIGHUP reloads the keys file and the TLS
/// certificate; on a timer reloads the keys file if it changed, and lets the
/// rate limiter forget idle buckets. A failed reload keeps what was loaded.
async fn reload_credentials(
    state: Arc<AppState>,
    mut hup: Option<tokio::signal::unix::Signal>,
    tls: Option<Arc<crate::http::tls::Tls>>,
    every: std::time::Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let hangup = tokio::select! {
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => None } } => true,
            _ = tick.tick() => false,
        };
        if hangup {
            tracing::info!("SIGHUP: reloading API keys and TLS certificate");
            if let Some(t) = &tls {
                match t.reload() {
                    Ok(()) => tracing::info!("TLS certificate reloaded"),
                    Err(e) => {
                        tracing::error!(error = %e, "TLS reload failed; keeping the previous certificate")
                    }
                }
            }
        }
        state.rates.housekeeping();
        let Some(keys) = &state.keys else { continue };
        let outcome = if hangup {
            Some(keys.reload())
        } else {
            keys.reload_if_changed()
        };
        let m = &state.metrics;
        match outcome {
            None => {}
            Some(Ok(n)) => {
                m.auth_reloads.with_label_values(&["ok"]).inc();
                m.auth_keys.set(n as i64);
                tracing::info!(keys = n, "API keys reloaded");
            }
            Some(Err(e)) => {
                m.auth_reloads.with_label_values(&["error"]).inc();
                tracing::error!(error = %e, "API keys reload failed; the previous keys stay in force");
            }
        }
    }
}
