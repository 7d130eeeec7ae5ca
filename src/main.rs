// mimalloc instead of glibc malloc: the ingest path allocates and frees many
// small objects across threads (parsed JSON values, records, response
// bodies), and glibc's arena locking and consolidation were ~28% of the
// daemon's CPU in a batch-ingest profile. See docs/design.md, "Allocator".
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    sluice::cli::main()
}
