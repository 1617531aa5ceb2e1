//! `loopc eval`: accuracy of a model on a task file, by hop count × recurrence depth, and by hop
//! count under each per-token exit policy of the runtime (with a sweep of thresholds) against the
//! iterations it spent.
//!
//! A task file is JSON lines `{"tokens": [...], "answer": id, "hops": k}` (tools/multihop writes
//! them): the prediction is the argmax of the logits at the last prompt position.
use loopc_runtime::artifact::{Criterion, ExitPolicy};
use loopc_runtime::{Artifact, Model, Weights};
use std::collections::BTreeMap;

pub struct Item {
    pub tokens: Vec<u32>,
    pub answer: u32,
    pub hops: u32,
}

pub fn load_task(path: &std::path::Path) -> Result<Vec<Item>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("error: cannot read task `{}`: {e}", path.display()))?;
    let mut items = vec![];
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let bad = |what: &str| format!("error: {}:{}: {what}", path.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(&format!("not JSON: {e}")))?;
        let ids = |k: &str| -> Result<Vec<u32>, String> {
            v.get(k)
                .and_then(|x| x.as_array())
                .ok_or_else(|| bad(&format!("missing array `{k}`")))?
                .iter()
                .map(|t| {
                    t.as_u64()
                        .map(|t| t as u32)
                        .ok_or_else(|| bad(&format!("`{k}` holds a non-integer")))
                })
                .collect()
        };
        let num = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_u64())
                .ok_or_else(|| bad(&format!("missing integer `{k}`")))
        };
        let tokens = ids("tokens")?;
        if tokens.is_empty() {
            return Err(bad("`tokens` is empty"));
        }
        items.push(Item {
            tokens,
            answer: num("answer")? as u32,
            hops: num("hops").unwrap_or(0) as u32,
        });
    }
    if items.is_empty() {
        return Err(format!("error: task `{}` has no questions", path.display()));
    }
    Ok(items)
}

/// One way of choosing the depth: a fixed number of iterations, or a per-token exit criterion
/// with its threshold (and a cap).
#[derive(Clone, Debug, PartialEq)]
pub struct Setting {
    /// `fixed` or the criterion's name as the DSL spells it.
    pub policy: String,
    pub threshold: Option<f64>,
    /// The fixed depth, or the criterion's cap.
    pub steps: usize,
}

/// Per (setting, hops): correct, total, the answer tokens' iterations and all tokens' block
/// evaluations (summed over questions), and the tokens seen.
#[derive(Default, Clone, Copy)]
pub struct Cell {
    pub correct: usize,
    pub total: usize,
    pub answer_iters: usize,
    pub block_evals: usize,
    pub tokens: usize,
}

pub struct Table {
    pub settings: Vec<Setting>,
    pub cells: BTreeMap<(usize, u32), Cell>,
    /// Fixed depths, for the hops × depth grid.
    pub steps: Vec<usize>,
}

/// A named exit criterion and the thresholds the sweep tries.
pub type Policy = (&'static str, Criterion, &'static [f64]);

/// The criteria `--policies all` sweeps, with their thresholds: what each compares is in
/// `loopc_runtime::exit` (relative update, 1 − cos, KL from the previous step's distribution,
/// the same after min-p filtering, entropy change, and — stopping at or above the threshold —
/// the number of consecutive steps with an unchanged argmax).
pub const SWEEP: [Policy; 6] = [
    (
        "latent-diff",
        Criterion::LatentDiff,
        &[0.3, 0.1, 0.03, 0.01],
    ),
    ("cosine", Criterion::Cosine, &[1e-2, 1e-3, 1e-4, 1e-5]),
    ("kl", Criterion::Kl, &[1e-1, 1e-2, 1e-3, 1e-4]),
    ("minp-kl", Criterion::MinpKl, &[1e-1, 1e-2, 1e-3, 1e-4]),
    (
        "entropy-diff",
        Criterion::EntropyDiff,
        &[1e-1, 1e-2, 1e-3, 1e-4],
    ),
    (
        "argmax-stability",
        Criterion::ArgmaxStability,
        &[1.0, 2.0, 3.0, 4.0],
    ),
];

