//! Command-line entry points. `main.rs` only calls [`main`].

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::replay::offsets::OffsetStore;
use crate::wal::inspect;
use crate::wal::io::StdFs;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Crash-safe HTTP-to-Kafka ingest daemon"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve(ServeArgs),
    /// Validate a config file (and the SLUICE_* environment): exits 1 with
    /// `file:line: message` for each problem, 0 when it is valid.
    CheckConfig {
        #[arg(long, env = "SLUICE_CONFIG")]
        config: PathBuf,
        /// Also print the effective configuration (file + environment) as TOML.
        #[arg(long)]
        print: bool,
    },
    /// Run a standalone mock Kafka cluster (librdkafka's, real protocol over
    /// TCP, data in memory) that outlives daemon restarts. Prints the
    /// bootstrap address on stdout. SIGUSR1 takes the broker down (an outage,
    /// data kept), SIGUSR2 brings it back; SIGTERM stops it. Each partition
    /// keeps only its last 5 MiB or 100,000 produce batches (older records
    /// disappear as if by retention): use more partitions for larger tests.
    DevBroker {
        /// Topics to create (repeatable).
        #[arg(long = "topic", default_values_t = ["events".to_string(), "events-dlq".to_string()])]
        topics: Vec<String>,
        #[arg(long, default_value_t = 3)]
        partitions: i32,
        /// Also write the bootstrap address to this file.
        #[arg(long)]
        addr_file: Option<PathBuf>,
    },
    /// Print a topic's records as NDJSON (key, headers, partition, offset, value).
    Consume {
        #[arg(long, env = "SLUICE_BROKERS")]
        brokers: String,
        #[arg(long, default_value = "events")]
        topic: String,
        /// Start at the beginning of each partition (default: only new records).
        #[arg(long)]
        from_beginning: bool,
        /// Stop after this many records.
        #[arg(long)]
        max: Option<usize>,
        /// Stop after this many seconds without a new record.
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
        /// Print each record once: drop any record whose `seq` is at or
        /// below the highest seen for its (instance, partition).
        #[arg(long)]
        exactly_once: bool,
    },
    /// Inspect a WAL offline (read-only; safe on a stopped daemon's data dir).
    Wal {
        #[command(subcommand)]
        command: WalCommand,
    },
    /// Archive a topic into hourly NDJSON files with hourly analytics,
    /// exactly once (`[archive]` in the config; brokers and topic from
    /// `[kafka]`). Serves /v1/analytics, /health, /ready, /metrics.
    Archive(ArchiveArgs),
    /// Print an archive's analytics for an hour (or a range) as JSON, the
    /// same document as the archiver's `GET /v1/analytics`.
    Analytics {
        /// The archive directory.
        #[arg(long)]
        dir: PathBuf,
        /// An hour like 2026-11-26T12.
        #[arg(long, conflicts_with_all = ["from", "to"])]
        hour: Option<String>,
        #[arg(long, requires = "to")]
        from: Option<String>,
        #[arg(long, requires = "from")]
        to: Option<String>,
        /// For a non-default layout (`archive.summaries-pattern`).
        #[arg(long, env = "SLUICE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Manage API keys (the file `auth.keys-file` names).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a random key bound to tenants, add its hash to the keys file
    /// (created if missing, replaced atomically), and print the key once on
    /// stdout. The key itself is stored nowhere. A running daemon picks the
    /// entry up within `auth.reload-interval-ms`, or at once on SIGHUP.
    Add {
        /// The keys file.
        #[arg(long)]
        file: PathBuf,
        /// A name for logs and metrics, e.g. the client's service name.
        #[arg(long)]
        name: String,
        /// A tenant the key may write (repeatable); `*` for any tenant.
        #[arg(long = "tenant", required = true)]
        tenants: Vec<String>,
    },
    /// Print the SHA-256 a keys file stores for a key, read from stdin (one
    /// line), so the key never appears in `ps` or shell history.
    Hash,
}

