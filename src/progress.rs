//! Progress reporting for long operations: an indicatif bar on a terminal, nothing otherwise.

use std::io::IsTerminal;

/// Receives progress of a long operation, in bytes.
pub trait Progress: Send + Sync {
    /// Starts a phase (`what`, e.g. "uploading") of `total` bytes.
    fn start(&self, what: &str, total: u64);
    fn advance(&self, bytes: u64);
    fn finish(&self);
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

/// A byte progress bar on stderr.
pub struct Bar(indicatif::ProgressBar);

impl Progress for Bar {
    fn start(&self, what: &str, total: u64) {
        self.0.reset();
        self.0.set_length(total);
        self.0.set_message(what.to_owned());
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

/// A bar when stderr is a terminal, otherwise nothing.
pub fn for_stderr() -> Box<dyn Progress> {
    if !std::io::stderr().is_terminal() {
        return Box::new(NoProgress);
    }
    let bar = indicatif::ProgressBar::new(0);
    let style = indicatif::ProgressStyle::with_template(
        "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    );
    if let Ok(style) = style {
        bar.set_style(style.progress_chars("=> "));
    }
    Box::new(Bar(bar))
}
