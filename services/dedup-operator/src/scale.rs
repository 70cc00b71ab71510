//! How many workers a pipeline should run, decided the way the Kubernetes HPA decides for an
//! average-value target: `ceil(depth / target per worker)`, no change within a 10 % tolerance,
//! clamped to min/max, with stabilization windows — the highest recommendation of the
//! scale-down window wins (so a dip must last the whole window before workers go), and the
//! lowest of the scale-up window (0 s by default: scale up at once). Pure: time is a parameter.

use std::collections::VecDeque;

use chrono::{DateTime, Duration, Utc};

/// Relative change below which the replica count is left alone.
pub const TOLERANCE: f64 = 0.1;

/// The scaling bounds and target of one pipeline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub min: i32,
    pub max: i32,
    /// Ready plus unacknowledged messages per worker.
    pub target_per_worker: i64,
    pub scale_up_window: Duration,
    pub scale_down_window: Duration,
}

/// What the operator could read of the queue.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// Ready plus unacknowledged messages.
    Depth(i64),
    /// The broker could not be read: why.
    Unavailable(String),
}

/// Why the decision is what it is (a status condition reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Within tolerance of the target, or already at the recommendation.
    Steady,
    ScaleUp,
    ScaleDown,
    /// A change was recommended but the stabilization window holds it back.
    Stabilizing,
    /// The queue depth could not be read: replicas held where they are.
    BrokerUnreachable,
}

/// A decision: the replica count to set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub replicas: i32,
    pub reason: Reason,
}

/// Remembers recent recommendations for the stabilization windows.
#[derive(Debug, Default, Clone)]
pub struct Scaler {
    history: VecDeque<(DateTime<Utc>, i32)>,
}

impl Scaler {
    /// A scaler that remembers `history` (recommendations and when they were made), as the
    /// pipeline's status kept them: a restarted operator keeps its stabilization windows.
    pub fn from_history(history: impl IntoIterator<Item = (DateTime<Utc>, i32)>) -> Self {
        let mut history: Vec<_> = history.into_iter().collect();
        history.sort_by_key(|(at, _)| *at);
        Self {
            history: history.into(),
        }
    }

    /// The recommendations it remembers, oldest first.
    pub fn history(&self) -> impl Iterator<Item = (DateTime<Utc>, i32)> + '_ {
        self.history.iter().copied()
    }

    /// Decides the replicas for `current` running workers at `now`.
    pub fn decide(
        &mut self,
        now: DateTime<Utc>,
        current: i32,
        observation: &Observation,
        policy: &Policy,
    ) -> Decision {
        let Observation::Depth(depth) = observation else {
            return Decision {
                replicas: current.clamp(policy.min, policy.max.max(policy.min)),
                reason: Reason::BrokerUnreachable,
            };
        };
        let (min, max) = (policy.min.max(0), policy.max.max(policy.min.max(0)));
        let raw = recommend(*depth, current, policy.target_per_worker);
        let recommended = raw.clamp(min, max);
        self.history.push_back((now, recommended));
        let keep = policy.scale_up_window.max(policy.scale_down_window);
        while self.history.front().is_some_and(|(at, _)| now - *at > keep) {
            self.history.pop_front();
        }
        let within = |window: Duration| {
            self.history
                .iter()
                .filter(move |(at, _)| now - *at <= window)
                .map(|(_, r)| *r)
        };
        // Scale down only to the highest recommendation of the window; up only to the lowest.
        let down_floor = within(policy.scale_down_window)
            .max()
            .unwrap_or(recommended);
        let up_ceiling = within(policy.scale_up_window).min().unwrap_or(recommended);
        let current_clamped = current.clamp(min, max);
        let replicas = if recommended > current_clamped {
            up_ceiling.max(current_clamped)
        } else if recommended < current_clamped {
            down_floor.min(current_clamped)
        } else {
            current_clamped
        };
        let reason = if replicas > current {
            Reason::ScaleUp
        } else if replicas < current {
            Reason::ScaleDown
        } else if recommended != current {
            Reason::Stabilizing
        } else {
            Reason::Steady
        };
        Decision { replicas, reason }
    }
}