/// Precedence: defaults < config file < `SLUICE_<SECTION>_<KEY>` environment
/// variables < flags.
#[derive(clap::Args)]
struct ServeArgs {
    /// TOML config file (see sluice.example.toml).
    #[arg(long, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:8080.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Kafka bootstrap servers (comma-separated).
    #[arg(long)]
    brokers: Option<String>,
    #[arg(long)]
    topic: Option<String>,
    /// Development mode: no external Kafka needed.
    #[arg(long, env = "SLUICE_DEV")]
    dev: bool,
    /// Write the bound address to this file once listening (useful with
    /// `--listen 127.0.0.1:0`).
    #[arg(long)]
    addr_file: Option<PathBuf>,
    /// Write the admin listener's bound address to this file (useful with
    /// `SLUICE_HTTP_ADMIN_LISTEN=127.0.0.1:0`).
    #[arg(long)]
    admin_addr_file: Option<PathBuf>,
}

/// Precedence as for `serve`: defaults < file < environment < flags.
#[derive(clap::Args)]
struct ArchiveArgs {
    #[arg(long, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    /// The archive directory (`archive.dir`).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Consumer group (`archive.group-id`).
    #[arg(long)]
    group: Option<String>,
    #[arg(long)]
    brokers: Option<String>,
    #[arg(long)]
    topic: Option<String>,
    /// HTTP listener (`archive.listen`).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Write the listener's bound address here once listening.
    #[arg(long)]
    addr_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum WalCommand {
    /// Check every frame of every segment. Exits 1 if acknowledged records
    /// are unreadable, 2 on a usage or I/O error.
    Verify {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Print records as NDJSON on stdout; unreadable ranges go to stderr.
    Dump {
        #[arg(long)]
        data_dir: PathBuf,
        /// First sequence number to print.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Stop after this many records.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Print a JSON summary: segments, sequence range, bytes, committed offset.
    Stats {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Send records again to a broker list and topic (a backup cluster, or
    /// after a consumer-side loss) from the WAL, a quarantined segment copy
    /// or the dead-letter file. Never touches the committed offset. Exits 1
    /// unless every record was confirmed.
    Redrive(crate::redrive::RedriveArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemons set up logging from their config (`log.level`, info by
    // default); a first `init` here would win and hold `sluice archive` at
    // warn, silent at the level its config asks for.
    if !matches!(cli.command, Command::Serve(_) | Command::Archive(_)) {
        init_logging("warn", "text");
    }
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::CheckConfig { config, print } => check_config(&config, print),
        Command::Wal { command } => run_wal(command),
        Command::Keys { command } => run_keys(command),
        Command::Archive(args) => archive(args),
        Command::Analytics {
            dir,
            hour,
            from,
            to,
            config,
        } => analytics(&dir, hour, from, to, config),
        Command::DevBroker {
            topics,
            partitions,
            addr_file,
        } => dev_broker(&topics, partitions, addr_file),
        Command::Consume {
            brokers,
            topic,
            from_beginning,
            max,
            timeout,
            exactly_once,
        } => consume(&brokers, &topic, from_beginning, max, timeout, exactly_once),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// Serves [`router`] on `listener` until `shutdown`, with the ingest
/// port's accept loop and limits. A listener off loopback (only reachable
/// with `archive.allow-non-loopback`, see `ArchiveConfig::validate`) is
/// announced at warn on every start.
async fn serve_archive_listener(
    listener: tokio::net::TcpListener,
    status: std::sync::Arc<crate::archive::http::ArchiveStatus>,
    cfg: &crate::archive::ArchiveConfig,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let addr = listener
        .local_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    if listener.local_addr().is_ok_and(|a| !a.ip().is_loopback()) {
        tracing::warn!(%addr, "ARCHIVE LISTENER ON A NON-LOOPBACK ADDRESS (archive.allow-non-loopback): no keys, no TLS; anyone who reaches this port reads /v1/analytics (the top values of the tracked fields of every tenant) and /metrics (docs/security.md)");
    } else {
        tracing::info!(%addr, max_connections = cfg.max_connections, header_timeout_ms = cfg.header_timeout_ms, "archive: listening");
    }
    let http = crate::http::config::HttpConfig {
        header_timeout_ms: cfg.header_timeout_ms,
        max_connections: cfg.max_connections,
        ..Default::default()
    };
    let counters = status.http.clone();
    crate::http::listener::serve(
        listener,
        crate::archive::http::router(status),
        &http,
        counters,
        None,
        shutdown,
    )
    .await;
}

/// Binds `addr`; an error names the setting and the address ("http.listen
/// 127.0.0.1:8080: Address already in use"), as the admin listener does.
async fn bind_named(
    setting: &str,
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("{setting} {addr}: {e}")))
}

/// Logs go to stderr (journald captures it under systemd). `RUST_LOG` wins
/// over the configured level. Colour codes only on a terminal: journald,
/// files and pipes get plain text.
fn init_logging(level: &str, format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = if format == "json" {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

/// The configuration as `serve`, `archive` and `check-config` all load it:
/// the file (or the defaults without one), the `SLUICE_*` environment on
/// top, then the command's own flags (`flags`), then the one validation
/// ([`crate::config::Config::validate`]). An error is the message to print:
/// `FILE:LINE: message` when the message names a setting found in the file
/// (`FILE: message` otherwise), so `serve` refuses a file exactly as
/// `check-config` does, before it binds or opens anything.
fn load_config(
    path: Option<&Path>,
    flags: impl FnOnce(&mut crate::config::Config),
) -> Result<crate::config::Config, String> {
    let Some(path) = path else {
        let mut config = crate::config::Config::default();
        config
            .apply_env(std::env::vars())
            .map_err(|e| e.to_string())?;
        flags(&mut config);
        config.validate().map_err(|e| e.to_string())?;
        return Ok(config);
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // toml's message names the line and column and quotes it.
    let mut config = crate::config::Config::from_toml(&text)
        .map_err(|message| format!("{}: {message}", path.display()))?;
    let result = config.apply_env(std::env::vars()).and_then(|()| {
        flags(&mut config);
        config.validate()
    });
    result.map_err(|e| {
        let message = e.to_string();
        let line = crate::config::key_in(&message).and_then(|k| crate::config::locate(&text, k));
        match line {
            Some(n) => format!("{}:{n}: {message}", path.display()),
            None => format!("{}: {message}", path.display()),
        }
    })?;
    Ok(config)
}

fn check_config(path: &Path, print: bool) -> CliResult {
    let config = match load_config(Some(path), |_| {}) {
        Ok(c) => c,
        Err(message) => {
            eprintln!("{message}");
            return Ok(ExitCode::from(1));
        }
    };
    // The files `serve` reads at start (the API keys, the TLS certificate
    // and key): a missing or unreadable one is refused here too, not
    // found only when the daemon starts.
    if let Err(e) = crate::server::load_credentials(&config) {
        eprintln!("{}: {e}", path.display());
        return Ok(ExitCode::from(1));
    }
    if let Ok(fit) = config.effective_max_event_bytes() {
        eprintln!("effective limits.max-event-bytes: {fit}");
    }
    // Not an error for `serve`, which has no archive listener.
    if let Err(e) = config.archive.validate_listener() {
        eprintln!("warning: `sluice archive` would refuse this file: {e}");
    }
    if print {
        print!("{}", toml::to_string(&config)?);
    }
    eprintln!("{}: OK", path.display());
    Ok(ExitCode::SUCCESS)
}

/// The committed offset of a stopped daemon, or 0 with a note on stderr.
fn read_committed(data_dir: &Path) -> u64 {
    let dir = crate::datadir::offsets_dir(data_dir);
    if !dir.exists() {
        return 0;
    }
    // A store just closed by its last user (a daemon that is exiting, a
    // test) can hold its file lock a moment longer: retry that briefly.
    let t0 = std::time::Instant::now();
    let opened = loop {
        match OffsetStore::open(&dir).and_then(|s| s.committed()) {
            Err(e)
                if e.to_string().contains("lock")
                    && t0.elapsed() < std::time::Duration::from_secs(2) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            other => break other,
        }
    };
    match opened {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "note: committed offset unavailable ({e}); is the daemon running? assuming 0"
            );
            0
        }
    }
}

type CliResult = Result<ExitCode, Box<dyn std::error::Error>>;

fn dev_broker(topics: &[String], partitions: i32, addr_file: Option<PathBuf>) -> CliResult {
    let broker = crate::dev::dev_broker::DevBroker::start(topics, partitions)?;
    println!("{}", broker.bootstrap_servers());
    std::io::stdout().flush()?;
    if let Some(path) = addr_file {
        std::fs::write(path, broker.bootstrap_servers())?;
    }
    tracing::warn!(
        bootstrap = broker.bootstrap_servers(),
        ?topics,
        partitions,
        "dev broker running; its data lives only in memory"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int), Ok(mut usr1), Ok(mut usr2)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::user_defined1()),
            signal(SignalKind::user_defined2()),
        ) else {
            return std::future::pending().await;
        };
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = usr1.recv() => {
                    tracing::warn!("SIGUSR1: broker down (simulated outage)");
                    broker.set_down(true);
                }
                _ = usr2.recv() => {
                    tracing::warn!("SIGUSR2: broker up");
                    broker.set_down(false);
                }
            }
        }
    });
    drop(broker);
    Ok(ExitCode::SUCCESS)
}

fn consume(
    brokers: &str,
    topic: &str,
    from_beginning: bool,
    max: Option<usize>,
    timeout: f64,
    exactly_once: bool,
) -> CliResult {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut write_err = None;
    let idle = std::time::Duration::from_secs_f64(timeout.max(0.0));
    let mut dedupe = crate::dev::dedupe::Dedupe::default();
    crate::dev::consume::consume(brokers, topic, from_beginning, max, idle, |c| {
        if exactly_once && !dedupe.admit(&c) {
            return;
        }
        if write_err.is_none() {
            let r = serde_json::to_writer(&mut out, &c)
                .map_err(std::io::Error::from)
                .and_then(|()| out.write_all(b"\n"))
                .and_then(|()| out.flush());
            write_err = r.err();
        }
    })?;
    if let Some(e) = write_err {
        return Err(e.into());
    }
    if exactly_once {
        eprintln!(
            "exactly-once: {} repeated records dropped, {} records without instance/seq headers passed through",
            dedupe.dropped, dedupe.unmarked
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn serve(args: ServeArgs) -> CliResult {
    let config = load_config(args.config.as_deref(), |config| {
        if let Some(d) = args.data_dir {
            config.data_dir = d;
        }
        if let Some(l) = args.listen {
            config.http.listen = l;
        }
        if let Some(b) = args.brokers {
            config.kafka.brokers = b;
        }
        if let Some(t) = args.topic {
            config.kafka.topic = t;
        }
        if args.dev {
            config.kafka.brokers.clear();
        }
    })?;
    init_logging(&config.log.level, &config.log.format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Large bodies are parsed on the blocking pool. Tokio's default
        // lets it grow to 512 threads, one per concurrent large request, and
        // each thread keeps its own allocator heap: 64 connections of
        // 1,000-event batches held ~320 MiB RSS in ~64 pool threads. The
        // work is CPU-bound, so threads beyond the cores only add heaps;
        // queued parses wait holding their bodies, which the in-flight byte
        // budget already bounds.
        .max_blocking_threads(blocking_threads())
        .build()?;
    let exit = runtime.block_on(async move {
        let listener = bind_named("http.listen", config.http.listen).await?;
        let admin = crate::http::admin::bind(&config.http).await?;
        // The admin address first: whoever waits for the ingest address
        // (tests, scripts) may then read the admin one without waiting.
        if let (Some(path), Some(a)) = (&args.admin_addr_file, &admin) {
            std::fs::write(path, a.local_addr()?.to_string())?;
        }
        if let Some(path) = &args.addr_file {
            std::fs::write(path, listener.local_addr()?.to_string())?;
        }
        let exit = match crate::server::run(config, listener, admin, shutdown_signal()).await {
            // Storage that cannot be read at start: exit 1, like a storage
            // failure while running, so systemd restarts into recovery.
            Err(crate::server::ServeError::StartupRead(why)) => {
                eprintln!("error: {why}");
                crate::server::Exit::WalFailed
            }
            other => other?,
        };
        Ok::<_, Box<dyn std::error::Error>>(exit)
    })?;
    Ok(match exit {
        crate::server::Exit::Clean => ExitCode::SUCCESS,
        crate::server::Exit::WalFailed => ExitCode::from(1),
    })
}

fn archive(args: ArchiveArgs) -> CliResult {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let config = load_config(args.config.as_deref(), |config| {
        let a = &mut config.archive;
        if let Some(d) = args.dir {
            a.dir = d;
        }
        if let Some(g) = args.group {
            a.group_id = g;
        }
        if let Some(l) = args.listen {
            a.listen = l;
        }
        if let Some(b) = args.brokers {
            config.kafka.brokers = b;
        }
        if let Some(t) = args.topic {
            config.kafka.topic = t;
        }
    })?;
    config.archive.validate_listener()?;
    if config.kafka.brokers.is_empty() {
        return Err("sluice archive needs kafka.brokers (--brokers)".into());
    }
    init_logging(&config.log.level, &config.log.format);
    let a = config.archive.clone();
    tracing::info!(version = env!("CARGO_PKG_VERSION"), group = %a.group_id, topic = %config.kafka.topic,
        brokers = %config.kafka.brokers, dir = %a.dir.display(), listen = %a.listen,
        static_membership = a.static_membership, "archive: starting");
    let (writer, progress) = match crate::archive::Writer::open(a.writer_options()?) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, dir = %a.dir.display(), "archive: cannot open");
            return Err(e.into());
        }
    };
    // After the writer's open, which creates the directory durably.
    let group_instance_id =
        if a.static_membership && !a.librdkafka.contains_key("group.instance.id") {
            match crate::archive::kafka::member_id(&a.dir) {
                Ok(id) => Some(id),
                Err(e) => {
                    tracing::error!(error = %e, "archive: static membership");
                    return Err(e.into());
                }
            }
        } else {
            None
        };
    let status = crate::archive::http::ArchiveStatus::new(writer.analytics(), writer.metrics());
    let stop = Arc::new(AtomicBool::new(false));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let listener = runtime.block_on(bind_named("archive --listen", a.listen))?;
    if let Some(path) = &args.addr_file {
        std::fs::write(path, listener.local_addr()?.to_string())?;
    }
    // Served until the runtime shuts down after `run` returned.
    let served = status.clone();
    let listen_cfg = a.clone();
    runtime.spawn(async move {
        serve_archive_listener(listener, served, &listen_cfg, std::future::pending()).await;
    });
    let flag = stop.clone();
    runtime.spawn(async move {
        shutdown_signal().await;
        flag.store(true, Ordering::Relaxed);
    });
    let mut props: std::collections::BTreeMap<String, String> = config
        .kafka
        .librdkafka
        .iter()
        .filter(|(k, _)| {
            ["security.", "sasl.", "ssl."]
                .iter()
                .any(|p| k.starts_with(p))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    props.extend(a.librdkafka.clone());
    let source = crate::archive::kafka::Source {
        brokers: config.kafka.brokers.clone(),
        topic: config.kafka.topic.clone(),
        group_id: a.group_id.clone(),
        properties: props,
        commit_interval: std::time::Duration::from_millis(a.commit_interval_ms),
        commit_records: a.commit_records,
        retention: (a.retention_days > 0)
            .then(|| std::time::Duration::from_secs(a.retention_days * 86_400)),
        on_reset: a.on_offset_reset,
        group_instance_id,
    };
    let result = crate::archive::kafka::run(writer, progress, source, status, stop);
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            tracing::error!(error = %e, "archive: stopping");
            Ok(ExitCode::from(1))
        }
    }
}

fn analytics(
    dir: &Path,
    hour: Option<String>,
    from: Option<String>,
    to: Option<String>,
    config: Option<PathBuf>,
) -> CliResult {
    let a = match &config {
        Some(path) => crate::config::Config::from_file(path)?.archive,
        None => crate::archive::ArchiveConfig::default(),
    };
    // A mistyped --dir must not print zeros and exit 0 as if the archive
    // had seen no traffic.
    let entries = match std::fs::read_dir(dir) {
        Ok(mut d) => d.next().is_some(),
        Err(e) => {
            eprintln!("error: archive directory {}: {e}", dir.display());
            return Ok(ExitCode::from(2));
        }
    };
    if !entries {
        eprintln!(
            "error: archive directory {} is empty: not an archive written by `sluice archive` or the files sink",
            dir.display()
        );
        return Ok(ExitCode::from(2));
    }
    let layout = crate::archive::Layout::new(&a.logs_pattern, &a.summaries_pattern)?;
    let view = crate::archive::AnalyticsView::offline(dir, layout, a.top_n);
    match crate::archive::http::query(&view, hour.as_deref(), from.as_deref(), to.as_deref())? {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(2))
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT. A second one exits at once, which
/// is safe: everything acknowledged is already in the WAL.
/// Blocking-pool threads: twice the cores (at least 4), so that a slow
/// blocking task (a producer's drop, an offset fsync) never stalls parsing.
fn blocking_threads() -> usize {
    (std::thread::available_parallelism().map_or(2, |n| n.get()) * 2).max(4)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting now; the WAL holds everything acknowledged");
        std::process::exit(130);
    });
}

fn run_keys(command: KeysCommand) -> CliResult {
    use crate::auth::keys;
    match command {
        KeysCommand::Hash => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .map_err(|e| format!("reading the key from stdin: {e}"))?;
            let key = line.trim();
            if key.is_empty() {
                return Err("no key on stdin".into());
            }
            println!("{}", keys::hash_key(key));
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::Add {
            file,
            name,
            tenants,
        } => {
            let existing = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(format!("{}: {e}", file.display()).into()),
            };
            let key = keys::generate_key();
            let text = keys::append_entry(&existing, &name, &keys::hash_key(&key), &tenants);
            // Validate the whole result, as the daemon will read it.
            keys::parse_keys(&text).map_err(|e| format!("{}: {e}", file.display()))?;
            write_atomically(&file, text.as_bytes())
                .map_err(|e| format!("{}: {e}", file.display()))?;
            eprintln!(
                "added key {name:?} for {} to {}; it is shown once, store it now:",
                tenants.join(", "),
                file.display()
            );
            println!("{key}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Write to a temporary file beside `path`, fsync, rename over it, fsync
/// the directory: a crash leaves the old file or the new one, never half.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    crate::storage::sync_file(&f, &tmp)?;
    drop(f);
    // Dying before the rename: the old file (and a `.tmp`); after the
    // directory fsync, the new one survives a power cut.
    crate::storage::rename_durable(&tmp, path)
}

fn run_wal(command: WalCommand) -> CliResult {
    match command {
        WalCommand::Verify { data_dir } => verify(&data_dir),
        WalCommand::Dump {
            data_dir,
            from,
            limit,
        } => dump(&data_dir, from, limit),
        WalCommand::Stats { data_dir } => stats(&data_dir),
        WalCommand::Redrive(args) => crate::redrive::run(args),
    }
}

fn wal_dir(data_dir: &Path) -> Result<PathBuf, String> {
    let dir = crate::datadir::wal_dir(data_dir);
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(format!("{} has no wal/ directory", data_dir.display()))
    }
}

fn verify(data_dir: &Path) -> CliResult {
    let committed = read_committed(data_dir);
    let report = inspect::verify(&StdFs, &wal_dir(data_dir)?, committed)?;
    let mut out = std::io::stdout().lock();
    for s in &report.segments {
        let range = match s.last_seq {
            Some(last) => format!("{}..={last}", s.first_seq),
            None => "empty".into(),
        };
        write!(
            out,
            "{}  {:>10} bytes  {:>8} records  {range}",
            s.name, s.bytes, s.records
        )?;
        if let Some(p) = &s.problem {
            match s.problem_at {
                Some(at) => write!(out, "  PROBLEM at byte {at}")?,
                None => write!(out, "  PROBLEM")?,
            }
            write!(
                out,
                " ({} bytes after the last intact frame): {p}",
                s.trailing_bytes
            )?;
        }
        writeln!(out)?;
    }
    for g in &report.lost {
        writeln!(
            out,
            "LOST {}..={} ({} records, {})",
            g.first,
            g.last,
            g.len(),
            g.reason
        )?;
    }
    if report.torn_tail_bytes > 0 && report.lost.is_empty() {
        writeln!(
            out,
            "torn tail: {} bytes after the last good frame (cut on next start; never acknowledged)",
            report.torn_tail_bytes
        )?;
    }
    let lost: u64 = report.lost.iter().map(|g| g.len()).sum();
    writeln!(
        out,
        "{}: {} segments, {} records, {} bytes, committed offset {}, {} records lost",
        if report.damaged() { "DAMAGED" } else { "OK" },
        report.segments.len(),
        report.records,
        report.bytes,
        report.committed,
        lost
    )?;
    Ok(if report.damaged() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn dump(data_dir: &Path, from: u64, limit: Option<u64>) -> CliResult {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut left = limit.unwrap_or(u64::MAX);
    inspect::for_each_record(
        &StdFs,
        &wal_dir(data_dir)?,
        from,
        |seq, r| {
            if left == 0 {
                return Ok(ControlFlow::Break(()));
            }
            left -= 1;
            let value = inspect::value_json(&r.value);
            let headers: serde_json::Map<String, serde_json::Value> = r
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), inspect::header_json(v)))
                .collect();
            // A struct, not `json!`: that would parse the raw value into a
            // `Value` and print it re-serialized.
            #[derive(serde::Serialize)]
            struct Line<'a> {
                seq: u64,
                stream: &'a str,
                key: Option<std::borrow::Cow<'a, str>>,
                timestamp_ms: i64,
                headers: serde_json::Map<String, serde_json::Value>,
                value: Box<serde_json::value::RawValue>,
            }
            let line = Line {
                seq,
                stream: &r.stream,
                key: r.key.as_deref().map(String::from_utf8_lossy),
                timestamp_ms: r.timestamp_ms,
                headers,
                value,
            };
            serde_json::to_writer(&mut out, &line)?;
            out.write_all(b"\n")?;
            Ok(ControlFlow::Continue(()))
        },
        |g| {
            eprintln!(
                "unreadable {}..={} ({} records, {})",
                g.first,
                g.last,
                g.len(),
                g.reason
            )
        },
    )?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn stats(data_dir: &Path) -> CliResult {
    let committed = read_committed(data_dir);
    let report = inspect::verify(&StdFs, &wal_dir(data_dir)?, committed)?;
    let backlog = report
        .last_seq
        .map_or(0, |last| last.saturating_sub(committed));
    let stats = serde_json::json!({
        "segments": report.segments.len(),
        "first_seq": report.first_seq,
        "last_seq": report.last_seq,
        "records": report.records,
        "bytes": report.bytes,
        "committed": committed,
        "backlog_records": backlog,
        "lost_records": report.lost.iter().map(|g| g.len()).sum::<u64>(),
        "torn_tail_bytes": report.torn_tail_bytes,
    });
    println!("{}", serde_json::to_string_pretty(&stats)?);
    Ok(ExitCode::SUCCESS)
}