/// The policies named in `--policies` (`all`, `none`, or a comma list of [`SWEEP`] names).
pub fn parse_policies(list: &str) -> Result<Vec<Policy>, String> {
    match list.trim() {
        "none" | "" => Ok(vec![]),
        "all" => Ok(SWEEP.to_vec()),
        l => l
            .split(',')
            .map(|n| {
                SWEEP
                    .iter()
                    .find(|p| p.0 == n.trim())
                    .copied()
                    .ok_or_else(|| {
                        format!(
                            "error: --policies: unknown policy `{}`; use all, none or a list of {}",
                            n.trim(),
                            SWEEP.map(|p| p.0).join(", ")
                        )
                    })
            })
            .collect(),
    }
}

fn score(
    model: &Model,
    items: &[Item],
    steps: Option<usize>,
    si: usize,
    cells: &mut BTreeMap<(usize, u32), Cell>,
) -> Result<(), String> {
    let mut session = model.session();
    session.set_steps(steps);
    for it in items {
        session.reset();
        let logits = session
            .prefill_last(&it.tokens)
            .map_err(|e| format!("error: {e}"))?;
        let pred = loopc_runtime::argmax(logits.last_row());
        let depths = session.last_depths();
        let c = cells.entry((si, it.hops)).or_default();
        c.correct += usize::from(pred == it.answer);
        c.total += 1;
        c.answer_iters += depths.last().copied().unwrap_or(0);
        c.block_evals += depths.iter().sum::<usize>();
        c.tokens += it.tokens.len();
    }
    Ok(())
}

/// Score every fixed depth in `steps` on `model`, then every policy of `policies` with each of
/// its thresholds, capped at `cap` iterations, on the same artifact with its exit replaced.
pub fn evaluate(
    model: &Model,
    rebuild: Option<(&Artifact, &std::path::Path)>,
    items: &[Item],
    steps: &[usize],
    policies: &[(&str, Criterion, &[f64])],
    cap: usize,
    load: &loopc_runtime::LoadOptions,
) -> Result<Table, String> {
    let mut cells = BTreeMap::new();
    let mut settings = vec![];
    for &r in steps {
        settings.push(Setting {
            policy: "fixed".into(),
            threshold: None,
            steps: r,
        });
        score(model, items, Some(r), settings.len() - 1, &mut cells)?;
    }
    if !policies.is_empty() {
        let Some((artifact, weights)) = rebuild else {
            return Err("error: --policies needs the model's artifact".into());
        };
        if artifact.manifest.program.recur.is_none() {
            return Err("error: --policies: the model has no recurrence".into());
        }
        for &(name, criterion, thresholds) in policies {
            for &threshold in thresholds {
                let mut a = artifact.clone();
                if let Some(rec) = a.manifest.program.recur.as_mut() {
                    rec.exit = ExitPolicy::Criterion {
                        criterion,
                        threshold,
                        min_steps: 1,
                        every: 1,
                        max_steps: cap,
                    };
                }
                let w = Weights::open(weights).map_err(|e| format!("error: {e}"))?;
                let m = Model::with_options(a, w, load).map_err(|e| format!("error: {e}"))?;
                settings.push(Setting {
                    policy: name.into(),
                    threshold: Some(threshold),
                    steps: cap,
                });
                score(&m, items, None, settings.len() - 1, &mut cells)?;
            }
        }
    }
    Ok(Table {
        settings,
        cells,
        steps: steps.to_vec(),
    })
}

impl Table {
    fn hops(&self) -> Vec<u32> {
        let mut h: Vec<u32> = self.cells.keys().map(|k| k.1).collect();
        h.sort_unstable();
        h.dedup();
        h
    }

    fn acc(&self, si: usize, h: u32) -> Option<f64> {
        self.cells
            .get(&(si, h))
            .map(|c| c.correct as f64 / c.total as f64)
    }

