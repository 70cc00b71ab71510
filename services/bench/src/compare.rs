//! A/B comparison of two builds: the same load against the baseline's binaries and the
//! candidate's, alternately, and every figure reported as the candidate's ratio to the
//! baseline per pair, with the median and the spread. CPU per event and ratios measured this
//! way are what compare across builds; absolute rates from different hours do not.
//!
//! The order within a pair alternates too (A B, B A, A B, …): a run leaves work behind for
//! the next (the servers' background writing, a machine drifting slower over the minutes), and
//! with a fixed order all of it would fall on the second build. Each run also starts after a
//! PostgreSQL `CHECKPOINT` (see `run_pipeline`).

use serde::Serialize;

use crate::report::RunFigures;
use crate::{RunOptions, run_pipeline};

/// One figure of both builds over every pair.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub name: &'static str,
    /// Whether a smaller value is better (CPU, latency, memory).
    pub lower_is_better: bool,
    pub baseline: Vec<f64>,
    pub candidate: Vec<f64>,
}

impl Figure {
    /// Candidate / baseline, pair by pair (`NaN` where the baseline is 0).
    pub fn ratios(&self) -> Vec<f64> {
        self.baseline
            .iter()
            .zip(&self.candidate)
            .map(|(a, b)| if *a == 0.0 { f64::NAN } else { b / a })
            .collect()
    }
}

/// The comparison's result.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub pairs: usize,
    pub figures: Vec<Figure>,
    /// Every run's correctness held.
    pub ok: bool,
}

/// The figures compared, from one run. CPU per event counts every event sent (unique and
/// repeats); "whole box" is ingest + worker + the three servers (not the load generator).
fn figures(run: &RunFigures) -> Vec<(&'static str, bool, f64)> {
    let events = (run.correctness.unique_sent + run.correctness.duplicates_sent).max(1) as f64;
    let us = |seconds: f64| seconds * 1e6 / events;
    let servers = run.servers_cpu.as_ref();
    let server = |f: fn(&crate::services::ServerCpu) -> f64| servers.map_or(f64::NAN, |c| us(f(c)));
    let whole = us(run.ingest.cpu_seconds + run.worker.cpu_seconds)
        + server(|c| c.postgresql_s + c.redis_s + c.rabbitmq_s);
    vec![
        ("end-to-end events/s", false, run.end_to_end_events_per_s),
        ("CPU µs/event, whole box", true, whole),
        ("CPU µs/event, ingest", true, us(run.ingest.cpu_seconds)),
        ("CPU µs/event, worker", true, us(run.worker.cpu_seconds)),
        ("CPU µs/event, PostgreSQL", true, server(|c| c.postgresql_s)),
        ("CPU µs/event, Redis", true, server(|c| c.redis_s)),
        ("CPU µs/event, RabbitMQ", true, server(|c| c.rabbitmq_s)),
        ("latency p50 ms", true, run.latency.p50_ms),
        ("latency p99 ms", true, run.latency.p99_ms),
        ("ingest peak RSS MiB", true, run.ingest.peak_rss_mib),
        ("worker peak RSS MiB", true, run.worker.peak_rss_mib),
        (
            "Redis bytes per remembered event",
            true,
            run.redis_bytes_per_key.unwrap_or(f64::NAN),
        ),
    ]
}

/// Runs `pairs` pairs, the baseline first in odd pairs and second in even ones, and collects
/// every figure.
pub async fn run(
    baseline: RunOptions,
    candidate: RunOptions,
    pairs: usize,
    name: &str,
) -> anyhow::Result<Comparison> {
    let mut comparison = Comparison {
        pairs,
        figures: Vec::new(),
        ok: true,
    };
    for pair in 1..=pairs {
        for side in run_order(pair) {
            let options = if side == "baseline" {
                &baseline
            } else {
                &candidate
            };
            eprintln!("compare: pair {pair} of {pairs}, {side}");
            // Names of one length: the name prefixes every Redis key, and a longer key can
            // cross an allocator size class and change the bytes per key by ~10 %.
            let run =
                run_pipeline(options.clone(), &format!("{name}_{}_{pair}", &side[..4])).await?;
            comparison.ok &= run.correctness.ok;
            if !run.correctness.ok {
                eprintln!(
                    "compare: {side} failed its correctness check: {:?}",
                    run.correctness
                );
            }
            comparison.add(side == "candidate", &run);
        }
    }
    Ok(comparison)
}

/// The two builds in the order pair `pair` (counted from 1) runs them: the baseline first in
/// odd pairs, second in even ones.
fn run_order(pair: usize) -> [&'static str; 2] {
    if pair % 2 == 1 {
        ["baseline", "candidate"]
    } else {
        ["candidate", "baseline"]
    }
}

impl Comparison {
    fn add(&mut self, candidate: bool, run: &RunFigures) {
        for (i, (name, lower_is_better, value)) in figures(run).into_iter().enumerate() {
            if self.figures.len() <= i {
                self.figures.push(Figure {
                    name,
                    lower_is_better,
                    baseline: Vec::new(),
                    candidate: Vec::new(),
                });
            }
            let figure = &mut self.figures[i];
            if candidate {
                figure.candidate.push(value);
            } else {
                figure.baseline.push(value);
            }
        }
    }

