//! How many workers a pipeline should run, decided the way the Kubernetes HPA decides for an
//! average-value target: `ceil(depth / target per worker)`, no change within a 10 % tolerance,
//! clamped to min/max, with stabilization windows — the highest recommendation of the
//! scale-down window wins (so a dip must last the whole window before workers go), and the
//! lowest of the scale-up window (0 s by default: scale up at once). With a minimum of zero an
//! activation threshold decides between none and some; a scale-up limit caps growth per
//! period as the HPA's scale-up policies do. Pure: time is a parameter.

use std::collections::VecDeque;

use chrono::{DateTime, Duration, Utc};

/// Relative change below which the replica count is left alone.
pub const TOLERANCE: f64 = 0.1;

/// The scaling bounds and target of one pipeline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub min: i32,
    pub max: i32,
    /// The metric's value one worker is sized for (messages queued, or published per second).
    pub target_per_worker: i64,
    pub scale_up_window: Duration,
    pub scale_down_window: Duration,
    /// With `min` 0: the metric must exceed this for any worker to run.
    pub activation: i64,
    pub scale_up_limit: Option<ScaleUpLimit>,
}

/// At most `pods` more, or `percent` more, whichever allows more (at least one), per `period`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaleUpLimit {
    pub pods: i32,
    pub percent: i32,
    pub period: Duration,
}

/// What the operator could read of the queue.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// Ready plus unacknowledged messages.
    Depth(i64),
    /// Messages published per second (the `messageRate` metric).
    Rate(f64),
    /// The broker could not be read: why.
    Unavailable(String),
    /// Not read: the replicas are KEDA's or the user's to set.
    External,
}

impl Observation {
    /// The metric's value, if one was read.
    fn value(&self) -> Option<f64> {
        match self {
            Observation::Depth(d) => Some(*d as f64),
            Observation::Rate(r) => Some(*r),
            Observation::Unavailable(_) | Observation::External => None,
        }
    }
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
    /// KEDA or the user sets the replicas (autoscaling mode `keda` or `none`).
    External,
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
    /// Replicas running at each decision, for the scale-up limit's period (not kept across
    /// restarts: a restarted operator counts the period from the replicas it finds).
    running: VecDeque<(DateTime<Utc>, i32)>,
}

impl Scaler {
    /// A scaler that remembers `history` (recommendations and when they were made), as the
    /// pipeline's status kept them: a restarted operator keeps its stabilization windows.
    pub fn from_history(history: impl IntoIterator<Item = (DateTime<Utc>, i32)>) -> Self {
        let mut history: Vec<_> = history.into_iter().collect();
        history.sort_by_key(|(at, _)| *at);
        Self {
            history: history.into(),
            running: VecDeque::new(),
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
        let Some(value) = observation.value() else {
            return Decision {
                replicas: current.clamp(policy.min, policy.max.max(policy.min)),
                reason: match observation {
                    Observation::External => Reason::External,
                    _ => Reason::BrokerUnreachable,
                },
            };
        };
        let (min, max) = (policy.min.max(0), policy.max.max(policy.min.max(0)));
        let raw = if min == 0 && value <= policy.activation as f64 {
            0
        } else {
            recommend(value, current, policy.target_per_worker).max(1)
        };
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
        self.running.push_back((now, current_clamped));
        let period = policy.scale_up_limit.map_or(Duration::zero(), |l| l.period);
        while self
            .running
            .front()
            .is_some_and(|(at, _)| now - *at > period)
        {
            self.running.pop_front();
        }
        let replicas = if recommended > current_clamped {
            self.limit_growth(current_clamped, up_ceiling.max(current_clamped), policy)
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

    /// `wanted` capped by the scale-up limit: the growth allowed from the fewest replicas
    /// running within the limit's period (those at its start, as the HPA counts).
    fn limit_growth(&self, current: i32, wanted: i32, policy: &Policy) -> i32 {
        let Some(limit) = policy.scale_up_limit else {
            return wanted;
        };
        let base = self.running.iter().map(|(_, r)| *r).fold(current, i32::min);
        let by_percent =
            (f64::from(base) * (1.0 + f64::from(limit.percent.max(0)) / 100.0)).ceil() as i32;
        let allowed = (base.saturating_add(limit.pods.max(0)))
            .max(by_percent)
            .max(base.saturating_add(1));
        wanted.min(allowed).max(current)
    }
}

/// The raw HPA recommendation before clamping and stabilization.
fn recommend(value: f64, current: i32, target: i64) -> i32 {
    let target = target.max(1) as f64;
    let depth = value.max(0.0);
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
            activation: 0,
            scale_up_limit: None,
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

    /// With a minimum of zero, the first worker starts only above the activation threshold,
    /// and the last stops at or below it; above it the target decides as usual.
    #[test]
    fn activation_decides_between_none_and_some() {
        let p = Policy {
            min: 0,
            activation: 50,
            scale_down_window: Duration::zero(),
            ..policy()
        };
        let d = run(
            &p,
            &[
                (0, 0, Some(50)),
                (15, 0, Some(51)),
                (30, 1, Some(3000)),
                (45, 3, Some(40)),
            ],
        );
        assert_eq!(replicas(&d), [0, 1, 3, 0]);
        // With a minimum above zero the threshold means nothing.
        let d = run(&Policy { min: 1, ..p }, &[(0, 1, Some(10))]);
        assert_eq!(replicas(&d), [1]);
    }

    /// A scale-up limit caps growth per period from the replicas at the period's start:
    /// 4 pods or 50 %, whichever allows more.
    #[test]
    fn scale_up_limit_caps_growth_per_period() {
        let p = Policy {
            max: 100,
            scale_up_limit: Some(ScaleUpLimit {
                pods: 4,
                percent: 50,
                period: Duration::seconds(60),
            }),
            ..policy()
        };
        let d = run(
            &p,
            &[
                // 2 → 6 (2 + 4 beats 2 × 1.5), then held within the same period.
                (0, 2, Some(50_000)),
                (15, 6, Some(50_000)),
                (45, 6, Some(50_000)),
                // The period moved on from 2: from 6, 6 + 4 = 10 beats 9.
                (75, 6, Some(50_000)),
                // From 10 (the period's start), 50 % (15) beats + 4 (14).
                (140, 10, Some(50_000)),
            ],
        );
        assert_eq!(replicas(&d), [6, 6, 6, 10, 15]);
        // Down is not limited, and a limit of nothing still allows one more.
        let p = Policy {
            scale_down_window: Duration::zero(),
            scale_up_limit: Some(ScaleUpLimit {
                pods: 0,
                percent: 0,
                period: Duration::seconds(60),
            }),
            ..p
        };
        let d = run(&p, &[(0, 20, Some(1000)), (15, 1, Some(9000))]);
        assert_eq!(replicas(&d), [1, 2]);
    }

    /// The message-rate metric: published messages per second over the per-worker target.
    #[test]
    fn message_rate_scales_like_depth() {
        let p = Policy {
            target_per_worker: 200,
            ..policy()
        };
        let mut scaler = Scaler::default();
        let d = scaler.decide(t(0), 1, &Observation::Rate(1050.0), &p);
        assert_eq!((d.replicas, d.reason), (6, Reason::ScaleUp));
        let d = scaler.decide(t(15), 6, &Observation::External, &p);
        assert_eq!((d.replicas, d.reason), (6, Reason::External));
    }
}
