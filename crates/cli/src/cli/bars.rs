//! Progress bars on stderr for the library's long work (`Progress`).

use indicatif::{ProgressBar, ProgressStyle};

use fracture_train::progress::Progress;

/// Terminal progress bars on stderr, one task at a time; hidden with `--quiet`.
pub(super) struct Bars {
    bar: std::sync::Mutex<ProgressBar>,
    quiet: bool,
}

impl Bars {
    pub(super) fn new(quiet: bool) -> Self {
        Self {
            bar: std::sync::Mutex::new(ProgressBar::hidden()),
            quiet,
        }
    }

    fn bar(&self) -> std::sync::MutexGuard<'_, ProgressBar> {
        // A panic elsewhere while drawing leaves a usable bar behind.
        self.bar.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Progress for Bars {
    fn start(&self, task: &str, unit: &str, total: u64) {
        if self.quiet {
            return;
        }
        let template = format!("  {{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit}  {{msg}}  ({{eta}} left)");
        let bar = ProgressBar::new(total).with_style(
            ProgressStyle::with_template(&template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(task.to_string());
        *self.bar() = bar;
    }

    fn advance(&self, steps: u64) {
        self.bar().inc(steps);
    }

    fn message(&self, message: &str) {
        self.bar().set_message(message.to_string());
    }

    fn finish(&self) {
        self.bar().finish_and_clear();
    }
}