    /// The table: each figure's values per pair, and the ratio's median, range and geometric
    /// mean over every pair (with an even number of pairs, each build first in half of them,
    /// the order's effect cancels in it).
    pub fn markdown(&self) -> String {
        let mut md = format!(
            "| Figure ({} pairs, baseline → candidate per pair; the baseline ran first in odd pairs) | Values | Candidate / baseline: median (range); geometric mean |\n|---|---|---|\n",
            self.pairs
        );
        for f in &self.figures {
            let values: Vec<String> = f
                .baseline
                .iter()
                .zip(&f.candidate)
                .map(|(a, b)| format!("{} → {}", short(*a), short(*b)))
                .collect();
            let mut ratios: Vec<f64> = f.ratios().into_iter().filter(|r| r.is_finite()).collect();
            ratios.sort_by(f64::total_cmp);
            let summary = match (ratios.first(), ratios.last(), median_ratio(&ratios)) {
                (Some(low), Some(high), Some(median)) => format!(
                    "**{median:.3}** ({low:.3}–{high:.3}); {:.3}{}",
                    geometric_mean(&ratios),
                    if f.lower_is_better {
                        ", lower is better"
                    } else {
                        ""
                    }
                ),
                _ => "—".to_owned(),
            };
            md += &format!("| {} | {} | {summary} |\n", f.name, values.join(", "));
        }
        if !self.ok {
            md += "\n**A run failed its correctness check: the comparison proves nothing.**\n";
        }
        md
    }
}

/// The median of sorted ratios; with an even count, the geometric mean of the middle two.
/// With the order alternating, a run that gains from going second puts half the pairs above
/// the true ratio and half below it: the upper middle alone would be one of the biased halves.
fn median_ratio(sorted: &[f64]) -> Option<f64> {
    let mid = sorted.len() / 2;
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[mid]),
        _ => Some((sorted[mid - 1] * sorted[mid]).sqrt()),
    }
}

/// The geometric mean of positive ratios (the mean of their logarithms): ×2 and ×0.5 average
/// to ×1.
fn geometric_mean(ratios: &[f64]) -> f64 {
    (ratios.iter().map(|r| r.ln()).sum::<f64>() / ratios.len() as f64).exp()
}

fn short(value: f64) -> String {
    if !value.is_finite() {
        "—".to_owned()
    } else if value >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ratios are candidate over baseline per pair; the table shows their median and range,
    /// and a failed run is called out.
    #[test]
    fn ratios_median_and_range() {
        let mut c = Comparison {
            pairs: 3,
            figures: vec![Figure {
                name: "CPU µs/event, ingest",
                lower_is_better: true,
                baseline: vec![40.0, 50.0, 44.0],
                candidate: vec![20.0, 30.0, 22.0],
            }],
            ok: true,
        };
        assert_eq!(c.figures[0].ratios(), [0.5, 0.6, 0.5]);
        let md = c.markdown();
        assert!(
            md.contains("| CPU µs/event, ingest | 40.0 → 20.0, 50.0 → 30.0, 44.0 → 22.0 | **0.500** (0.500–0.600); 0.531, lower is better |"),
            "{md}"
        );
        c.ok = false;
        assert!(c.markdown().contains("proves nothing"));
    }

    /// Four pairs where going second is worth ×0.8 on a true ratio of 1.0: the ratios are
    /// 0.8, 1.25, 0.8, 1.25 (+ noise). The median is the middle two's geometric mean, ~1.0,
    /// not the upper middle (1.25); so is the geometric mean of all four.
    #[test]
    fn an_even_number_of_pairs_has_the_middle_twos_median() {
        let c = Comparison {
            pairs: 4,
            figures: vec![Figure {
                name: "CPU µs/event, whole box",
                lower_is_better: true,
                baseline: vec![100.0, 80.0, 100.0, 80.0],
                candidate: vec![80.0, 100.0, 81.0, 101.0],
            }],
            ok: true,
        };
        let md = c.markdown();
        assert!(md.contains("**1.006** (0.800–1.262); 1.006"), "{md}");
        assert!((geometric_mean(&[2.0, 0.5]) - 1.0).abs() < 1e-12);
        assert_eq!(median_ratio(&[]), None);
        assert_eq!(median_ratio(&[0.5, 0.7, 2.0]), Some(0.7));
        assert_eq!(median_ratio(&[0.5, 2.0]), Some(1.0));
    }

    /// Each build runs first in every other pair, so over an even number of pairs what a run
    /// leaves for the next falls on both builds equally.
    #[test]
    fn the_order_within_a_pair_alternates() {
        let orders: Vec<_> = (1..=4).map(run_order).collect();
        assert_eq!(
            orders,
            [
                ["baseline", "candidate"],
                ["candidate", "baseline"],
                ["baseline", "candidate"],
                ["candidate", "baseline"],
            ]
        );
    }
}
