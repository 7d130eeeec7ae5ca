//! The committed offset: every WAL record at or below it has been confirmed by
//! Kafka (or dead-lettered). Stored in sled and flushed before `commit`
//! returns.
//!
//! Why "flush the offset, then delete segments" is safe: GC removes only
//! segments whose last record is at or below an offset that is already on
//! disk. A crash after the flush and before the unlink leaves extra consumed
//! segments, which the next open deletes. A crash before the flush leaves the
//! old offset and every segment above it, so the records are produced again
//! (a duplicate, never a loss). The reverse order could leave an offset
//! pointing past a deleted segment's predecessor, i.e. a hole: Vector's
//! crash-loop of lessons.md item 2.

use std::path::Path;

const KEY: &[u8] = b"committed";

#[derive(Debug, thiserror::Error)]
pub enum OffsetError {
    #[error("offset store: {0}")]
    Sled(#[from] sled::Error),
    #[error("offset store holds a malformed value ({0} bytes, expected 8)")]
    Malformed(usize),
}

pub struct OffsetStore {
    db: sled::Db,
}

impl OffsetStore {
    pub fn open(dir: &Path) -> Result<Self, OffsetError> {
        let db = sled::Config::new().path(dir).open()?;
        let store = OffsetStore { db };
        store.committed()?;
        Ok(store)
    }

    /// The committed offset; 0 when nothing was ever committed (sequence
    /// numbers start at 1).
    pub fn committed(&self) -> Result<u64, OffsetError> {
        match self.db.get(KEY)? {
            None => Ok(0),
            Some(v) => {
                let bytes: [u8; 8] = v
                    .as_ref()
                    .try_into()
                    .map_err(|_| OffsetError::Malformed(v.len()))?;
                Ok(u64::from_be_bytes(bytes))
            }
        }
    }

    /// Raises the committed offset to `seq` and flushes it to disk before
    /// returning. Lower values are ignored: the offset never moves back.
    pub fn commit(&self, seq: u64) -> Result<u64, OffsetError> {
        let mut current = self.committed()?;
        while seq > current {
            let old = (current > 0).then(|| current.to_be_bytes());
            match self
                .db
                .compare_and_swap(KEY, old, Some(&seq.to_be_bytes()))?
            {
                Ok(()) => current = seq,
                Err(_) => current = self.committed()?,
            }
        }
        self.db.flush()?;
        Ok(current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_and_persistent() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = OffsetStore::open(dir.path()).unwrap();
            assert_eq!(s.committed().unwrap(), 0);
            assert_eq!(s.commit(10).unwrap(), 10);
            assert_eq!(s.commit(5).unwrap(), 10, "never moves back");
        }
        let s = OffsetStore::open(dir.path()).unwrap();
        assert_eq!(s.committed().unwrap(), 10);
    }
}
