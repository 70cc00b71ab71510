//! What the load generator sends: the ~2 KB TV sample event with a unique `r` per unique
//! event, and an exact share of exact-key repeats of events sent at least a delay earlier.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The sample the issue asks to benchmark with (about 2 KB, ~90 fields).
const SAMPLE: &str = include_str!("../../../samples/tv_app_list_full.json");

/// One event to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// A new event, by its number.
    Unique(u64),
    /// A repeat of an earlier unique event.
    Duplicate(u64),
}

/// Builds event bodies and decides which sends are repeats.
pub struct Workload {
    prefix: Vec<u8>,
    suffix: Vec<u8>,
    run: String,
    duplicate_share: f64,
    duplicate_delay: Duration,
    sequence: AtomicU64,
    next_unique: AtomicU64,
    /// Accepted unique events waiting to be repeated: (accepted at, number).
    repeatable: Mutex<VecDeque<(Instant, u64)>>,
    /// The UTC day every event of the run carries (its partition).
    day: chrono::NaiveDate,
}

impl Workload {
    pub fn new(run: &str, duplicate_share: f64, duplicate_delay: Duration) -> anyhow::Result<Self> {
        anyhow::ensure!(
            (0.0..1.0).contains(&duplicate_share),
            "--duplicates must be in [0, 1)"
        );
        let mut sample = serde_json::from_str::<serde_json::Value>(SAMPLE)?;
        // Dated now: ingest accepts only event date-times inside its window.
        let now = chrono::Utc::now();
        sample["event_datetime"] = now.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string().into();
        let compact = serde_json::to_string(&sample)?;
        let marker = "\"r\":\"51234\"";
        let at = compact
            .find(marker)
            .ok_or_else(|| anyhow::anyhow!("the sample has no r field"))?;
        let prefix = format!("{}\"r\":\"", &compact[..at]).into_bytes();
        let suffix = format!("\"{}", &compact[at + marker.len()..]).into_bytes();
        Ok(Self {
            prefix,
            suffix,
            run: run.to_owned(),
            duplicate_share,
            duplicate_delay,
            sequence: AtomicU64::new(0),
            next_unique: AtomicU64::new(0),
            repeatable: Mutex::new(VecDeque::new()),
            day: now.date_naive(),
        })
    }

    /// The UTC day every event of the run carries, so the partition its inserts go into.
    pub fn day(&self) -> chrono::NaiveDate {
        self.day
    }

    /// Whether send number `i` should be a repeat: exactly `share` of all sends, evenly spread.
    pub fn is_duplicate_slot(i: u64, share: f64) -> bool {
        ((i + 1) as f64 * share).floor() > (i as f64 * share).floor()
    }

    /// The next event to send at `now`. A repeat slot with no event old enough yet sends a new
    /// event instead (the report counts what was really sent).
    pub fn next(&self, now: Instant) -> Pick {
        let i = self.sequence.fetch_add(1, Ordering::Relaxed);
        if Self::is_duplicate_slot(i, self.duplicate_share) {
            let mut queue = self.repeatable.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(&(at, n)) = queue.front()
                && now.duration_since(at) >= self.duplicate_delay
            {
                queue.pop_front();
                return Pick::Duplicate(n);
            }
        }
        Pick::Unique(self.next_unique.fetch_add(1, Ordering::Relaxed))
    }

    /// Records that unique event `n` was accepted at `at`, so it may be repeated later.
    pub fn accepted(&self, n: u64, at: Instant) {
        if self.duplicate_share > 0.0 {
            self.repeatable
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_back((at, n));
        }
    }

    /// The JSON body of event `n`.
    pub fn body(&self, n: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(self.r(n).as_bytes());
        out.extend_from_slice(&self.suffix);
    }

    /// The `r` value of event `n`: unique per run and event.
    pub fn r(&self, n: u64) -> String {
        format!("{}-{n}", self.run)
    }

    pub fn event_size(&self) -> usize {
        self.prefix.len() + self.suffix.len() + self.run.len() + 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The repeat slots are exactly the configured share, evenly spread.
    #[test]
    fn duplicate_slots_are_an_exact_share() {
        for share in [0.0, 0.1, 0.3, 0.5] {
            let n = 10_000u64;
            let slots = (0..n)
                .filter(|i| Workload::is_duplicate_slot(*i, share))
                .count() as f64;
            assert!(
                (slots - share * n as f64).abs() <= 1.0,
                "share {share}: {slots}"
            );
        }
        // Evenly spread: no two repeats in a row at 30%.
        assert!(!(0..1000).any(
            |i| Workload::is_duplicate_slot(i, 0.3) && Workload::is_duplicate_slot(i + 1, 0.3)
        ));
    }

    /// Repeats only reuse accepted events old enough, each at most once.
    #[test]
    fn repeats_wait_for_the_delay_and_are_used_once() {
        let w = Workload::new("t", 0.5, Duration::from_secs(10)).unwrap();
        let t0 = Instant::now();
        let picks: Vec<Pick> = (0..4).map(|_| w.next(t0)).collect();
        assert!(
            picks.iter().all(|p| matches!(p, Pick::Unique(_))),
            "nothing is old enough yet"
        );
        w.accepted(0, t0);
        let later = t0 + Duration::from_secs(11);
        let picks: Vec<Pick> = (0..4).map(|_| w.next(later)).collect();
        assert_eq!(
            picks.iter().filter(|p| **p == Pick::Duplicate(0)).count(),
            1
        );
    }

    /// Bodies are the sample with only `r` changed, and valid events, dated on the day the
    /// prefill fills (the UTC day of their `event_datetime`, the partition they go into).
    #[test]
    fn bodies_are_valid_sample_events_with_unique_r() {
        let w = Workload::new("run1", 0.3, Duration::ZERO).unwrap();
        let mut body = Vec::new();
        w.body(42, &mut body);
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["r"], "run1-42");
        let at = chrono::DateTime::parse_from_rfc3339(value["event_datetime"].as_str().unwrap());
        assert_eq!(
            at.unwrap().with_timezone(&chrono::Utc).date_naive(),
            w.day()
        );
        assert_eq!(value["event_name"], "app_list");
        assert!(dedup_event::event::validate_raw(value.to_string().as_bytes()).is_ok());
        assert!(body.len() > 1500, "about 2 KB: {}", body.len());
    }
}
