//! `loopc eval`: accuracy of a model on a task file, by hop count × recurrence depth.
//!
//! A task file is JSON lines `{"tokens": [...], "answer": id, "hops": k}` (tools/multihop writes
//! them): the prediction is the argmax of the logits at the last prompt position.
use loopc_runtime::Model;
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

pub struct Table {
    /// (hops, steps) → (correct, total)
    pub cells: BTreeMap<(u32, usize), (usize, usize)>,
    pub steps: Vec<usize>,
}

pub fn evaluate(model: &Model, items: &[Item], steps: &[usize]) -> Result<Table, String> {
    let mut cells = BTreeMap::new();
    let mut session = model.session();
    for &r in steps {
        session.set_steps(Some(r));
        for it in items {
            session.reset();
            let logits = session
                .prefill_last(&it.tokens)
                .map_err(|e| format!("error: {e}"))?;
            let pred = loopc_runtime::argmax(logits.last_row());
            let c = cells.entry((it.hops, r)).or_insert((0usize, 0usize));
            c.0 += usize::from(pred == it.answer);
            c.1 += 1;
        }
    }
    Ok(Table {
        cells,
        steps: steps.to_vec(),
    })
}

impl Table {
    fn hops(&self) -> Vec<u32> {
        let mut h: Vec<u32> = self.cells.keys().map(|k| k.0).collect();
        h.dedup();
        h
    }

    fn acc(&self, h: u32, r: usize) -> Option<f64> {
        self.cells.get(&(h, r)).map(|&(c, t)| c as f64 / t as f64)
    }

    pub fn render(&self, format: &str) -> Result<String, String> {
        let mut s = String::new();
        match format {
            "table" => {
                s.push_str(&format!("{:>6} {:>6}", "hops", "n"));
                for r in &self.steps {
                    s.push_str(&format!(" {:>7}", format!("r={r}")));
                }
                s.push('\n');
                for h in self.hops() {
                    let n = self.cells.get(&(h, self.steps[0])).map_or(0, |c| c.1);
                    s.push_str(&format!("{h:>6} {n:>6}"));
                    for &r in &self.steps {
                        s.push_str(&format!(" {:>7.3}", self.acc(h, r).unwrap_or(f64::NAN)));
                    }
                    s.push('\n');
                }
            }
            "csv" => {
                s.push_str("hops,steps,correct,total,accuracy\n");
                for (&(h, r), &(c, t)) in &self.cells {
                    s.push_str(&format!("{h},{r},{c},{t},{:.6}\n", c as f64 / t as f64));
                }
            }
            "json" => {
                let rows: Vec<serde_json::Value> = self
                    .cells
                    .iter()
                    .map(|(&(h, r), &(c, t))| serde_json::json!({"hops": h, "steps": r, "correct": c, "total": t, "accuracy": c as f64 / t as f64}))
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
