//! How far long work has got — a build, a calibration, an evaluation, a benchmark. The library
//! reports; the caller decides what to show: the `fastkv` tools draw bars, a service may log or
//! ignore it ([`Silent`]). Keeping the drawing out of the library keeps terminal code out of every
//! program that embeds it.

/// Receives the progress of one task at a time. Called from the task's thread, once per step.
pub trait Progress: Sync {
    /// A task of `total` steps begins; `what` names it ("converting weights"). With `bytes`, a step
    /// is a byte.
    fn begin(&self, what: &str, total: u64, bytes: bool);
    /// `steps` more are done; `note` says what runs now.
    fn advance(&self, steps: u64, note: &str);
    /// The task is over.
    fn end(&self);
}

/// Shows nothing.
pub struct Silent;

impl Progress for Silent {
    fn begin(&self, _: &str, _: u64, _: bool) {}
    fn advance(&self, _: u64, _: &str) {}
    fn end(&self) {}
}
