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
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt() as f32
}

fn norm(a: &[f32]) -> f32 {
    a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt() as f32
}

/// Statistics of one row given its previous state.
pub fn step(iteration: usize, position: usize, state: &[f32], prev: &[f32]) -> TraceStep {
    let n = norm(state);
    let np = norm(prev);
    let dot: f64 = state
        .iter()
        .zip(prev)
        .map(|(a, b)| *a as f64 * *b as f64)
        .sum();
    TraceStep {
        iteration,
        position,
        norm: n,
        rel_update: if n > 0.0 { dist(state, prev) / n } else { 0.0 },
        cosine: if n > 0.0 && np > 0.0 {
            (dot / (n as f64 * np as f64)) as f32
        } else {
            0.0
        },
        state: state.to_vec(),
    }
}

/// Classify one token's trajectory (its steps in iteration order): a fixed point when the last
/// relative update is below `tol`, else the smallest period p ≤ `max_period` with
/// ‖s_T − s_{T−p}‖ / ‖s_T‖ < `tol`.
pub fn analyze(steps: &[&TraceStep], tol: f32, max_period: usize) -> Settled {
    let Some(last) = steps.last() else {
        return Settled::Moving {
            rel_update: f32::NAN,
        };
    };
    if last.rel_update < tol {
        return Settled::FixedPoint {
            distance: last.rel_update,
        };
    }
    let n = last.norm.max(f32::MIN_POSITIVE);
    for p in 2..=max_period {
        if steps.len() > p {
            let d = dist(&last.state, &steps[steps.len() - 1 - p].state) / n;
            if d < tol {
                return Settled::Cycle {
                    period: p,
                    distance: d,
                };
            }
        }
    }
    Settled::Moving {
        rel_update: last.rel_update,
    }
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
        assert!(matches!(
            analyze(&fixed.iter().collect::<Vec<_>>(), 1e-3, 4),
            Settled::FixedPoint { .. }
        ));
        let cyc = traj(&[
            [1.0, 0.0],
            [0.0, 1.0],
            [-1.0, 0.0],
            [1.0, 0.0],
            [0.0, 1.0],
            [-1.0, 0.0],
        ]);
        assert_eq!(
            analyze(&cyc.iter().collect::<Vec<_>>(), 1e-3, 4),
            Settled::Cycle {
                period: 3,
                distance: 0.0
            }
        );
        let moving = traj(&[[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]);
        assert!(matches!(
            analyze(&moving.iter().collect::<Vec<_>>(), 1e-3, 4),
            Settled::Moving { .. }
        ));
        assert!((cyc[1].cosine - 0.0).abs() < 1e-6 && (fixed[2].cosine - 1.0).abs() < 1e-6);
    }
}

/// Principal components of a set of states (rows of `x`, `n × d`): the top `k` directions of the
/// centered data by power iteration with deflation on the covariance, and each row's coordinates
/// along them. Directions are normalized with their largest-magnitude entry positive, so the
/// result is unique up to ties. Returns `(components k × d, projections n × k, variances k)`.
pub fn pca(x: &[f32], n: usize, d: usize, k: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let k = k.min(d).min(n);
    let mut mean = vec![0.0f64; d];
    for r in 0..n {
        for c in 0..d {
            mean[c] += x[r * d + c] as f64 / n as f64;
        }
    }
    let xc: Vec<f64> = (0..n * d).map(|i| x[i] as f64 - mean[i % d]).collect();
    let mut cov = vec![0.0f64; d * d];
    for r in 0..n {
        let row = &xc[r * d..(r + 1) * d];
        for i in 0..d {
            if row[i] == 0.0 {
                continue;
            }
            for j in 0..d {
                cov[i * d + j] += row[i] * row[j];
            }
        }
    }
    let mut comps = vec![0.0f64; k * d];
    let mut vars = vec![0.0f64; k];
    for c in 0..k {
        // Deterministic start that is not orthogonal to any axis.
        let mut v: Vec<f64> = (0..d).map(|i| 1.0 + (i as f64 * 0.618).fract()).collect();
        let mut lambda = 0.0;
        for _ in 0..500 {
            let mut w = vec![0.0f64; d];
            for i in 0..d {
                w[i] = (0..d).map(|j| cov[i * d + j] * v[j]).sum();
            }
            let nw = w.iter().map(|a| a * a).sum::<f64>().sqrt();
            if nw == 0.0 {
                break;
            }
            let next: Vec<f64> = w.iter().map(|a| a / nw).collect();
            let delta: f64 = next.iter().zip(&v).map(|(a, b)| (a - b).abs()).sum();
            v = next;
            lambda = nw;
            if delta < 1e-13 {
                break;
            }
        }
        let imax = (0..d)
            .max_by(|&a, &b| v[a].abs().total_cmp(&v[b].abs()))
            .unwrap_or(0);
        if v[imax] < 0.0 {
            v.iter_mut().for_each(|a| *a = -*a);
        }
        // Deflate: remove this direction's variance before finding the next.
        for i in 0..d {
            for j in 0..d {
                cov[i * d + j] -= lambda * v[i] * v[j];
            }
        }
        comps[c * d..(c + 1) * d].copy_from_slice(&v);
        vars[c] = lambda / n.max(1) as f64;
    }
    let mut proj = vec![0.0f64; n * k];
    for r in 0..n {
        for c in 0..k {
            proj[r * k + c] = (0..d).map(|i| xc[r * d + i] * comps[c * d + i]).sum();
        }
    }
    (comps, proj, vars)
}
