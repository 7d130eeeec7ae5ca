//! `powercut-fs`: a FUSE passthrough filesystem that forgets, on command,
//! what was not fsynced. See README.md for the model and the harness commands.

mod control;
mod fs;
mod model;
mod sys;
mod undo;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use fuser::{Config, MountOption, Session, SessionACL};

const USAGE: &str = "usage:
  powercut-fs mount BACKING MOUNTPOINT [--control SOCKET]
      serve BACKING at MOUNTPOINT until unmounted or sent SIGTERM/SIGINT;
      SOCKET defaults to BACKING/.powercut-fs/control.sock
  powercut-fs cut SOCKET [--tear SEED]   drop (or tear) what is not durable
  powercut-fs sync SOCKET                make everything durable
  powercut-fs status SOCKET              print counters";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["mount", backing, mountpoint] => mount(Path::new(backing), Path::new(mountpoint), None),
        ["mount", backing, mountpoint, "--control", socket] => mount(
            Path::new(backing),
            Path::new(mountpoint),
            Some(Path::new(socket)),
        ),
        ["cut", socket] => command(socket, "cut".to_string()),
        ["cut", socket, "--tear", seed] => match seed.parse::<u64>() {
            Ok(seed) => command(socket, format!("cut tear {seed}")),
            Err(_) => Err(format!("--tear wants a number, not {seed:?}")),
        },
        ["sync", socket] => command(socket, "sync".to_string()),
        ["status", socket] => command(socket, "status".to_string()),
        ["--help"] | ["-h"] | ["help"] => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("powercut-fs: {e}");
            ExitCode::FAILURE
        }
    }
}

fn command(socket: &str, line: String) -> Result<(), String> {
    let answer = control::send(Path::new(socket), &line).map_err(|e| format!("{socket}: {e}"))?;
    println!("{answer}");
    if answer.starts_with("ok") {
        Ok(())
    } else {
        Err(format!("{line}: {answer}"))
    }
}

fn canonical(p: &Path) -> Result<PathBuf, String> {
    p.canonicalize()
        .map_err(|e| format!("{}: {e}", p.display()))
}

fn mount(backing: &Path, mountpoint: &Path, socket: Option<&Path>) -> Result<(), String> {
    let backing = canonical(backing)?;
    let mountpoint = canonical(mountpoint)?;
    if mountpoint.starts_with(&backing) || backing.starts_with(&mountpoint) {
        return Err("the backing directory and the mount point must not contain each other".into());
    }
    // Modes come from the callers, already masked by their umask.
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(0) };
    let model = model::Model::load(&backing).map_err(|e| format!("{}: {e}", backing.display()))?;
    let model = Arc::new(Mutex::new(model));
    let socket = socket.map_or_else(
        || backing.join(model::META).join("control.sock"),
        Path::to_path_buf,
    );

    // Block the stop signals before any thread starts, so that only the
    // waiting thread below receives them.
    let signals = sys::block_signals(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP]);

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("powercut-fs".into()),
        MountOption::Subtype("powercut".into()),
        MountOption::DefaultPermissions,
    ];
    config.acl = SessionACL::All;
    let mut session = Session::new(fs::PowercutFs::new(model.clone()), &mountpoint, &config)
        .map_err(|e| format!("mount {}: {e}", mountpoint.display()))?;

    // The socket answers only once the mount is live: a harness waits for
    // `powercut-fs status SOCKET` to succeed.
    let _ = std::fs::remove_file(&socket);
    let listener = std::os::unix::net::UnixListener::bind(&socket)
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    std::thread::spawn(move || control::serve(listener, model));

    let mut unmounter = session.unmount_callable();
    let target = mountpoint.clone();
    std::thread::spawn(move || {
        let sig = sys::wait_signal(&signals);
        eprintln!("powercut-fs: signal {sig}, unmounting {}", target.display());
        if let Err(e) = unmounter.unmount() {
            eprintln!("powercut-fs: unmount: {e}; detaching");
            if let Err(e) = sys::detach(&target) {
                eprintln!("powercut-fs: detach: {}", model::to_io(e));
            }
        }
    });
    eprintln!(
        "powercut-fs: {} mounted at {}, control socket {}",
        backing.display(),
        mountpoint.display(),
        socket.display()
    );
    let run = session.run();
    let _ = std::fs::remove_file(&socket);
    run.map_err(|e| format!("session: {e}"))
}
