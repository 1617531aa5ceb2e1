//! The stability guard: after every iteration of the recurrence, each state row is checked for
//! non-finite values and for norm growth past a limit relative to the row's norm after the first
//! iteration. Loops pushed far past their training depth can diverge; the guard makes that
//! visible (or fatal, or bounded) instead of letting NaN reach the logits silently.

/// What to do when a row trips the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardMode {
    /// No checks.
    Off,
    /// Record the event (see `Session::guard_events`) and go on.
    Warn,
    /// Stop the call with `RuntimeError::Unstable`.
    Error,
    /// Rescale rows that grew past the limit back to it; restore non-finite rows from the
    /// previous iteration's state (the token stops changing). Events are recorded.
    Clamp,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Guard {
    pub mode: GuardMode,
    /// Largest allowed ‖s_t‖ / ‖s_1‖ for a row.
    pub max_growth: f32,
}

impl Default for Guard {
    fn default() -> Self {
        Guard {
            mode: GuardMode::Warn,
            max_growth: 1e4,
        }
    }
}

impl std::str::FromStr for Guard {
    type Err = String;
    /// `off`, `warn`, `error`, `clamp`, optionally `:GROWTH` (e.g. `clamp:100`).
    fn from_str(s: &str) -> Result<Self, String> {
        let (mode, growth) = s.split_once(':').map_or((s, None), |(a, b)| (a, Some(b)));
        let mode = match mode {
            "off" => GuardMode::Off,
            "warn" => GuardMode::Warn,
            "error" => GuardMode::Error,
            "clamp" => GuardMode::Clamp,
            other => {
                return Err(format!(
                    "unknown guard mode `{other}`; use off, warn, error or clamp[:GROWTH]"
                ))
            }
        };
        let max_growth = match growth {
            None => Guard::default().max_growth,
            Some(g) => match g.parse::<f32>() {
                Ok(v) if v.is_finite() && v > 1.0 => v,
                _ => return Err(format!("guard growth `{g}` must be a number > 1")),
            },
        };
        Ok(Guard { mode, max_growth })
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EventKind {
    NonFinite,
    /// The row's norm grew by this factor relative to its first iteration.
    Growth(f32),
}

/// One guard event: iteration (0-based), absolute token position, what happened.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuardEvent {
    pub iteration: usize,
    pub position: usize,
    pub kind: EventKind,
}

impl std::fmt::Display for GuardEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            EventKind::NonFinite => write!(
                f,
                "iteration {}, token at position {}: the recurrent state became non-finite (NaN or inf)",
                self.iteration + 1,
                self.position
            ),
            EventKind::Growth(g) => write!(
                f,
                "iteration {}, token at position {}: the recurrent state's norm grew {g:.3e}× since the first iteration",
                self.iteration + 1,
                self.position
            ),
        }
    }
}

fn norm(row: &[f32]) -> f64 {
    row.iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt()
}

/// Check (and in clamp mode repair) the state rows after `iteration`. `rows` gives, for each
/// row held in `state`, its row in the call and its absolute position. `reference[call row]`
/// holds the row's norm after its first iteration (NaN until then). `prev` is the previous
/// state, used to restore non-finite rows. Returns the events of this iteration.
pub fn check(
    guard: &Guard,
    iteration: usize,
    rows: impl Iterator<Item = (usize, usize)>,
    state: &mut [f32],
    prev: &[f32],
    cols: usize,
    reference: &mut [f64],
) -> Vec<GuardEvent> {
    let mut events = vec![];
    if guard.mode == GuardMode::Off || cols == 0 {
        return events;
    }
    for ((i, row), (r, position)) in state.chunks_mut(cols).enumerate().zip(rows) {
        let n = norm(row);
        let kind = if !n.is_finite() {
            EventKind::NonFinite
        } else {
            if reference[r].is_nan() {
                reference[r] = n;
                continue;
            }
            let growth = n / reference[r].max(f64::MIN_POSITIVE);
            if growth <= guard.max_growth as f64 || reference[r] == 0.0 {
                continue;
            }
            EventKind::Growth(growth as f32)
        };
        events.push(GuardEvent {
            iteration,
            position,
            kind,
        });
        if guard.mode == GuardMode::Clamp {
            match kind {
                EventKind::NonFinite => row.copy_from_slice(&prev[i * cols..(i + 1) * cols]),
                EventKind::Growth(_) => {
                    let scale = (guard.max_growth as f64 * reference[r] / n) as f32;
                    row.iter_mut().for_each(|x| *x *= scale);
                }
            }
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_modes_and_growth() {
        assert_eq!("off".parse::<Guard>().unwrap().mode, GuardMode::Off);
        assert_eq!(
            "clamp:100".parse::<Guard>().unwrap(),
            Guard {
                mode: GuardMode::Clamp,
                max_growth: 100.0
            }
        );
        assert!("clamp:0.5".parse::<Guard>().is_err());
        assert!("loud".parse::<Guard>().is_err());
    }

    #[test]
    fn flags_non_finite_and_growth_with_positions() {
        let g = Guard {
            mode: GuardMode::Warn,
            max_growth: 10.0,
        };
        let mut refn = vec![f64::NAN; 2];
        let mut s = vec![1.0, 0.0, 0.0, 1.0];
        assert!(check(
            &g,
            0,
            [(0, 5), (1, 6)].into_iter(),
            &mut s,
            &[0.0; 4],
            2,
            &mut refn
        )
        .is_empty());
        let mut s2 = vec![f32::NAN, 0.0, 0.0, 50.0];
        let ev = check(
            &g,
            3,
            [(0, 5), (1, 6)].into_iter(),
            &mut s2,
            &s,
            2,
            &mut refn,
        );
        assert_eq!(ev.len(), 2);
        assert_eq!(
            (ev[0].iteration, ev[0].position, ev[0].kind),
            (3, 5, EventKind::NonFinite)
        );
        assert_eq!((ev[1].position, ev[1].kind), (6, EventKind::Growth(50.0)));
        assert!(s2[0].is_nan(), "warn mode leaves the state alone");
    }

    #[test]
    fn clamp_restores_and_rescales() {
        let g = Guard {
            mode: GuardMode::Clamp,
            max_growth: 10.0,
        };
        let mut refn = vec![f64::NAN; 2];
        let mut s = vec![3.0, 4.0, 0.0, 1.0];
        check(
            &g,
            0,
            [(0, 0), (1, 1)].into_iter(),
            &mut s,
            &[0.0; 4],
            2,
            &mut refn,
        );
        let prev = s.clone();
        let mut s2 = vec![f32::INFINITY, 1.0, 0.0, 1000.0];
        check(
            &g,
            1,
            [(0, 0), (1, 1)].into_iter(),
            &mut s2,
            &prev,
            2,
            &mut refn,
        );
        assert_eq!(
            &s2[..2],
            &[3.0, 4.0],
            "non-finite row restored from the previous state"
        );
        assert!(
            (s2[3] - 10.0).abs() < 1e-4,
            "grown row rescaled to 10× its first norm: {}",
            s2[3]
        );
    }
}
