//! `serve`'s part of the idempotency index: rebuild at open (from
//! `DATA_DIR/idempotency.log` and the WAL), checkpoint with
//! every offset commit, and a periodic commit so the checkpoint advances
//! while replay is stalled (a broker outage), keeping the rescan at the next
//! open short.

use std::sync::Arc;
use std::time::Duration;

use crate::http::AppState;
use crate::idempotency;
use crate::replay::offsets::OffsetStore;
use crate::wal::Wal;

/// What can stop the rebuild; `serve` reports it as a start-up failure.
pub(crate) type Error = Box<dyn std::error::Error + Send + Sync>;

/// How often the checkpoint is made durable when replay does not commit.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

pub(crate) async fn start(
    state: &Arc<AppState>,
    wal: &Arc<Wal>,
    offsets: &Arc<OffsetStore>,
    data_dir: &std::path::Path,
) -> Result<(), Error> {
    let (index, wal_, offsets_) = (state.idempotency.clone(), wal.clone(), offsets.clone());
    let log = crate::datadir::idempotency_log(data_dir);
    let report = tokio::task::spawn_blocking(move || -> Result<_, Error> {
        let tree =
            idempotency::tree(offsets_.db()).map_err(crate::replay::offsets::OffsetError::from)?;
        let committed = offsets_.committed()?;
        let report = index
            .rebuild(&log, &tree, &wal_, committed)
            .map_err(|e| format!("idempotency index: {e}"))?;
        // Every commit writes the checkpoint first; the durable frontier is
        // read before the index (see `Index::checkpoint`).
        let durable = wal_.durable();
        offsets_.set_before_flush(Box::new(move |db| {
            let next = durable.borrow().next_seq;
            // With every commit (replay's, and the periodic one below while
            // ingest moves): what the WAL held, for the reuse check at the
            // next start (`offsets::note_durable_through`).
            crate::replay::offsets::note_durable_through(db, next.saturating_sub(1))?;
            // The log is fdatasynced here, before the offset's flush.
            index.checkpoint(next).map_err(sled::Error::Io)
        }));
        Ok(report)
    })
    .await??;
    tracing::info!(
        from_log = report.from_log,
        from_offsets_store = report.from_legacy,
        from_wal = report.from_wal,
        torn_batches = report.torn,
        scanned_records = report.scanned_records,
        scanned_from_seq = report.scanned_from,
        "idempotency keys rebuilt"
    );
    let (offsets, wal) = (offsets.clone(), wal.clone());
    let mut seen = wal.durable().borrow().next_seq;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(CHECKPOINT_EVERY).await;
            let next = wal.durable().borrow().next_seq;
            if next == seen {
                continue;
            }
            seen = next;
            let offsets = offsets.clone();
            // commit(0) never moves the offset; it runs the checkpoint and
            // the flush and fsync.
            match tokio::task::spawn_blocking(move || offsets.commit(0)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "idempotency checkpoint failed; retried"),
                Err(_) => return,
            }
        }
    });
    Ok(())
}
