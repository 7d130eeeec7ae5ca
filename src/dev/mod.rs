//! Development tools, not part of the pipeline: the embedded broker of
//! `sluice serve --dev` and the reader behind `sluice consume`.

pub mod consume;
pub mod dev_broker;
