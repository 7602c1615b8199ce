//! The axiom audit: reading the answer to the checker's own `#print axioms NAME`
//! (docs/checker.md §4.5).

/// The axioms every accepted proof may use (Mathlib's classical logic).
pub const STANDARD_AXIOMS: [&str; 3] = ["propext", "Classical.choice", "Quot.sound"];

/// `'NAME' does not depend on any axioms` → `(NAME, [])`;
/// `'NAME' depends on axioms: [a, b,\n c]` → `(NAME, [a, b, c])` (long lists wrap).
pub fn parse_audit(text: &str) -> Option<(String, Vec<String>)> {
    let rest = text.trim().strip_prefix('\'')?;
    if let Some(name) = rest.strip_suffix("' does not depend on any axioms") {
        return Some((name.to_string(), Vec::new()));
    }
    let (name, list) = rest.rsplit_once("' depends on axioms: [")?;
    let list = list.trim_end().strip_suffix(']')?;
    let axioms = list
        .split(',')
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();
    Some((name.to_string(), axioms))
}

/// Is `axiom` acceptable? The standard three always; the compiler-trust axioms of
/// `native_decide` only when it is allowed.
pub fn axiom_allowed(axiom: &str, allow_native_decide: bool) -> bool {
    STANDARD_AXIOMS.contains(&axiom)
        || (allow_native_decide
            && (matches!(
                axiom,
                "Lean.ofReduceBool" | "Lean.ofReduceNat" | "Lean.trustCompiler"
            ) || axiom.contains("native_decide.ax")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_shapes_and_wrapping() {
        assert_eq!(
            parse_audit("'t' does not depend on any axioms"),
            Some(("t".into(), vec![]))
        );
        let wrapped = "'Foo.bar'' depends on axioms: [propext,\n  Classical.choice,\n  Quot.sound]";
        let (name, axioms) = parse_audit(wrapped).unwrap();
        assert_eq!(name, "Foo.bar'");
        assert_eq!(axioms, STANDARD_AXIOMS);
        assert_eq!(parse_audit("unsolved goals"), None);
    }

    #[test]
    fn native_axioms_need_permission() {
        let nd = "Empiricist.nd._native.native_decide.ax_1_1";
        assert!(!axiom_allowed(nd, false));
        assert!(axiom_allowed(nd, true));
        assert!(!axiom_allowed("sorryAx", true));
        assert!(axiom_allowed("Quot.sound", false));
    }
}
