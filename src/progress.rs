//! The one progress bar style of the tool: `check`, `eval`, `sft` and `train` all show their
//! long jobs the same way.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// A bar on stderr for `len` units named `unit` ("step", "proof", "theorem"), `done` of them
/// already done (a resumed run). Hidden when `show` is off or stderr is not a terminal, so logs
/// and pipes get no control characters.
pub fn bar(len: usize, done: usize, unit: &str, show: bool) -> ProgressBar {
    if !show || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    let template = format!("{{bar:30}} {unit} {{pos}}/{{len}}  {{msg}}  [{{elapsed}} < {{eta}}]");
    bar.set_style(
        ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(done as u64);
    bar
}