    /// All hop counts of one setting together.
    fn total(&self, si: usize) -> Cell {
        let mut t = Cell::default();
        for (_, c) in self.cells.range((si, 0)..=(si, u32::MAX)) {
            t.correct += c.correct;
            t.total += c.total;
            t.answer_iters += c.answer_iters;
            t.block_evals += c.block_evals;
            t.tokens += c.tokens;
        }
        t
    }

    pub fn render(&self, format: &str) -> Result<String, String> {
        let mut s = String::new();
        let thr = |st: &Setting| st.threshold.map_or(String::new(), |t| format!("{t}"));
        match format {
            "table" => {
                s.push_str(&format!("{:>6} {:>6}", "hops", "n"));
                for r in &self.steps {
                    s.push_str(&format!(" {:>7}", format!("r={r}")));
                }
                s.push('\n');
                for h in self.hops() {
                    let n = self.cells.get(&(0, h)).map_or(0, |c| c.total);
                    s.push_str(&format!("{h:>6} {n:>6}"));
                    for si in 0..self.steps.len() {
                        s.push_str(&format!(" {:>7.3}", self.acc(si, h).unwrap_or(f64::NAN)));
                    }
                    s.push('\n');
                }
                if self.settings.len() > self.steps.len() {
                    // Fixed depths again next to the policies, so each row reads accuracy
                    // against the iterations it cost.
                    s.push_str(&format!(
                        "\n{:<17} {:>9} {:>5}",
                        "policy", "threshold", "cap"
                    ));
                    for h in self.hops() {
                        s.push_str(&format!(" {:>6}", format!("h={h}")));
                    }
                    s.push_str(&format!(
                        " {:>6} {:>8} {:>9}\n",
                        "all", "ans_iter", "blk/token"
                    ));
                    for (si, st) in self.settings.iter().enumerate() {
                        s.push_str(&format!("{:<17} {:>9} {:>5}", st.policy, thr(st), st.steps));
                        for h in self.hops() {
                            s.push_str(&format!(" {:>6.3}", self.acc(si, h).unwrap_or(f64::NAN)));
                        }
                        let t = self.total(si);
                        s.push_str(&format!(
                            " {:>6.3} {:>8.2} {:>9.2}\n",
                            t.correct as f64 / t.total.max(1) as f64,
                            t.answer_iters as f64 / t.total.max(1) as f64,
                            t.block_evals as f64 / t.tokens.max(1) as f64
                        ));
                    }
                }
            }
            "csv" => {
                s.push_str("policy,threshold,steps,hops,correct,total,accuracy,mean_iterations,block_evals_per_token\n");
                for (&(si, h), c) in &self.cells {
                    let st = &self.settings[si];
                    s.push_str(&format!(
                        "{},{},{},{h},{},{},{:.6},{:.4},{:.4}\n",
                        st.policy,
                        thr(st),
                        st.steps,
                        c.correct,
                        c.total,
                        c.correct as f64 / c.total as f64,
                        c.answer_iters as f64 / c.total as f64,
                        c.block_evals as f64 / c.tokens.max(1) as f64
                    ));
                }
            }
            "json" => {
                let rows: Vec<serde_json::Value> = self
                    .cells
                    .iter()
                    .map(|(&(si, h), c)| {
                        let st = &self.settings[si];
                        serde_json::json!({"policy": st.policy, "threshold": st.threshold, "steps": st.steps,
                            "hops": h, "correct": c.correct, "total": c.total,
                            "accuracy": c.correct as f64 / c.total as f64,
                            "mean_iterations": c.answer_iters as f64 / c.total as f64,
                            "block_evals_per_token": c.block_evals as f64 / c.tokens.max(1) as f64})
                    })
                    .collect();
                s = serde_json::to_string_pretty(&rows).unwrap() + "\n";
            }
            other => {
                return Err(format!(
                    "error: unknown format `{other}`; use table, csv or json"
                ))
            }
        }
        Ok(s)
    }
}
