pub mod cli;
pub mod offsets;
pub mod wal;
