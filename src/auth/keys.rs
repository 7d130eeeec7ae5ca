//! The API keys file: each entry maps the SHA-256 of a key to the tenants it
//! may write. Only hashes are stored, so a leaked keys file (or a backup of
//! it) does not leak a credential. Keys are random 256-bit tokens made by
//! `sluice keys add`, so a plain SHA-256 is enough: there is nothing to
//! brute-force that a slow password hash would protect.
//!
//! ```toml
//! [[key]]
//! name = "acme-shipper"        # shown in logs and metrics, never the key
//! sha256 = "9f2c…"             # `sluice keys hash` prints it
//! tenants = ["acme"]           # or ["*"] for any tenant
//! ```
//!
//! Reload: `reload()` on SIGHUP and `reload_if_changed()` on a timer. A file
//! that fails to parse leaves the previous keys in force, and says so.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::TenantScope;
use crate::tenant::TenantId;

/// Prefix of generated keys, so a leaked one is recognizable by secret
/// scanners.
pub const KEY_PREFIX: &str = "sluice_";

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read keys file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("keys file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// One key, as loaded. The key itself is never held.
#[derive(Debug)]
pub struct KeyEntry {
    pub name: String,
    hash: [u8; 32],
    pub scope: TenantScope,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    key: Vec<RawKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: String,
    sha256: String,
    tenants: Vec<String>,
}

/// The file's identity and version, to notice edits and replacements.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

pub struct KeyStore {
    path: PathBuf,
    keys: RwLock<Arc<[Arc<KeyEntry>]>>,
    stamp: Mutex<Option<Stamp>>,
}

impl KeyStore {
    /// Loads the keys file; an unreadable or invalid file is an error here,
    /// at startup, where the operator sees it.
    pub fn load(path: &Path) -> Result<KeyStore, KeysError> {
        let st = stamp(path);
        let keys = read_keys(path)?;
        Ok(KeyStore {
            path: path.to_owned(),
            keys: RwLock::new(keys.into()),
            stamp: Mutex::new(st),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.current().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn current(&self) -> Arc<[Arc<KeyEntry>]> {
        match self.keys.read() {
            Ok(k) => k.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The entry for a presented key. Every stored hash is compared, in
    /// constant time, whatever matches: the time taken says nothing about
    /// which entry, if any, was close.
    pub fn authenticate(&self, presented: &str) -> Option<Arc<KeyEntry>> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for entry in self.current().iter() {
            let equal: bool = entry.hash.ct_eq(&digest).into();
            if equal && found.is_none() {
                found = Some(entry.clone());
            }
        }
        found
    }

    /// Re-reads the file. On error the previous keys stay in force.
    pub fn reload(&self) -> Result<usize, KeysError> {
        let st = stamp(&self.path);
        let keys = read_keys(&self.path)?;
        let n = keys.len();
        match self.keys.write() {
            Ok(mut k) => *k = keys.into(),
            Err(poisoned) => *poisoned.into_inner() = keys.into(),
        }
        if let Ok(mut s) = self.stamp.lock() {
            *s = st;
        }
        Ok(n)
    }

    /// Reloads when the file's mtime, size or inode changed since the last
    /// load (editors that write a new file and rename it change the inode).
    /// `None` when nothing changed.
    pub fn reload_if_changed(&self) -> Option<Result<usize, KeysError>> {
        let now = stamp(&self.path);
        {
            let mut last = self.stamp.lock().ok()?;
            if *last == now {
                return None;
            }
            // Remember the attempt even if it fails, so a broken file is
            // reported once, not on every tick.
            *last = now;
        }
        Some(self.reload())
    }
}

fn read_keys(path: &Path) -> Result<Vec<Arc<KeyEntry>>, KeysError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_keys(&text).map_err(|message| KeysError::Invalid {
        path: path.to_owned(),
        message,
    })
}

/// Parses and checks a keys file's text.
pub fn parse_keys(text: &str) -> Result<Vec<Arc<KeyEntry>>, String> {
    let file: KeysFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut out: Vec<Arc<KeyEntry>> = Vec::with_capacity(file.key.len());
    for raw in file.key {
        let name = raw.name.trim().to_string();
        if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
            return Err(format!(
                "key name {:?} must be 1 to 128 printable characters",
                raw.name
            ));
        }
        let bytes = hex::decode(raw.sha256.trim())
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or_else(|| {
                format!("key {name:?}: sha256 must be 64 hex digits (`sluice keys hash` prints it)")
            })?;
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&bytes);
        let scope = if raw.tenants.iter().any(|t| t == "*") {
            if raw.tenants.len() != 1 {
                return Err(format!(
                    "key {name:?}: \"*\" (any tenant) cannot be combined with named tenants"
                ));
            }
            TenantScope::Any
        } else {
            if raw.tenants.is_empty() {
                return Err(format!(
                    "key {name:?}: tenants is empty; name at least one, or \"*\""
                ));
            }
            if let Some(bad) = raw.tenants.iter().find(|t| !TenantId::is_valid(t)) {
                return Err(format!(
                    "key {name:?}: tenant {bad:?} does not match [A-Za-z0-9._-]{{1,64}}"
                ));
            }
            TenantScope::Only(raw.tenants.into())
        };
        if let Some(dup) = out
            .iter()
            .find(|e| e.name == name || bool::from(e.hash.ct_eq(&hash)))
        {
            return Err(format!(
                "key {name:?} repeats the name or the hash of key {:?}",
                dup.name
            ));
        }
        out.push(Arc::new(KeyEntry { name, hash, scope }));
    }
    Ok(out)
}

/// The hex SHA-256 of a key, as the keys file stores it.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new random key: 256 bits from the OS generator, hex, with the prefix.
pub fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    format!("{KEY_PREFIX}{}", hex::encode(bytes))
}

/// The keys file text with one more entry. The caller writes it atomically.
pub fn append_entry(existing: &str, name: &str, hash: &str, tenants: &[String]) -> String {
    let mut text = existing.to_string();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    if !text.is_empty() {
        text.push('\n');
    }
    let quoted: Vec<String> = tenants
        .iter()
        .map(|t| toml::Value::String(t.clone()).to_string())
        .collect();
    text.push_str(&format!(
        "[[key]]\nname = {}\nsha256 = \"{hash}\"\ntenants = [{}]\n",
        toml::Value::String(name.to_string()),
        quoted.join(", ")
    ));
    text
}

/// The key a request presents: `Authorization: Bearer <key>` or
/// `X-API-Key: <key>`. `Err` describes a header that is present but unusable.
pub fn presented_key(headers: &axum::http::HeaderMap) -> Result<Option<&str>, &'static str> {
    if let Some(v) = headers.get(axum::http::header::AUTHORIZATION) {
        let v = v
            .to_str()
            .map_err(|_| "Authorization header is not ASCII")?;
        let (scheme, key) = v
            .split_once(' ')
            .ok_or("Authorization must be `Bearer <key>`")?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err("Authorization scheme must be Bearer");
        }
        let key = key.trim();
        return if key.is_empty() {
            Err("Authorization: Bearer has no key")
        } else {
            Ok(Some(key))
        };
    }
    if let Some(v) = headers.get("x-api-key") {
        let key = v
            .to_str()
            .map_err(|_| "X-API-Key header is not ASCII")?
            .trim();
        return if key.is_empty() {
            Err("X-API-Key is empty")
        } else {
            Ok(Some(key))
        };
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(entries: &[(&str, &str, &[&str])]) -> String {
        let mut text = String::new();
        for (name, key, tenants) in entries {
            let tenants: Vec<String> = tenants.iter().map(|t| t.to_string()).collect();
            text = append_entry(&text, name, &hash_key(key), &tenants);
        }
        text
    }

    #[test]
    fn generated_keys_are_distinct_and_only_their_hash_authenticates() {
        let (k1, k2) = (generate_key(), generate_key());
        assert_ne!(k1, k2);
        assert!(k1.starts_with(KEY_PREFIX) && k1.len() == KEY_PREFIX.len() + 64);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, file_with(&[("one", &k1, &["acme"])])).unwrap();
        let store = KeyStore::load(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&k1), "the file holds the hash, not the key");
        let hit = store.authenticate(&k1).unwrap();
        assert_eq!(hit.name, "one");
        assert!(store.authenticate(&k2).is_none());
        assert!(
            store.authenticate(&hash_key(&k1)).is_none(),
            "the hash is not a key"
        );
        assert!(store.authenticate("").is_none());
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        for (text, want) in [
            (
                "[[key]]\nname = \"a\"\nsha256 = \"zz\"\ntenants = [\"t\"]\n",
                "64 hex digits",
            ),
            (&file_with(&[("a", "k", &[])]), "tenants is empty"),
            (&file_with(&[("a", "k", &["*", "t"])]), "cannot be combined"),
            (&file_with(&[("a", "k", &["ａcme"])]), "does not match"),
            (
                &file_with(&[("a", "k", &["t"]), ("a", "k2", &["t"])]),
                "repeats",
            ),
            (
                &file_with(&[("a", "k", &["t"]), ("b", "k", &["t"])]),
                "repeats",
            ),
            ("[[key]]\nname = \"a\"\nsha = \"x\"\n", "unknown field"),
        ] {
            let err = parse_keys(text).err().unwrap_or_default();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        assert!(parse_keys("").unwrap().is_empty());
    }

    #[test]
    fn reload_picks_up_changes_and_keeps_old_keys_on_a_broken_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, file_with(&[("one", "k1", &["a"])])).unwrap();
        let store = KeyStore::load(&path).unwrap();
        assert!(store.reload_if_changed().is_none(), "unchanged");
        std::fs::write(
            &path,
            file_with(&[("one", "k1", &["a"]), ("two", "k2", &["b"])]),
        )
        .unwrap();
        assert_eq!(store.reload_if_changed().unwrap().unwrap(), 2);
        assert!(store.authenticate("k2").is_some());
        std::fs::write(&path, "[[key]]\nbroken").unwrap();
        assert!(store.reload_if_changed().unwrap().is_err());
        assert!(store.authenticate("k2").is_some(), "old keys stay in force");
        assert!(
            store.reload_if_changed().is_none(),
            "a broken file is reported once"
        );
    }

    #[test]
    fn presented_key_reads_bearer_and_x_api_key() {
        use axum::http::{HeaderMap, HeaderValue};
        let mut h = HeaderMap::new();
        assert_eq!(presented_key(&h), Ok(None));
        h.insert("x-api-key", HeaderValue::from_static("k2"));
        assert_eq!(presented_key(&h), Ok(Some("k2")));
        h.insert("authorization", HeaderValue::from_static("bearer k1"));
        assert_eq!(presented_key(&h), Ok(Some("k1")), "Authorization wins");
        h.insert("authorization", HeaderValue::from_static("Basic dXNlcg=="));
        assert!(presented_key(&h).is_err());
        h.insert("authorization", HeaderValue::from_static("Bearer "));
        assert!(presented_key(&h).is_err());
    }
}
