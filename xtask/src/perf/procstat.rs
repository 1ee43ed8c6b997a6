//! What a process holds, read from /proc: resident memory (`VmRSS`) and open file
//! descriptors, sampled on a thread of its own while a scenario runs; and the least-squares
//! slope of such a series. Linux only, and not a profiler: two numbers a second.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// One reading of a process.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Seconds since the sampler started.
    pub t_s: f64,
    pub rss_kb: u64,
    pub fds: u64,
}

/// The resident memory of `pid`, KiB (`VmRSS` in /proc/PID/status).
pub fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The open file descriptors of `pid` (entries of /proc/PID/fd).
pub fn open_fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// Both, now; `None` once the process is gone.
pub fn sample(pid: u32, t_s: f64) -> Option<Sample> {
    Some(Sample {
        t_s,
        rss_kb: rss_kb(pid)?,
        fds: open_fds(pid)?,
    })
}

/// Samples a process every interval on its own thread until stopped (or the process ends).
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Sample>>,
    started: Instant,
}

impl Sampler {
    pub fn start(pid: u32, every: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut samples = Vec::new();
                let mut next = started;
                while !stop.load(Ordering::Relaxed) {
                    match sample(pid, started.elapsed().as_secs_f64()) {
                        Some(s) => samples.push(s),
                        None => break,
                    }
                    next += every;
                    // Short sleeps, so that stopping is quick.
                    while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(20).min(next - Instant::now()));
                    }
                }
                samples
            })
        };
        Sampler { stop, thread, started }
    }

    /// Seconds since the sampler started (the samples' clock).
    pub fn now_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The least-squares slope of `y` over `x` (0 for fewer than two distinct x).
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 { 0.0 } else { sxy / sxx }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_memory_and_descriptors() {
        let me = std::process::id();
        assert!(rss_kb(me).unwrap() > 100);
        assert!(open_fds(me).unwrap() >= 3);
        assert!(sample(u32::MAX, 0.0).is_none());
    }

    #[test]
    fn the_slope_of_a_line_is_its_gradient_and_flat_is_zero() {
        let line: Vec<(f64, f64)> = (0..10).map(|i| (f64::from(i), 3.0 * f64::from(i) + 7.0)).collect();
        assert!((slope(&line) - 3.0).abs() < 1e-9);
        assert_eq!(slope(&[(1.0, 5.0), (2.0, 5.0), (3.0, 5.0)]), 0.0);
        assert_eq!(slope(&[(1.0, 5.0)]), 0.0);
    }

    #[test]
    fn a_sampler_samples_until_stopped() {
        let s = Sampler::start(std::process::id(), Duration::from_millis(10));
        std::thread::sleep(Duration::from_millis(60));
        let samples = s.stop();
        assert!(samples.len() >= 2, "{samples:?}");
        assert!(samples.windows(2).all(|w| w[0].t_s < w[1].t_s));
    }
}
