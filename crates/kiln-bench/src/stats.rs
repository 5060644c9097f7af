//! min / median / max of a series, percentiles, and a bootstrap interval for a median difference.

/// Summary of one metric over the runs that produced it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub n: usize,
}

/// Summarises `values` (NaNs are dropped); `None` when nothing is left.
pub fn summarize(values: &[f64]) -> Option<Summary> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    Some(Summary { min: v[0], median, max: v[n - 1], n })
}

/// The `p`-th percentile (nearest rank: the smallest value with at least p% of the values at or
/// below it); `None` when there are no values.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v.get(rank.min(v.len()) - 1).copied()
}

/// A `confidence` interval (e.g. 0.9) for `median(a) - median(b)` by the percentile bootstrap:
/// both series resampled with replacement `resamples` times. Deterministic (a fixed-seed
/// generator), so the same data gives the same interval. `None` when a series is empty.
pub fn median_difference_interval(
    a: &[f64],
    b: &[f64],
    confidence: f64,
    resamples: usize,
) -> Option<(f64, f64)> {
    let a: Vec<f64> = a.iter().copied().filter(|x| !x.is_nan()).collect();
    let b: Vec<f64> = b.iter().copied().filter(|x| !x.is_nan()).collect();
    if a.is_empty() || b.is_empty() || resamples == 0 {
        return None;
    }
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |n: usize| {
        // splitmix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % n as u64) as usize
    };
    let mut diffs = Vec::with_capacity(resamples);
    let mut sa = vec![0.0; a.len()];
    let mut sb = vec![0.0; b.len()];
    for _ in 0..resamples {
        sa.iter_mut().for_each(|x| *x = a[next(a.len())]);
        sb.iter_mut().for_each(|x| *x = b[next(b.len())]);
        let (ma, mb) = (summarize(&sa)?.median, summarize(&sb)?.median);
        diffs.push(ma - mb);
    }
    diffs.sort_by(f64::total_cmp);
    let tail = (1.0 - confidence.clamp(0.0, 1.0)) / 2.0;
    let at = |q: f64| diffs[((q * (diffs.len() - 1) as f64).round() as usize).min(diffs.len() - 1)];
    Some((at(tail), at(1.0 - tail)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_and_even() {
        let s = summarize(&[3.0, 1.0, 2.0]).expect("values");
        assert_eq!((s.min, s.median, s.max, s.n), (1.0, 2.0, 3.0, 3));
        let s = summarize(&[4.0, 1.0, 2.0, 3.0]).expect("values");
        assert_eq!(s.median, 2.5);
        assert_eq!(summarize(&[]), None);
        assert_eq!(summarize(&[f64::NAN]), None);
    }

    #[test]
    fn the_median_difference_interval_separates_clear_gaps_from_noise() {
        let base: Vec<f64> = (0..10).map(|i| 1000.0 + f64::from(i)).collect();
        let shifted: Vec<f64> = base.iter().map(|x| x + 300.0).collect();
        let (lo, hi) = median_difference_interval(&shifted, &base, 0.9, 2000).unwrap();
        assert!(lo > 290.0 && hi < 310.0, "{lo} {hi}");
        // Noise of +-1000 around the same centre: the interval is wide and contains 0.
        let noisy: Vec<f64> = (0..10).map(|i| 1000.0 + if i % 2 == 0 { 1000.0 } else { -1000.0 }).collect();
        let (lo, hi) = median_difference_interval(&noisy, &base, 0.9, 2000).unwrap();
        assert!(lo < 0.0 && hi > 0.0 && hi - lo > 500.0, "{lo} {hi}");
        assert_eq!(median_difference_interval(&[], &base, 0.9, 10), None);
        // Deterministic.
        assert_eq!(
            median_difference_interval(&noisy, &base, 0.9, 500),
            median_difference_interval(&noisy, &base, 0.9, 500)
        );
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 95.0), Some(19.0));
        assert_eq!(percentile(&v, 100.0), Some(20.0));
        assert_eq!(percentile(&[5.0, 1.0, 3.0], 95.0), Some(5.0));
        assert_eq!(percentile(&[], 95.0), None);
    }
}
