pub mod offsets;
pub mod wal;
