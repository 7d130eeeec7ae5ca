//! Tenant ids: a leaf type, so that config, auth and ingest can all check
//! one without depending on each other.

/// A tenant id: `[A-Za-z0-9._-]{1,64}`, ASCII only. A look-alike from
/// another script is refused, never folded.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

impl TenantId {
    /// The id if `s` is one, else `None`.
    pub fn parse(s: &str) -> Option<TenantId> {
        Self::is_valid(s).then(|| TenantId(s.to_string()))
    }

    /// Whether `s` is a tenant id (no allocation).
    pub fn is_valid(s: &str) -> bool {
        (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl std::fmt::Display for TenantId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::TenantId;

    #[test]
    fn ascii_names_up_to_64_bytes() {
        assert!(TenantId::parse("acme.prod-1_x").is_some());
        assert!(TenantId::parse("").is_none());
        assert!(TenantId::parse(&"a".repeat(65)).is_none());
        assert!(TenantId::parse(&"a".repeat(64)).is_some());
        // Cyrillic 'а' looks like 'a' and is refused.
        assert!(TenantId::parse("\u{430}cme").is_none());
        assert!(TenantId::parse("a b").is_none());
    }
}
