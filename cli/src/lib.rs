//! What the fastkv command-line tools share: progress bars ([`Bars`]), charts ([`plot`]) and errors
//! in the tools' words ([`message`]). The tools are thin: every decision is the library's.

pub mod plot;

use std::io::IsTerminal;
use std::sync::Mutex;

use fastkv::progress::Progress;
use indicatif::{ProgressBar, ProgressStyle};

/// The library's progress on stderr: a bar on a terminal; elsewhere (a log, CI) one line per
/// counted step, so a long calibration or evaluation shows it is alive, and nothing for byte counts.
pub struct Bars {
    bar: Mutex<Option<(ProgressBar, String, u64)>>,
    terminal: bool,
}

impl Bars {
    pub fn new() -> Self {
        Bars { bar: Mutex::new(None), terminal: std::io::stderr().is_terminal() }
    }
}

impl Default for Bars {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for Bars {
    fn begin(&self, what: &str, total: u64, bytes: bool) {
        let bar = if self.terminal { ProgressBar::new(total) } else { ProgressBar::hidden() };
        let template = if bytes {
            format!("{what} {{bar:40}} {{bytes}}/{{total_bytes}} {{msg}}")
        } else {
            format!("{{bar:40}} {{pos}}/{{len}} {what}, {{msg}} [{{elapsed}} < {{eta}}]")
        };
        bar.set_style(ProgressStyle::with_template(&template).expect("valid template").progress_chars("=> "));
        let what = if bytes { String::new() } else { what.to_string() };
        *self.bar.lock().unwrap_or_else(|e| e.into_inner()) = Some((bar, what, total));
    }

    fn advance(&self, steps: u64, note: &str) {
        if let Some((bar, what, total)) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            bar.set_message(note.to_string());
            bar.inc(steps);
            if !self.terminal && !what.is_empty() {
                eprintln!("{}/{total} {what} done ({note})", bar.position());
            }
        }
    }

    fn end(&self) {
        if let Some((bar, ..)) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
            bar.finish_and_clear();
        }
    }
}

/// An error chain in the tools' words: the first library error is shown as the CLI names it
/// (`invalid --kv-budget`, [`fastkv::Error::cli_message`]); its message already includes its sources.
pub fn message(e: &anyhow::Error) -> String {
    let mut parts = Vec::new();
    for cause in e.chain() {
        if let Some(fe) = cause.downcast_ref::<fastkv::Error>() {
            parts.push(fe.cli_message());
            break;
        }
        parts.push(cause.to_string());
    }
    parts.join(": ")
}
