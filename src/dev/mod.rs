//! Development tools, not part of the pipeline: the embedded broker of
//! `sluice serve --dev`, the reader behind `sluice consume`, and the
//! consumer-side exactly-once rule it applies with `--exactly-once`.

pub mod consume;
pub mod dedupe;
pub mod dev_broker;
