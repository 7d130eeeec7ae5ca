//! Reading the log forward from any sequence number, from the files. The
//! reader never returns a record at or past the durable frontier, checks
//! every frame's checksum, and turns damage into exact [`Gap`]s so that the
//! replayer can count the loss and move on instead of wedging.

use std::sync::Arc;

use tokio::sync::watch;

use super::format;
use super::record::Record;
use super::segment::{FrameCursor, Step};
use super::{already_quarantined, lock, quarantine_copy, Durable, Shared, WalError};

/// Why a range of sequence numbers cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GapReason {
    /// No segment holds these records (deleted or never synced).
    Missing,
    /// A frame failed its checksum or broke sequence contiguity; the rest of
    /// the segment from there is unreadable.
    Corrupt,
    /// The segment's header is unreadable.
    BadHeader,
    /// The frame is intact but its payload does not decode as a record.
    Undecodable,
}

impl std::fmt::Display for GapReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GapReason::Missing => "missing",
            GapReason::Corrupt => "corrupt",
            GapReason::BadHeader => "bad header",
            GapReason::Undecodable => "undecodable",
        })
    }
}

/// An inclusive range of lost sequence numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Gap {
    pub first: u64,
    pub last: u64,
    pub reason: GapReason,
}

impl Gap {
    pub fn len(&self) -> u64 {
        self.last - self.first + 1
    }
    pub fn is_empty(&self) -> bool {
        false
    }
}

#[derive(Debug)]
pub enum ReadItem {
    Record {
        seq: u64,
        record: Record,
        /// Bytes the frame occupies on disk.
        disk_bytes: u64,
    },
    /// These sequence numbers are lost; the reader continues after them.
    Gap(Gap),
}

pub struct WalReader {
    shared: Arc<Shared>,
    durable: watch::Receiver<Durable>,
    next: u64,
    /// The segment being read, by first sequence number.
    cursor: Option<(u64, FrameCursor)>,
}

impl WalReader {
    pub(super) fn new(shared: Arc<Shared>, from_seq: u64) -> Self {
        let durable = shared.durable.subscribe();
        WalReader {
            shared,
            durable,
            next: from_seq.max(1),
            cursor: None,
        }
    }

    /// The sequence number the next record will have.
    pub fn next_seq(&self) -> u64 {
        self.next
    }

    /// Waits for the next durable record or gap.
    pub async fn next(&mut self) -> Result<ReadItem, WalError> {
        loop {
            if let Some(item) = self.try_next()? {
                return Ok(item);
            }
            // The sender lives in `Shared`, which this reader keeps alive, so
            // this only returns when the frontier moves.
            let _ = self.durable.changed().await;
        }
    }

