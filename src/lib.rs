pub mod cli;
#[doc(hidden)]
pub mod fuzzing;
pub mod offsets;
pub mod wal;
