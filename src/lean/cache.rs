//! Verdicts remembered for the checker's lifetime, so a proof sampled twice is checked once.

use std::collections::HashMap;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use super::verdict::{Verdict, VerdictKind};

pub type Key = [u8; 32];

/// sha256 of (what checks: backend, Lean and project, limits; preamble; statement; proof), each
/// part length-prefixed so no two different tuples hash the same bytes.
pub fn key(identity: &str, preamble: &str, statement: &str, proof: &str) -> Key {
    let mut hasher = Sha256::new();
    for part in [identity, preamble, statement, proof] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.finalize().into()
}

#[derive(Default)]
pub struct VerdictCache {
    map: Mutex<HashMap<Key, Verdict>>,
}

impl VerdictCache {
    pub fn get(&self, key: &Key) -> Option<Verdict> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    /// Remember `verdict`, except a crash or an unavailable checker: those may be the
    /// machine's fault, not the proof's.
    pub fn insert(&self, key: Key, verdict: &Verdict) {
        if !matches!(
            verdict.kind,
            VerdictKind::Crashed | VerdictKind::CheckerUnavailable
        ) {
            self.map
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, verdict.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_do_not_run_into_each_other() {
        assert_ne!(key("a", "bc", "", "x"), key("ab", "c", "", "x"));
        assert_eq!(key("a", "b", "c", "d"), key("a", "b", "c", "d"));
    }
}
