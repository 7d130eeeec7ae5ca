//! Who may write what, and how fast: API keys bound to tenants (`keys`) and
//! token-bucket rate limits per key and per tenant (`rates`).
//!
//! The ingest path asks three questions, cheapest first, and none of them
//! touches the WAL: is the key known (401), may it write this event's tenant
//! (403, per event), and is there budget left (429, per request).

pub mod config;
pub mod keys;
pub mod rates;

use std::sync::Arc;

pub use keys::{KeyEntry, KeyStore, KeysError};
pub use rates::{RateDecision, Rates};

/// The tenants a request may write, decided by its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantScope {
    /// Auth disabled, or a key granted `"*"`: any tenant, or none.
    Any,
    /// Only these tenants, matched exactly (ASCII, case-sensitive). An event
    /// without a `tenant_id` gets the tenant filled in when there is exactly
    /// one, and is refused otherwise.
    Only(Arc<[String]>),
}

/// Why an event's tenant was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantDenied {
    /// The event names a tenant the key may not write.
    NotAllowed(String),
    /// The event names no tenant and the key is bound to several.
    Unnamed,
}

impl std::fmt::Display for TenantDenied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // The tenant is the client's own input, echoed back to it only.
            TenantDenied::NotAllowed(t) => write!(f, "this key may not write tenant_id {t:?}"),
            TenantDenied::Unnamed => {
                f.write_str("tenant_id is required: this key may write several tenants")
            }
        }
    }
}

impl TenantScope {
    /// The tenant to fill in for an event that names none.
    pub fn implied(&self) -> Option<&str> {
        match self {
            TenantScope::Only(t) if t.len() == 1 => Some(&t[0]),
            _ => None,
        }
    }

    /// Checks an event's tenant (after any fill-in).
    pub fn check(&self, tenant: Option<&str>) -> Result<(), TenantDenied> {
        match (self, tenant) {
            (TenantScope::Any, _) => Ok(()),
            (TenantScope::Only(allowed), Some(t)) => {
                if allowed.iter().any(|a| a == t) {
                    Ok(())
                } else {
                    Err(TenantDenied::NotAllowed(t.to_string()))
                }
            }
            (TenantScope::Only(_), None) => Err(TenantDenied::Unnamed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_matches_exactly_and_fills_only_a_single_tenant() {
        let one = TenantScope::Only(Arc::from(vec!["acme".to_string()]));
        assert_eq!(one.implied(), Some("acme"));
        assert!(one.check(Some("acme")).is_ok());
        for spoof in ["ACME", "Acme", "acme ", "globex", "acme.", ""] {
            assert_eq!(
                one.check(Some(spoof)),
                Err(TenantDenied::NotAllowed(spoof.to_string())),
                "{spoof:?}"
            );
        }
        let two = TenantScope::Only(Arc::from(vec!["a".to_string(), "b".to_string()]));
        assert_eq!(two.implied(), None);
        assert_eq!(two.check(None), Err(TenantDenied::Unnamed));
        assert!(two.check(Some("b")).is_ok());
        assert!(TenantScope::Any.check(None).is_ok());
        assert!(TenantScope::Any.check(Some("x")).is_ok());
    }
}
