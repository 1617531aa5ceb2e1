//! Recording what the loop does: with tracing on, every iteration appends, for every row it
//! computed, the state itself and its norm, relative update and cosine to the previous state.
//! `analyze` then finds, per token, whether the trajectory settled on a fixed point or a short
//! cycle (the behaviour the mechanistic analyses of looped models describe).

/// One token's state after one iteration.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceStep {
    /// 0-based iteration.
    pub iteration: usize,
    /// Absolute position of the token.
    pub position: usize,
    pub norm: f32,
    /// ‖s_t − s_{t−1}‖ / ‖s_t‖ (s_{−1} is the initial state).
    pub rel_update: f32,
    /// cos(s_t, s_{t−1}); 0 when either is zero.
    pub cosine: f32,
    pub state: Vec<f32>,
}

/// Where a token's trajectory ended up.
#[derive(Debug, Clone, PartialEq)]
pub enum Settled {
    /// The last update is below the tolerance.
    FixedPoint { distance: f32 },
    /// The state returns to where it was `period` iterations earlier (period ≥ 2).
    Cycle { period: usize, distance: f32 },
    /// Neither, within the recorded iterations.
    Moving { rel_update: f32 },
}

fn dist(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt() as f32
}

fn norm(a: &[f32]) -> f32 {
    a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt() as f32
}

/// Statistics of one row given its previous state.
pub fn step(iteration: usize, position: usize, state: &[f32], prev: &[f32]) -> TraceStep {
    let n = norm(state);
    let np = norm(prev);
    let dot: f64 = state.iter().zip(prev).map(|(a, b)| *a as f64 * *b as f64).sum();
    TraceStep {
        iteration,
        position,
        norm: n,
        rel_update: if n > 0.0 { dist(state, prev) / n } else { 0.0 },
        cosine: if n > 0.0 && np > 0.0 { (dot / (n as f64 * np as f64)) as f32 } else { 0.0 },
        state: state.to_vec(),
    }
}

/// Classify one token's trajectory (its steps in iteration order): a fixed point when the last
/// relative update is below `tol`, else the smallest period p ≤ `max_period` with
/// ‖s_T − s_{T−p}‖ / ‖s_T‖ < `tol`.
pub fn analyze(steps: &[&TraceStep], tol: f32, max_period: usize) -> Settled {
    let Some(last) = steps.last() else { return Settled::Moving { rel_update: f32::NAN } };
    if last.rel_update < tol {
        return Settled::FixedPoint { distance: last.rel_update };
    }
    let n = last.norm.max(f32::MIN_POSITIVE);
    for p in 2..=max_period {
        if steps.len() > p {
            let d = dist(&last.state, &steps[steps.len() - 1 - p].state) / n;
            if d < tol {
                return Settled::Cycle { period: p, distance: d };
            }
        }
    }
    Settled::Moving { rel_update: last.rel_update }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn traj(states: &[[f32; 2]]) -> Vec<TraceStep> {
        let mut prev = [0.0f32; 2];
        states
            .iter()
            .enumerate()
            .map(|(t, s)| {
                let st = step(t, 0, s, &prev);
                prev = *s;
                st
            })
            .collect()
    }

    #[test]
    fn finds_fixed_points_and_cycles() {
        let fixed = traj(&[[1.0, 0.0], [2.0, 1.0], [2.0, 1.0]]);
        assert!(matches!(analyze(&fixed.iter().collect::<Vec<_>>(), 1e-3, 4), Settled::FixedPoint { .. }));
        let cyc = traj(&[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]);
        assert_eq!(analyze(&cyc.iter().collect::<Vec<_>>(), 1e-3, 4), Settled::Cycle { period: 3, distance: 0.0 });
        let moving = traj(&[[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]);
        assert!(matches!(analyze(&moving.iter().collect::<Vec<_>>(), 1e-3, 4), Settled::Moving { .. }));
        assert!((cyc[1].cosine - 0.0).abs() < 1e-6 && (fixed[2].cosine - 1.0).abs() < 1e-6);
    }
}
