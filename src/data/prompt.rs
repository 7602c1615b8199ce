use super::fim::{Hole, HOLE_MARKER};
use super::Theorem;

/// The instruction a model gets for one theorem, before any chat template is applied.
///
/// The model sees the preamble and statement exactly as Lean will check them, so whatever it
/// writes after `:=` can be appended verbatim. The reply format (a fenced `lean` block holding the
/// proof term, usually `by` and tactics) is the one proof extraction expects.
///
/// A fill-in-the-middle example ([`Theorem::hole`]) asks for the hole's text instead, see
/// [`fim_message`].
pub fn user_message(theorem: &Theorem) -> String {
    if let Some(hole) = &theorem.hole {
        return fim_message(theorem, hole);
    }
    let mut msg = String::from(
        "Complete the following Lean 4 theorem. Reply with the proof that follows `:=` \
         (a term, or `by` followed by indented tactics) in a ```lean code block. \
         Do not restate the theorem or change its statement.\n\n```lean\n",
    );
    msg.push_str(&theorem.preamble());
    msg.push_str(&theorem.statement);
    msg.push_str("\n```");
    msg
}

/// The instruction for a fill-in-the-middle example: the theorem with its proof, the hole shown
/// as [`HOLE_MARKER`], and a request for the missing text only, which is what
/// [`crate::lean::fill_hole`] splices back.
pub fn fim_message(theorem: &Theorem, hole: &Hole) -> String {
    let mut msg = format!(
        "The following Lean 4 proof has a hole marked {HOLE_MARKER}. Reply with the text that \
         replaces {HOLE_MARKER} only, in a ```lean code block, with the indentation it has in \
         the proof. Do not repeat the theorem or the proof around the hole, and do not change \
         them.\n\n```lean\n"
    );
    msg.push_str(&theorem.preamble());
    msg.push_str(&theorem.statement);
    msg.push(' ');
    msg.push_str(&hole.marked());
    msg.push_str("\n```");
    msg
}
