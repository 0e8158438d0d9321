//! How long work reports how far it got. The library never draws: the
//! caller passes a [`Progress`] (the `fracture` binary's terminal bars, or
//! [`Silent`]) and decides what the user sees.

/// Receives the steps of one task at a time: a task starts, advances
/// (possibly from several threads at once), carries a short running message
/// such as the mean loss, and finishes.
pub trait Progress: Sync {
    /// A new task named `task` of `total` steps counted in `unit`s (e.g. "batches").
    fn start(&self, task: &str, unit: &str, total: u64);
    fn advance(&self, steps: u64);
    fn message(&self, message: &str);
    fn finish(&self);
}

/// Reports nothing: tests, and `--quiet`.
pub struct Silent;

impl Progress for Silent {
    fn start(&self, _task: &str, _unit: &str, _total: u64) {}
    fn advance(&self, _steps: u64) {}
    fn message(&self, _message: &str) {}
    fn finish(&self) {}
}
