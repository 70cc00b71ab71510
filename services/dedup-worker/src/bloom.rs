//! Bloom filter arithmetic for the Redis tier: sizing from the expected rate and target
//! false-positive rate, time-sliced generations, and bit positions by double hashing.
//!
//! Bloom filters cannot forget, so the window is cut into slices, one bitmap (generation) per
//! slice, each expiring after the window. A lookup asks every live generation, so each one is
//! sized for `target / generations` to keep the combined false-positive rate at the target.

use std::time::Duration;

use chrono::NaiveDate;
use dedup_core::DedupKey;

/// Redis strings hold at most 2^32 bits.
const MAX_BITS: u64 = 1 << 32;
const MAX_HASHES: u32 = 16;

/// The shape of every generation's bitmap.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BloomParams {
    /// Bits per generation.
    pub bits: u64,
    /// Bit positions per item.
    pub hashes: u32,
    /// Live generations a lookup checks.
    pub generations: u32,
    pub slice: Duration,
    pub window: Duration,
}

impl BloomParams {
    /// Sizes the filter for `rate` items per second over `window`, in `slice`-long generations,
    /// with a combined false-positive rate of `fp_rate`.
    pub fn size(
        rate: f64,
        fp_rate: f64,
        window: Duration,
        slice: Duration,
    ) -> Result<Self, String> {
        let sane = rate.is_finite() && rate > 0.0 && fp_rate > 0.0 && fp_rate < 1.0;
        if !sane {
            return Err(format!(
                "Bloom sizing needs a positive rate and a false-positive rate in (0, 1); got {rate} and {fp_rate}"
            ));
        }
        if slice.is_zero() || window.is_zero() || slice > window {
            return Err(format!(
                "the Bloom slice ({slice:?}) must be positive and no longer than the window ({window:?})"
            ));
        }
        let generations =
            u32::try_from((window.as_secs_f64() / slice.as_secs_f64()).ceil() as u64 + 1)
                .map_err(|_| "too many Bloom generations; use a longer slice".to_owned())?;
        let per_generation_fp = fp_rate / f64::from(generations);
        let items = (rate * slice.as_secs_f64()).max(1.0);
        let ln2 = std::f64::consts::LN_2;
        let bits = (-(items * per_generation_fp.ln()) / (ln2 * ln2))
            .ceil()
            .max(64.0) as u64;
        let bits = bits.min(MAX_BITS);
        let hashes = ((bits as f64 / items) * ln2)
            .round()
            .clamp(1.0, f64::from(MAX_HASHES)) as u32;
        Ok(Self {
            bits,
            hashes,
            generations,
            slice,
            window,
        })
    }

    /// The generation number a unix time (seconds) falls in.
    pub fn generation(&self, unix_seconds: u64) -> u64 {
        unix_seconds / self.slice.as_secs().max(1)
    }

    /// How long a generation's bitmap must live: the window plus the slice it was written in.
    pub fn generation_ttl(&self) -> Duration {
        self.window + self.slice
    }

    /// Bytes one generation takes in Redis once written.
    pub fn bytes_per_generation(&self) -> u64 {
        self.bits.div_ceil(8)
    }

    /// Appends the bit positions of an item, identified by its key and event day, to `out`.
    pub fn positions(&self, key: &DedupKey, day: NaiveDate, out: &mut Vec<u64>) {
        let (hi, lo) = key.halves();
        let day = u64::try_from(day.to_epoch_days()).unwrap_or_default();
        let h1 = lo ^ splitmix64(day);
        let h2 = (hi ^ splitmix64(day.wrapping_add(0x5bd1_e995))) | 1;
        for i in 0..u64::from(self.hashes) {
            out.push(h1.wrapping_add(i.wrapping_mul(h2)) % self.bits);
        }
    }
}

/// A fast 64-bit mixer (SplitMix64's finaliser).
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    /// Sizing follows the textbook formulas: m = -n ln p / ln²2, k = m/n ln 2.
    #[test]
    fn sizing_matches_the_formulas() {
        let p = BloomParams::size(100.0, 0.01, 7 * DAY, DAY).unwrap();
        assert_eq!(p.generations, 8);
        let n = 100.0 * 86_400.0;
        let expected_bits = -(n * (0.01f64 / 8.0).ln()) / std::f64::consts::LN_2.powi(2);
        assert!(
            (p.bits as f64 - expected_bits).abs() < 2.0,
            "{} vs {expected_bits}",
            p.bits
        );
        assert_eq!(p.hashes, 10);
        assert_eq!(p.generation_ttl(), 8 * DAY);
    }

    #[test]
    fn sizing_rejects_nonsense_and_caps_at_the_redis_limit() {
        assert!(BloomParams::size(0.0, 0.01, DAY, DAY).is_err());
        assert!(BloomParams::size(10.0, 1.5, DAY, DAY).is_err());
        assert!(BloomParams::size(10.0, 0.01, DAY, 2 * DAY).is_err());
        let huge = BloomParams::size(1e9, 1e-9, 7 * DAY, DAY).unwrap();
        assert_eq!(huge.bits, MAX_BITS);
    }

    /// Positions are deterministic, in range, and differ by key and by event day.
    #[test]
    fn positions_are_stable_in_range_and_day_sensitive() {
        let p = BloomParams::size(1000.0, 0.01, DAY, Duration::from_secs(3600)).unwrap();
        let key = DedupKey([7; 16]);
        let d1 = NaiveDate::from_ymd_opt(2025, 4, 10).unwrap();
        let d2 = d1.succ_opt().unwrap();
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        p.positions(&key, d1, &mut a);
        p.positions(&key, d1, &mut b);
        p.positions(&key, d2, &mut c);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), p.hashes as usize);
        assert!(a.iter().all(|&x| x < p.bits));
    }

    /// Simulated in memory, the filter's false-positive rate stays near its target.
    #[test]
    fn false_positive_rate_is_near_the_target() {
        let p = BloomParams::size(
            10_000.0,
            0.01,
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
        .unwrap();
        let day = NaiveDate::from_ymd_opt(2025, 1, 1).unwrap();
        let mut bits = HashSet::new();
        let mut pos = Vec::new();
        let key = |i: u64| {
            let mut k = [0u8; 16];
            k[..8].copy_from_slice(&splitmix64(i).to_be_bytes());
            k[8..].copy_from_slice(&splitmix64(!i).to_be_bytes());
            DedupKey(k)
        };
        for i in 0..10_000 {
            pos.clear();
            p.positions(&key(i), day, &mut pos);
            bits.extend(pos.iter().copied());
        }
        let trials = 20_000;
        let false_positives = (1_000_000..1_000_000 + trials)
            .filter(|&i| {
                pos.clear();
                p.positions(&key(i), day, &mut pos);
                pos.iter().all(|b| bits.contains(b))
            })
            .count();
        // One generation here, sized for 1% / 2 generations = 0.5%.
        let rate = false_positives as f64 / trials as f64;
        assert!(rate < 0.01, "false-positive rate {rate}");
    }
}
