//! The `[auth]` and `[rates]` sections.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::tenant::TenantId;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct AuthConfig {
    /// The API keys file (see docs/security.md). Empty disables
    /// authentication: any client may write any tenant, which is only safe on
    /// a trusted network. Default empty.
    pub keys_file: PathBuf,
    /// How often the keys file is checked for changes, in milliseconds; a
    /// SIGHUP reloads at once. Default 2000.
    pub reload_interval_ms: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            keys_file: PathBuf::new(),
            reload_interval_ms: 2000,
        }
    }
}

/// Token-bucket rate limits. A rate of 0 means unlimited; a burst of 0 means
/// one second's worth of the rate. Over a limit: 429 with `Retry-After`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct RatesConfig {
    /// Requests per second per API key. Default 0.
    pub key_requests_per_sec: u32,
    /// Default 0.
    pub key_requests_burst: u32,
    /// Events per second per API key. Default 0.
    pub key_events_per_sec: u32,
    /// Default 0.
    pub key_events_burst: u32,
    /// Requests per second per tenant (a request counts once for each tenant
    /// it writes). Default 0.
    pub tenant_requests_per_sec: u32,
    /// Default 0.
    pub tenant_requests_burst: u32,
    /// Events per second per tenant. Default 0.
    pub tenant_events_per_sec: u32,
    /// Keep it at or above `limits.max-events-per-request`, or the largest
    /// batches can never pass (they get 413). Default 0.
    pub tenant_events_burst: u32,
    /// Distinct tenants that get their own label in per-tenant metrics; the
    /// rest are counted as `other`. Default 0 (then 100).
    pub tenant_metrics_cap: usize,
    /// Per-tenant overrides, `[rates.tenant.<name>]` with `requests-per-sec`,
    /// `requests-burst`, `events-per-sec`, `events-burst`; unset keys keep
    /// the global value. Default none.
    pub tenant: std::collections::BTreeMap<String, TenantRates>,
}

impl RatesConfig {
    pub fn tenant_metrics_cap(&self) -> usize {
        if self.tenant_metrics_cap == 0 {
            100
        } else {
            self.tenant_metrics_cap
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct TenantRates {
    pub requests_per_sec: Option<u32>,
    pub requests_burst: Option<u32>,
    pub events_per_sec: Option<u32>,
    pub events_burst: Option<u32>,
}

impl AuthConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.reload_interval_ms == 0 {
            return Err("auth.reload-interval-ms must be positive".into());
        }
        Ok(())
    }
}

impl RatesConfig {
    /// Refuses a tenant override that names no valid tenant; warns when an
    /// events burst is below the largest batch (such batches get 413).
    pub fn validate(&self, max_events_per_request: usize) -> Result<(), String> {
        let rt = self;
        let batch = max_events_per_request as u64;
        let burst = |rate: u32, burst: u32| if burst == 0 { rate } else { burst } as u64;
        for (name, rate, b) in [
            (
                "rates.tenant-events-burst",
                rt.tenant_events_per_sec,
                rt.tenant_events_burst,
            ),
            (
                "rates.key-events-burst",
                rt.key_events_per_sec,
                rt.key_events_burst,
            ),
        ] {
            if rate > 0 && burst(rate, b) < batch {
                tracing::warn!(
                    "{name} ({}) is below limits.max-events-per-request ({batch}): larger batches will get 413",
                    burst(rate, b)
                );
            }
        }
        if let Some(bad_tenant) = rt.tenant.keys().find(|t| !TenantId::is_valid(t)) {
            return Err(format!(
                "rates.tenant.{bad_tenant:?} is not a valid tenant id ([A-Za-z0-9._-]{{1,64}})"
            ));
        }
        Ok(())
    }
}
