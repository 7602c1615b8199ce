use serde::{Deserialize, Serialize};

use super::fim::Hole;

/// One theorem record (see the README's "Theorem format").
///
/// `statement` always ends with `:=` once loaded: records in the seed project's shape (no `:=`)
/// get ` :=` appended, so every consumer can assemble `preamble + statement + " " + proof`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Theorem {
    pub name: String,
    pub statement: String,
    /// Lines placed before the statement (`open`, `namespace`, helper `def`s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// Modules to import when there is no `header`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub imports: Vec<String>,
    /// A verbatim preamble (miniF2F); overrides `imports` and `context` (see [`Theorem::preamble`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// A known-good proof (what follows `:=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    /// Set on a fill-in-the-middle example: the model writes the hole's text instead of the
    /// whole proof (docs/fim.md). Never read from a theorem file.
    #[serde(skip)]
    pub hole: Option<Hole>,
}

impl Theorem {
    /// This theorem as a fill-in-the-middle example with `hole`; a whole-proof hole is the
    /// whole-proof task, so it leaves the theorem as it is.
    pub fn with_hole(&self, hole: Hole) -> Theorem {
        Theorem {
            hole: (!hole.is_whole()).then_some(hole),
            ..self.clone()
        }
    }

    /// The Lean text placed before the statement: `header` verbatim when present, else one
    /// `import` line per module, then `context` and a blank line.
    pub fn preamble(&self) -> String {
        if let Some(header) = &self.header {
            return header.clone();
        }
        let mut out = String::new();
        for module in &self.imports {
            out.push_str("import ");
            out.push_str(module);
            out.push('\n');
        }
        if let Some(context) = self.context.as_deref().filter(|c| !c.is_empty()) {
            out.push_str(context);
            out.push_str("\n\n");
        }
        out
    }
}
