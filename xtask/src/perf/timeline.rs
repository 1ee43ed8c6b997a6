//! Series over time (samples of a process, requests a second) drawn as `Panel::Lines`: the
//! run cut into buckets of a round width (1 s to 5 min, at most about 40 of them), each
//! bucket's mean value a point, and a round time every few points as its label. Not a time
//! axis for plot.rs: the points stay categories, evenly spaced because the buckets are.

/// Bucket widths to pick from, seconds.
const WIDTHS_S: [f64; 11] = [1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0];

/// How a span of time is cut and labelled.
#[derive(Clone, Copy, Debug)]
pub struct TimeAxis {
    /// Bucket width, seconds.
    pub width_s: f64,
    pub buckets: usize,
    /// Seconds per unit of the labels (1: seconds, 60: minutes).
    pub unit_s: f64,
    /// Every how many buckets a label goes.
    pub label_every: usize,
}

impl TimeAxis {
    /// An axis from 0 to `span_s` seconds in at most about `max_buckets` buckets.
    pub fn new(span_s: f64, max_buckets: usize) -> TimeAxis {
        let span_s = span_s.max(1.0);
        let width_s = WIDTHS_S
            .into_iter()
            .find(|w| span_s / w <= max_buckets as f64)
            .unwrap_or(WIDTHS_S[WIDTHS_S.len() - 1]);
        let buckets = (span_s / width_s).ceil().max(1.0) as usize;
        let unit_s = if span_s >= 300.0 { 60.0 } else { 1.0 };
        // About six labels, each on a round time: a multiple of a unit, or of 5 s.
        let round = if unit_s == 60.0 { 60.0 } else { 5.0 };
        let mut label_every = (buckets / 6).max(1);
        while (label_every as f64 * width_s) % round != 0.0 && label_every < buckets {
            label_every += 1;
        }
        TimeAxis {
            width_s,
            buckets,
            unit_s,
            label_every,
        }
    }

    /// "seconds" or "minutes".
    pub fn unit(&self) -> &'static str {
        if self.unit_s == 60.0 { "minutes" } else { "seconds" }
    }

    /// The points' labels: a bucket's start, on every `label_every`th bucket.
    pub fn labels(&self) -> Vec<String> {
        (0..self.buckets)
            .map(|i| {
                if i % self.label_every == 0 {
                    let t = i as f64 * self.width_s / self.unit_s;
                    let s = format!("{t:.2}");
                    s.trim_end_matches('0').trim_end_matches('.').to_owned()
                } else {
                    String::new()
                }
            })
            .collect()
    }

    /// The mean of the values of `points` (seconds from the axis' 0, value) in each bucket;
    /// NaN where a bucket has none. Points outside the axis are left out.
    pub fn values(&self, points: &[(f64, f64)]) -> Vec<f64> {
        let mut sums = vec![(0.0, 0usize); self.buckets];
        for &(t, v) in points {
            if t < 0.0 || !v.is_finite() {
                continue;
            }
            if let Some(b) = sums.get_mut((t / self.width_s) as usize) {
                b.0 += v;
                b.1 += 1;
            }
        }
        sums.iter()
            .map(|&(s, c)| if c == 0 { f64::NAN } else { s / c as f64 })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_minutes_are_cut_in_fifteen_second_buckets_labelled_every_two_minutes() {
        let axis = TimeAxis::new(600.0, 40);
        assert_eq!(axis.width_s, 15.0);
        assert_eq!(axis.buckets, 40);
        assert_eq!(axis.label_every, 8);
        assert_eq!(axis.unit(), "minutes");
        let labels = axis.labels();
        assert_eq!(labels.len(), 40);
        assert_eq!(
            (labels[0].as_str(), labels[8].as_str(), labels[16].as_str()),
            ("0", "2", "4")
        );
        assert!(labels[1].is_empty());
    }

    #[test]
    fn forty_seconds_are_cut_in_seconds_labelled_every_five() {
        let axis = TimeAxis::new(40.0, 40);
        assert_eq!((axis.width_s, axis.buckets, axis.label_every), (1.0, 40, 10));
        assert_eq!(axis.labels()[10], "10");
        let values = axis.values(&[(0.2, 1.0), (0.7, 3.0), (39.5, 5.0), (40.0, 9.0), (-1.0, 9.0)]);
        assert_eq!(values[0], 2.0);
        assert_eq!(values[39], 5.0);
        assert!(values[1].is_nan());
    }
}