/// The raw HPA recommendation before clamping and stabilization.
fn recommend(depth: i64, current: i32, target: i64) -> i32 {
    let target = target.max(1) as f64;
    let depth = depth.max(0) as f64;
    if current > 0 {
        let ratio = depth / current as f64 / target;
        if (ratio - 1.0).abs() <= TOLERANCE {
            return current;
        }
    }
    let desired = (depth / target).ceil();
    if desired > f64::from(i32::MAX) {
        i32::MAX
    } else {
        desired as i32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            min: 1,
            max: 10,
            target_per_worker: 1000,
            scale_up_window: Duration::zero(),
            scale_down_window: Duration::seconds(300),
        }
    }

    fn t(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    /// Runs a sequence of (time, current replicas, depth) and returns the decisions.
    fn run(policy: &Policy, steps: &[(i64, i32, Option<i64>)]) -> Vec<Decision> {
        let mut scaler = Scaler::default();
        steps
            .iter()
            .map(|&(at, current, depth)| {
                let observation = depth.map_or(
                    Observation::Unavailable("connection refused".into()),
                    Observation::Depth,
                );
                scaler.decide(t(at), current, &observation, policy)
            })
            .collect()
    }

    fn replicas(decisions: &[Decision]) -> Vec<i32> {
        decisions.iter().map(|d| d.replicas).collect()
    }

    /// Steady load at the target: nothing moves, even with ±10 % noise.
    #[test]
    fn steady_load_within_tolerance_keeps_replicas() {
        let d = run(
            &policy(),
            &[
                (0, 3, Some(3000)),
                (15, 3, Some(3250)),
                (30, 3, Some(2750)),
                (45, 3, Some(3000)),
            ],
        );
        assert_eq!(replicas(&d), [3, 3, 3, 3]);
        assert!(d.iter().all(|d| d.reason == Reason::Steady));
    }

    /// A burst scales up at once, to ceil(depth / target), capped at max.
    #[test]
    fn burst_scales_up_immediately_and_caps_at_max() {
        let d = run(
            &policy(),
            &[
                (0, 1, Some(500)),
                (15, 1, Some(4500)),
                (30, 5, Some(50_000)),
            ],
        );
        assert_eq!(replicas(&d), [1, 5, 10]);
        assert_eq!(d[1].reason, Reason::ScaleUp);
    }

    /// Draining: replicas go down only once no recommendation of the last window (300 s) asked
    /// for more — here after the last high reading at t=0 has aged out — and never below min.
    #[test]
    fn drain_scales_down_after_the_window_and_not_below_min() {
        let d = run(
            &policy(),
            &[
                (0, 8, Some(8000)),
                (60, 8, Some(0)),
                (200, 8, Some(0)),
                (301, 8, Some(0)),
                (361, 8, Some(0)),
            ],
        );
        assert_eq!(replicas(&d), [8, 8, 8, 1, 1]);
        assert_eq!(
            (d[1].reason, d[2].reason),
            (Reason::Stabilizing, Reason::Stabilizing)
        );
        assert_eq!(d[3].reason, Reason::ScaleDown);
    }

    /// Min 0 drains to zero, and any depth brings one worker back.
    #[test]
    fn min_zero_drains_to_zero_and_wakes_up() {
        let p = Policy {
            min: 0,
            scale_down_window: Duration::zero(),
            ..policy()
        };
        let d = run(&p, &[(0, 2, Some(0)), (15, 0, Some(0)), (30, 0, Some(1))]);
        assert_eq!(replicas(&d), [0, 0, 1]);
    }

    /// Flapping depth does not flap the replicas: the scale-down window holds the highest.
    #[test]
    fn flapping_input_does_not_flap_replicas() {
        let steps: Vec<(i64, i32, Option<i64>)> = (0..20)
            .map(|i| (i * 15, 6, Some(if i % 2 == 0 { 6000 } else { 1000 })))
            .collect();
        let d = run(&policy(), &steps);
        assert!(replicas(&d).iter().all(|r| *r == 6), "{:?}", replicas(&d));
    }

    /// Out-of-bounds current replicas are brought back inside min/max.
    #[test]
    fn clamps_apply_to_current_replicas_too() {
        let p = Policy {
            min: 2,
            max: 4,
            ..policy()
        };
        assert_eq!(replicas(&run(&p, &[(0, 9, Some(4000))])), [4]);
        assert_eq!(replicas(&run(&p, &[(0, 0, Some(0))])), [2]);
    }

    /// Broker unreachable: hold the replicas and say so.
    #[test]
    fn unreachable_broker_holds_replicas() {
        let d = run(
            &policy(),
            &[(0, 4, Some(4000)), (15, 4, None), (30, 4, None)],
        );
        assert_eq!(replicas(&d), [4, 4, 4]);
        assert_eq!(d[1].reason, Reason::BrokerUnreachable);
    }

    /// A scale-up window makes scale-up wait for sustained load too.
    #[test]
    fn scale_up_window_needs_sustained_load() {
        let p = Policy {
            scale_up_window: Duration::seconds(60),
            ..policy()
        };
        let d = run(
            &p,
            &[
                (0, 2, Some(2000)),
                (15, 2, Some(8000)),
                (45, 2, Some(8000)),
                (76, 2, Some(8000)),
            ],
        );
        assert_eq!(replicas(&d), [2, 2, 2, 8]);
    }

    /// A scaler rebuilt from a kept history honours the scale-down window as the one that
    /// made it would have: a restart does not scale straight down.
    #[test]
    fn a_rebuilt_scaler_keeps_its_window() {
        let policy = policy();
        let mut before = Scaler::default();
        assert_eq!(
            before
                .decide(t(0), 5, &Observation::Depth(5000), &policy)
                .replicas,
            5
        );
        let mut rebuilt = Scaler::from_history(before.history());
        let after = rebuilt.decide(t(60), 5, &Observation::Depth(100), &policy);
        assert_eq!((after.replicas, after.reason), (5, Reason::Stabilizing));
        let mut forgetful = Scaler::default();
        let fresh = forgetful.decide(t(60), 5, &Observation::Depth(100), &policy);
        assert_eq!(
            fresh.replicas, 1,
            "without the history it would scale down at once"
        );
        let later = rebuilt.decide(t(400), 5, &Observation::Depth(100), &policy);
        assert_eq!(later.replicas, 1, "past the window it scales down");
    }
}
