use super::Theorem;

/// The instruction a model gets for one theorem, before any chat template is applied.
///
/// The model sees the preamble and statement exactly as Lean will check them, so whatever it
/// writes after `:=` can be appended verbatim. The reply format (a fenced `lean` block holding the
/// proof term, usually `by` and tactics) is the one proof extraction expects.
pub fn user_message(theorem: &Theorem) -> String {
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
