//! The control channel: a unix socket that takes one command line per
//! connection and answers one line, `ok ...` or `error ...`.
//!
//! | command          | effect                                               |
//! |------------------|------------------------------------------------------|
//! | `cut`            | power cut: drop everything not durable               |
//! | `cut tear SEED`  | torn cut: keep a seeded random subset of the pages   |
//! | `sync`           | make everything durable (a clean shutdown)           |
//! | `status`         | counters: cuts, dirty files and directories, ...     |

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::fs::lock;
use crate::model::Model;

/// Answers one command.
pub fn handle(model: &Mutex<Model>, line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let tear = match words.as_slice() {
        ["cut"] => None,
        ["cut", "tear", seed] => match seed.parse::<u64>() {
            Ok(seed) => Some(seed),
            Err(_) => return format!("error bad seed {seed:?}"),
        },
        ["sync"] => {
            let mut m = lock(model);
            m.sync_all();
            return format!("ok {}", m.status());
        }
        ["status"] => return format!("ok {}", lock(model).status()),
        _ => return format!("error unknown command {line:?} (cut, cut tear SEED, sync, status)"),
    };
    let mut m = lock(model);
    match m.cut(tear) {
        Ok(r) => format!(
            "ok files_reverted={} pages_dropped={} pages_kept={} dirs_reverted={} handles_closed={}",
            r.files_reverted, r.pages_dropped, r.pages_kept, r.dirs_reverted, r.handles_closed
        ),
        // A failed cut leaves the backing directory half rewritten: the mount
        // cannot be trusted any more, and the harness must stop.
        Err(e) => format!("error cut failed, the mount is unusable now: {e}"),
    }
}

/// Serves the control socket until the process ends.
pub fn serve(listener: UnixListener, model: Arc<Mutex<Model>>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let mut line = String::new();
        let mut reader = BufReader::new(&stream);
        if reader.read_line(&mut line).is_err() {
            continue;
        }
        let answer = handle(&model, line.trim());
        let _ = (&stream).write_all(format!("{answer}\n").as_bytes());
    }
}

/// Sends one command and returns the answer line.
pub fn send(socket: &Path, command: &str) -> std::io::Result<String> {
    let mut stream = UnixStream::connect(socket)?;
    stream.write_all(format!("{command}\n").as_bytes())?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer)?;
    Ok(answer.trim_end().to_string())
}
