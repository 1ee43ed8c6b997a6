//! Progress of a `cargo xtask perf` scenario: a bar on stderr when it is a terminal, one plain
//! line on stderr per step otherwise (CI, pipes, files). Not a logger: results and tables go to
//! stdout as before, and nothing here decides what a scenario runs.
//!
//! ```text
//! let mut p = Progress::new("multi-round", 10);
//! p.step("base: round_robin over 4 engines");   // step 1 of 10 starts
//! p.step("base: prefix over 4 engines");        // step 1 is done, step 2 starts
//! p.suspend(|| print_table());                  // output of our own, the bar out of the way
//! p.finish();
//! ```

use std::cell::Cell;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

/// One scenario's steps, counted against a total known up front.
pub struct Progress {
    bar: ProgressBar,
    scenario: String,
    total: u64,
    /// Steps started so far; all but the last are done.
    started: Cell<u64>,
    /// Plain lines instead of a bar (no terminal, or `CI` set).
    plain: bool,
    since: Instant,
}

impl Progress {
    /// A bar for `scenario` of `total_steps` steps, none started yet.
    pub fn new(scenario: &str, total_steps: u64) -> Progress {
        let plain = std::env::var_os("CI").is_some() || !std::io::stderr().is_terminal();
        let target = if plain {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let bar = ProgressBar::with_draw_target(Some(total_steps), target);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:.bold} [{bar:20.cyan/blue}] {pos}/{len} {elapsed_precise} eta {steps_eta} {wide_msg}",
            )
            .expect("a valid template")
            .with_key("steps_eta", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = w.write_str(&eta(s.elapsed(), s.pos(), s.len().unwrap_or(0)));
            })
            .progress_chars("=> "),
        );
        bar.set_prefix(scenario.to_owned());
        if !plain {
            bar.enable_steady_tick(Duration::from_secs(1));
        }
        Progress {
            bar,
            scenario: scenario.to_owned(),
            total: total_steps,
            started: Cell::new(0),
            plain,
            since: Instant::now(),
        }
    }

    /// Starts the next step, described by `msg` (what runs: target, variant, policy); the step
    /// before it is done.
    pub fn step(&self, msg: impl Into<String>) {
        let msg = msg.into();
        let n = self.started.get();
        if n > 0 {
            self.bar.inc(1);
        }
        self.started.set(n + 1);
        if self.plain {
            eprintln!(
                "[{} {}/{} {} eta {}] {msg}",
                self.scenario,
                n + 1,
                self.total,
                hms(self.since.elapsed()),
                eta(self.since.elapsed(), n, self.total)
            );
        }
        self.bar.set_message(msg);
    }

    /// Runs `f` with the bar out of the way, for what writes to the terminal itself (tables on
    /// stdout, notes on stderr, cargo).
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.bar.suspend(f)
    }

    /// Marks every step done and says how long they took.
    pub fn finish(self) {
        let line = format!(
            "[{}] done: {} steps in {}",
            self.scenario,
            self.started.get(),
            hms(self.since.elapsed())
        );
        if self.plain {
            eprintln!("{line}");
        } else {
            self.bar.finish_and_clear();
            eprintln!("{line}");
        }
    }
}

/// What is left of `total` steps after `done` took `elapsed`, assuming steps of equal length;
/// `?` before the first is done.
fn eta(elapsed: Duration, done: u64, total: u64) -> String {
    if done == 0 {
        return "?".into();
    }
    let left = total.saturating_sub(done) as f64;
    hms(elapsed.mul_f64(left / done as f64))
}

/// `42s`, `3m07s`, `1h02m`.
fn hms(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_is_unknown_until_a_step_is_done_then_scales_the_mean_step() {
        assert_eq!(eta(Duration::from_secs(5), 0, 4), "?");
        assert_eq!(eta(Duration::from_secs(60), 1, 4), "3m00s");
        assert_eq!(eta(Duration::from_secs(60), 4, 4), "0s");
    }

    #[test]
    fn durations_read_as_hours_minutes_seconds() {
        assert_eq!(hms(Duration::from_secs(42)), "42s");
        assert_eq!(hms(Duration::from_secs(187)), "3m07s");
        assert_eq!(hms(Duration::from_secs(3720)), "1h02m");
    }

    #[test]
    fn steps_count_as_done_when_the_next_starts() {
        // A bar or plain lines (as the test's stderr is a terminal or not), the count is the same.
        let p = Progress::new("test", 3);
        p.step("first");
        assert_eq!(p.bar.position(), 0);
        p.step("second");
        p.step("third");
        assert_eq!(p.bar.position(), 2);
        assert_eq!(p.started.get(), 3);
        p.finish();
    }
}
