//! Recounting an archive directory: every line by id, and every summary
//! checked against its file. Shared by the archive tests and the power-cut
//! harness (`tests/powercut.rs`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::{json, Value};

/// Lines of every file under `dir/logs`, by ledger id (`garbage-…` values
/// of unparsed lines included), and the problems a recount finds in the
/// summaries.
pub fn recount(dir: &Path) -> (HashMap<String, u64>, Vec<String>) {
    let mut ids = HashMap::new();
    let mut problems = Vec::new();
    let mut stack = vec![dir.join("logs")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            let unparsed = p.to_string_lossy().contains("/unparsed/");
            let mut by_tenant: BTreeMap<String, u64> = BTreeMap::new();
            let mut n = 0;
            for line in text.lines() {
                let v: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{}: bad line {line:?}: {e}", p.display()));
                let id = if unparsed {
                    v["value"].as_str().unwrap().to_string()
                } else {
                    *by_tenant
                        .entry(v["tenant_id"].as_str().unwrap_or("").into())
                        .or_default() += 1;
                    v["id"].as_str().unwrap().to_string()
                };
                *ids.entry(id).or_default() += 1;
                n += 1;
            }
            if unparsed {
                continue;
            }
            // logs/2026-11-26/12.log.json -> analytics/2026-11-26/summary_12.json
            let day = p
                .parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let hh = &p.file_name().unwrap().to_string_lossy()[..2];
            let sp = dir.join(format!("analytics/{day}/summary_{hh}.json"));
            let s: Value = match std::fs::read(&sp) {
                Ok(b) => serde_json::from_slice(&b).unwrap(),
                Err(e) => {
                    problems.push(format!("{}: {e}", sp.display()));
                    continue;
                }
            };
            if s["total"] != json!(n) || s["bytes"] != json!(text.len()) {
                problems.push(format!(
                    "{}: total {} bytes {} but the file has {n} lines, {} bytes",
                    sp.display(),
                    s["total"],
                    s["bytes"],
                    text.len()
                ));
            }
            let counted: BTreeMap<String, u64> =
                serde_json::from_value(s["by_tenant"]["counts"].clone()).unwrap();
            if counted != by_tenant {
                problems.push(format!(
                    "{}: by_tenant {counted:?} != {by_tenant:?}",
                    sp.display()
                ));
            }
        }
    }
    (ids, problems)
}
