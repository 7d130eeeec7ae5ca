//! Sequential 4 KiB writes with an fdatasync every MiB, as a WAL does:
//! `cargo run --release --example seqwrite -- DIR [MIB]` prints MiB/s.
//! Run it once on the mount and once on the backing directory.

use std::fs::OpenOptions;
use std::io::Write;
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("usage: seqwrite DIR [MIB]"));
    let mib: usize = args
        .next()
        .map_or(256, |s| s.parse().expect("MIB is a number"));
    let path = dir.join("seqwrite.bin");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("create");
    let block = [0x5Au8; 4096];
    let start = Instant::now();
    for _ in 0..mib {
        for _ in 0..256 {
            f.write_all(&block).expect("write");
        }
        f.sync_data().expect("fdatasync");
    }
    let secs = start.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path).expect("remove");
    println!(
        "{}: {mib} MiB in {secs:.2} s = {:.1} MiB/s",
        dir.display(),
        mib as f64 / secs
    );
}
