//! From request body bytes to WAL payloads: parse by format, then validate and
//! normalize each event alone. No HTTP here, so the fuzz target and the
//! benchmarks drive exactly this.

pub mod config;
pub mod decode;
pub mod event;
pub mod otlp;
pub mod parse;
mod raw;

use std::sync::atomic::AtomicU64;

use chrono::{DateTime, Utc};
use serde::Serialize;

pub use event::{
    EventError, NormalizedEvent, Normalizer, ReceivedAt, HEADER_ID, HEADER_RECEIVED_AT,
    HEADER_TENANT,
};
pub use parse::{BodyError, BodyFormat};

use crate::auth::{TenantDenied, TenantScope};
use config::Limits;

/// One rejected event, as reported to the client.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Rejection {
    /// 0-based position of the event in the request.
    pub index: usize,
    /// 1-based line in the body (NDJSON, CSV).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// The event's own id, when it carried a string one.
    pub id: Option<String>,
    pub error: String,
    /// Stable label, for metrics.
    #[serde(skip)]
    pub kind: &'static str,
    /// The tenant a forbidden event named, for the per-tenant metric.
    #[serde(skip)]
    pub tenant: Option<String>,
}

/// A request's events after validation, in request order.
#[derive(Debug)]
pub struct Batch {
    pub accepted: Vec<NormalizedEvent>,
    pub rejected: Vec<Rejection>,
}

impl Batch {
    /// True when nothing was accepted and every rejection was for size: the
    /// request deserves 413 rather than 400.
    pub fn all_too_large(&self) -> bool {
        self.all_rejected_for("too_large")
    }

    /// True when nothing was accepted and every rejection was a tenant the
    /// key may not write: the request deserves 403.
    pub fn all_forbidden(&self) -> bool {
        self.all_rejected_for("forbidden")
    }

    fn all_rejected_for(&self, kind: &str) -> bool {
        self.accepted.is_empty()
            && !self.rejected.is_empty()
            && self.rejected.iter().all(|r| r.kind == kind)
    }

    /// Each distinct tenant among the accepted events with its event count,
    /// in name order; events without a tenant are not counted. A map, not a
    /// scan: a batch of 10,000 distinct tenants must not cost 10,000².
    pub fn tenant_counts(&self) -> Vec<(String, u32)> {
        let mut counts = std::collections::BTreeMap::<&str, u32>::new();
        for t in self.accepted.iter().filter_map(|e| e.tenant.as_deref()) {
            *counts.entry(t).or_default() += 1;
        }
        counts
            .into_iter()
            .map(|(t, n)| (t.to_string(), n))
            .collect()
    }
}

pub fn prepare(
    format: BodyFormat,
    body: &[u8],
    limits: &Limits,
    normalizer: &Normalizer,
    received_at: DateTime<Utc>,
    scope: &TenantScope,
) -> Result<Batch, BodyError> {
    let candidates = parse::parse_body(format, body, limits)?;
    let mut batch = Batch {
        accepted: Vec::with_capacity(candidates.len()),
        rejected: Vec::new(),
    };
    let received_at = event::ReceivedAt::new(received_at);
    for (index, c) in candidates.into_iter().enumerate() {
        let value = match c.value {
            Ok(v) => v,
            Err(error) => {
                batch.rejected.push(Rejection {
                    index,
                    line: c.line,
                    id: None,
                    error,
                    kind: "malformed",
                    tenant: None,
                });
                continue;
            }
        };
        match normalizer.normalize_at(value.get(), &received_at, scope) {
            Ok(e) => batch.accepted.push(e),
            Err((e, id)) => batch.rejected.push(Rejection {
                index,
                line: c.line,
                id,
                error: e.to_string(),
                kind: e.kind(),
                tenant: match &e {
                    EventError::Forbidden(TenantDenied::NotAllowed(t)) => Some(t.clone()),
                    EventError::StreamForbidden { tenant, .. } => tenant.clone(),
                    _ => None,
                },
            }),
        }
    }
    Ok(batch)
}

/// Monotonic ingest counters.
#[derive(Debug, Default)]
pub struct IngestCounters {
    pub requests: AtomicU64,
    pub events_accepted: AtomicU64,
    pub events_rejected: AtomicU64,
    pub requests_refused: AtomicU64,
    /// Open HTTP connections (a gauge).
    pub connections_open: AtomicU64,
    /// Connections closed at once because `http.max-connections` were open.
    pub connections_refused: AtomicU64,
    /// Requests answered 503 because the in-flight byte budget was spent.
    pub requests_shed: AtomicU64,
}
