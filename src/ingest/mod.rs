//! From request body bytes to WAL payloads: parse by format, then validate and
//! normalize each event alone. No HTTP here, so the fuzz target and the
//! benchmarks drive exactly this.

pub mod event;
pub mod parse;

use chrono::{DateTime, Utc};
use serde::Serialize;

pub use event::{EventError, NormalizedEvent, Normalizer};
pub use parse::{BodyError, BodyFormat};

use crate::config::Limits;

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
        self.accepted.is_empty()
            && !self.rejected.is_empty()
            && self.rejected.iter().all(|r| r.kind == "too_large")
    }
}

pub fn prepare(
    format: BodyFormat,
    body: &[u8],
    limits: &Limits,
    normalizer: &Normalizer,
    received_at: DateTime<Utc>,
) -> Result<Batch, BodyError> {
    let candidates = parse::parse_body(format, body, limits)?;
    let mut batch = Batch {
        accepted: Vec::with_capacity(candidates.len()),
        rejected: Vec::new(),
    };
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
                });
                continue;
            }
        };
        let id = Normalizer::claimed_id(&value);
        match normalizer.normalize(value, received_at) {
            Ok(e) => batch.accepted.push(e),
            Err(e) => batch.rejected.push(Rejection {
                index,
                line: c.line,
                id,
                error: e.to_string(),
                kind: e.kind(),
            }),
        }
    }
    Ok(batch)
}
