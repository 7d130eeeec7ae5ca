// mimalloc instead of glibc malloc: the ingest path allocates and frees many
// small objects across threads (parsed JSON values, records, response
// bodies), and glibc's arena locking and consolidation were ~28% of the
// daemon's CPU in a batch-ingest profile. See docs/design.md, "Allocator".
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // mimalloc advises transparent huge pages on its arenas; with THP on,
    // every 2 MiB region it touches became resident whole and its 64 KiB
    // purges could not return it: 180 of 215 MiB RSS under 1,000-event
    // batches were huge pages (161 MiB without them, same load). The daemon
    // gains nothing measurable from huge pages, so the process opts out
    // before it allocates much; a kernel without the prctl just keeps THP.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    sluice::cli::main()
}
