//! The one progress-bar helper for long work: drawn on stderr when it is a terminal,
//! silent otherwise (pipes, CI, tests).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar counting `unit`s up to `total` (a spinner with a rate when unknown).
pub fn bar(enabled: bool, total: Option<u64>, unit: &str) -> ProgressBar {
    let bar = match total {
        Some(total) => ProgressBar::new(total),
        None => ProgressBar::no_length(),
    };
    if !enabled || !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
        return bar;
    }
    let template = match total {
        Some(_) => format!(
            "{{elapsed_precise}} [{{wide_bar}}] {{human_pos}}/{{human_len}} {unit} ({{per_sec}}, eta {{eta}}) {{msg}}"
        ),
        None => format!("{{elapsed_precise}} {{spinner}} {{human_pos}} {unit} ({{per_sec}}) {{msg}}"),
    };
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// The steady-state rate of a training run: its steps after the first, which pays the
/// one-time costs (CUDA kernels compiled, cuBLAS set up, caches filled) that would swamp a
/// short benchmark run on a GPU. The clock runs from the report of the first step to that of
/// the last, so what comes after the loop (the final checkpoint and files) is not counted;
/// both ends fall at the same point of a step (its loss read back to the host), so on a GPU
/// the window spans whole steps even though the device runs ahead of the host.
#[derive(Debug, Default)]
pub struct StepClock {
    first_done: Option<std::time::Instant>,
    last_done: Option<std::time::Instant>,
    steps_after_first: u64,
}

impl StepClock {
    /// A clock that has seen no step.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one finished step.
    pub fn step_done(&mut self) {
        let now = std::time::Instant::now();
        match self.first_done {
            None => self.first_done = Some(now),
            Some(_) => {
                self.steps_after_first += 1;
                self.last_done = Some(now);
            }
        }
    }

    /// `after the first step: N steps in S s (T tokens/s)`, or `None` before a second step.
    pub fn summary(&self, tokens_per_step: u64) -> Option<String> {
        let (start, end) = self.first_done.zip(self.last_done)?;
        let seconds = (end - start).as_secs_f64().max(1e-9);
        Some(format!(
            "after the first step: {} steps in {seconds:.2} s ({:.0} tokens/s)",
            self.steps_after_first,
            (self.steps_after_first * tokens_per_step) as f64 / seconds
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_clock_reports_only_the_steps_after_the_first() {
        let mut clock = StepClock::new();
        assert_eq!(clock.summary(10), None);
        clock.step_done();
        assert_eq!(clock.summary(10), None, "one step has no steady state");
        clock.step_done();
        clock.step_done();
        let line = clock.summary(10).unwrap();
        assert!(
            line.starts_with("after the first step: 2 steps in "),
            "{line}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(
            clock.summary(10).unwrap(),
            line,
            "the clock stops at the last step, not when asked"
        );
    }
}