    /// The next durable record or gap, or `None` when caught up.
    pub fn try_next(&mut self) -> Result<Option<ReadItem>, WalError> {
        let durable = *self.durable.borrow_and_update();
        loop {
            if self.next >= durable.next_seq {
                return Ok(None);
            }
            let (seg_first, cursor) = match &mut self.cursor {
                Some((first, cursor)) => (*first, cursor),
                None => match self.open_segment(&durable)? {
                    Some(gap) => return Ok(Some(gap)),
                    None => continue,
                },
            };
            match cursor.next_frame().map_err(WalError::io)? {
                Step::Frame { frame, .. } if frame.seq < self.next => continue,
                Step::Frame { frame, offset } if frame.seq > self.next => {
                    // Frames are contiguous by construction; a jump is damage.
                    let found = frame.seq;
                    cursor.seek(offset);
                    return Ok(Some(self.gap(found - 1, GapReason::Corrupt)));
                }
                Step::Frame { frame, .. } => {
                    let disk_bytes = frame.disk_len() as u64;
                    return Ok(Some(match Record::decode(frame.payload) {
                        Ok(record) => {
                            self.next += 1;
                            ReadItem::Record {
                                seq: frame.seq,
                                record,
                                disk_bytes,
                            }
                        }
                        Err(_) => self.gap(self.next, GapReason::Undecodable),
                    }));
                }
                Step::End { offset, error } => {
                    let successor = {
                        let segs = lock(&self.shared.segments);
                        segs.range(seg_first + 1..).next().map(|(&f, _)| f)
                    };
                    if let Some(successor) = successor {
                        // A sealed segment ended. Its records run to
                        // `successor - 1`; whatever we did not see is lost.
                        self.cursor = None;
                        if self.next >= successor {
                            continue;
                        }
                        let cause = if error.is_some() {
                            self.quarantine_segment(seg_first, offset);
                            GapReason::Corrupt
                        } else {
                            GapReason::Missing
                        };
                        return Ok(Some(self.gap(successor - 1, cause)));
                    }
                    // The active segment ends below the durable frontier:
                    // damage inside bytes that were fsynced. Skip to the
                    // durable end so that replay goes on.
                    self.quarantine_segment(seg_first, offset);
                    if durable.active_first == seg_first {
                        if let Some((_, c)) = &mut self.cursor {
                            c.seek(durable.active_len);
                        }
                    } else {
                        self.cursor = None;
                    }
                    return Ok(Some(self.gap(durable.next_seq - 1, GapReason::Corrupt)));
                }
            }
        }
    }

    /// Positions the cursor on the segment holding `next`. Returns a gap when
    /// `next` lies in no readable segment.
    fn open_segment(&mut self, durable: &Durable) -> Result<Option<ReadItem>, WalError> {
        let (holder, successor) = {
            let segs = lock(&self.shared.segments);
            match segs.range(..=self.next).next_back() {
                Some((&first, _)) => (Some(first), segs.range(first + 1..).next().map(|(&f, _)| f)),
                None => (None, segs.keys().next().copied()),
            }
        };
        let Some(first) = holder else {
            // Below the oldest segment.
            return Ok(successor.map(|s| self.gap(s - 1, GapReason::Missing)));
        };
        let end = successor.unwrap_or(durable.next_seq) - 1;
        let file = match self.shared.fs.open(&self.shared.segment_path(first)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Some(self.gap(end, GapReason::Missing)));
            }
            Err(e) => return Err(WalError::io(e)),
        };
        match FrameCursor::open(file).map_err(WalError::io)? {
            Ok((_, cursor)) => {
                self.cursor = Some((first, cursor));
                Ok(None)
            }
            Err(_) => {
                self.quarantine_segment(first, 0);
                Ok(Some(self.gap(end, GapReason::BadHeader)))
            }
        }
    }

    /// Reports `next ..= last` as lost and moves past it.
    fn gap(&mut self, last: u64, cause: GapReason) -> ReadItem {
        let gap = Gap {
            first: self.next,
            last: last.max(self.next),
            reason: cause,
        };
        self.next = gap.last + 1;
        self.shared.report_loss(&gap);
        ReadItem::Gap(gap)
    }

    /// Keeps a copy of a damaged segment, once per process.
    fn quarantine_segment(&self, first: u64, bad_offset: u64) {
        let name = format!("{}.corrupt-{bad_offset}", format::segment_name(first));
        if already_quarantined(
            self.shared.fs.as_ref(),
            &self.shared.cfg.quarantine_dir,
            &name,
        ) {
            return;
        }
        let result = self
            .shared
            .fs
            .open(&self.shared.segment_path(first))
            .and_then(|src| {
                let len = src.len()?;
                quarantine_copy(
                    self.shared.fs.as_ref(),
                    &self.shared.cfg.quarantine_dir,
                    &self.shared.counters,
                    src.as_ref(),
                    (0, len),
                    &name,
                )
            });
        if let Err(e) = result {
            tracing::error!(file = %name, error = %e, "could not copy a damaged segment to quarantine");
        }
    }
}
