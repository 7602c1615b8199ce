//! The module graph has no circles (docs/design.md §2): reading the crate's sources, no module
//! depends, directly or through others, on a module that depends on it. A parent module using
//! its own children (re-exports, `mod` declarations) is not a dependency; a child using its
//! parent's shared items (`super::AlgoError`) is.
//!
//! Checked at two levels: files, and the top-level modules (`train`, `eval`, `sft` must import
//! the `rollout` layer, never each other).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Module path (`algo::config`) of every source file under `src/` (the crate root is `crate`).
fn modules() -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let src = Path::new(ROOT).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    files
        .into_iter()
        .filter(|f| !f.ends_with("main.rs"))
        .map(|file| {
            let rel = file.strip_prefix(&src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
                parts.pop();
            }
            let name = if parts.is_empty() {
                "crate".to_string()
            } else {
                parts.join("::")
            };
            (name, file)
        })
        .collect()
}

/// The code of a file without comments and string literals, and without its `#[cfg(test)]`
/// module (tests may use anything).
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Module paths a file names: `crate::a::b`, `super::x` (resolved against `module`), and the
/// items of `{...}` groups after them; each path counts as the deepest module it starts with.
fn references(module: &str, code: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let mut parent: Vec<&str> = module.split("::").collect();
    parent.pop();
    let mut out = BTreeSet::new();
    for (prefix, base) in [("crate::", vec![]), ("super::", parent)] {
        for (at, _) in code.match_indices(prefix) {
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let rest = &code[at + prefix.len()..];
            let path_end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            let head = &rest[..path_end];
            let mut paths = vec![head.to_string()];
            if rest[path_end..].starts_with('{') {
                let group = &rest[path_end + 1..];
                let group = &group[..group.find('}').unwrap_or(group.len())];
                paths.extend(
                    group
                        .split(',')
                        .map(|item| format!("{head}{}", item.trim().trim_start_matches('{'))),
                );
            }
            for path in paths {
                let mut parts: Vec<String> = base.iter().map(|s| s.to_string()).collect();
                parts.extend(path.split("::").filter(|p| !p.is_empty()).map(String::from));
                while !parts.is_empty() {
                    let name = parts.join("::");
                    if known.contains(&name) {
                        out.insert(name);
                        break;
                    }
                    parts.pop();
                }
            }
        }
    }
    out.remove(module);
    out
}

fn is_within(module: &str, ancestor: &str) -> bool {
    ancestor == "crate" || module == ancestor || module.starts_with(&format!("{ancestor}::"))
}

fn cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut found = stack[at..].to_vec();
            found.push(node.to_string());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, edges, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for node in edges.keys() {
        if let Some(c) = visit(node, edges, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

fn file_edges() -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules();
    let known: BTreeSet<String> = modules.keys().cloned().collect();
    modules
        .iter()
        .filter(|(name, _)| name.as_str() != "crate")
        .map(|(name, file)| {
            let text = std::fs::read_to_string(file).unwrap();
            let refs = references(name, &code(&text), &known)
                .into_iter()
                // A parent uses its children freely; the crate root only declares modules.
                .filter(|r| r != "crate" && !is_within(r, name))
                .collect();
            (name.clone(), refs)
        })
        .collect()
}

#[test]
fn no_file_depends_on_a_module_that_depends_on_it() {
    let edges = file_edges();
    assert!(edges.contains_key("rollout") && edges.contains_key("algo::config"));
    assert_eq!(cycle(&edges), None, "a circle of imports");
}

#[test]
fn top_level_modules_form_no_circle_and_train_eval_sft_share_rollout() {
    let top = |m: &str| m.split("::").next().unwrap().to_string();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, to) in file_edges() {
        let entry = edges.entry(top(&from)).or_default();
        entry.extend(to.iter().map(|t| top(t)).filter(|t| *t != top(&from)));
    }
    assert_eq!(cycle(&edges), None, "a circle between top-level modules");
    for user in ["train", "eval", "sft"] {
        let deps = &edges[user];
        for other in ["train", "eval", "sft"] {
            assert!(!deps.contains(other), "{user} imports {other}");
        }
        if user != "sft" {
            assert!(
                deps.contains("rollout"),
                "{user} does not use the rollout layer"
            );
        }
    }
    assert!(
        edges["sft"].contains("rollout"),
        "sft builds prompts through rollout"
    );
}

#[test]
fn the_checker_finds_a_planted_circle() {
    let mut edges = file_edges();
    edges
        .get_mut("model::tokenizer")
        .unwrap()
        .insert("train".to_string());
    assert!(
        cycle(&edges).is_some(),
        "train uses model, so model -> train closes a circle"
    );
}
