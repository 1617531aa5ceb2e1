//! `loopc trace`: what the loop does to each token, iteration by iteration, as JSON or CSV
//! (state norm, relative update, cosine to the previous state, and whether the trajectory
//! settled on a fixed point or a cycle).
use loopc_runtime::trace::{analyze, Settled, TraceStep};
use loopc_runtime::Model;

pub fn run(model: &Model, tokens: &[u32], steps: Option<usize>, tol: f32, format: &str) -> Result<String, String> {
    let mut s = model.session();
    s.set_steps(steps);
    s.set_trace(true);
    s.prefill(tokens).map_err(|e| format!("error: {e}"))?;
    let trace = s.take_trace();
    let mut positions: Vec<usize> = trace.iter().map(|t| t.position).collect();
    positions.sort_unstable();
    positions.dedup();
    let settled: Vec<(usize, Settled)> = positions
        .iter()
        .map(|&p| {
            let mine: Vec<&TraceStep> = trace.iter().filter(|t| t.position == p).collect();
            (p, analyze(&mine, tol, 8))
        })
        .collect();
    match format {
        "json" => {
            let rows: Vec<serde_json::Value> = trace
                .iter()
                .map(|t| {
                    serde_json::json!({"position": t.position, "token": tokens[t.position], "iteration": t.iteration,
                        "norm": t.norm, "rel_update": t.rel_update, "cosine": t.cosine})
                })
                .collect();
            let settled: Vec<serde_json::Value> = settled
                .iter()
                .map(|(p, st)| match st {
                    Settled::FixedPoint { distance } => serde_json::json!({"position": p, "kind": "fixed_point", "period": 1, "distance": distance}),
                    Settled::Cycle { period, distance } => serde_json::json!({"position": p, "kind": "cycle", "period": period, "distance": distance}),
                    Settled::Moving { rel_update } => serde_json::json!({"position": p, "kind": "moving", "period": null, "distance": rel_update}),
                })
                .collect();
            let out = serde_json::json!({"tokens": tokens, "iterations": trace.iter().map(|t| t.iteration + 1).max().unwrap_or(0),
                "tolerance": tol, "rows": rows, "settled": settled});
            Ok(serde_json::to_string_pretty(&out).unwrap() + "\n")
        }
        "csv" => {
            let mut s = String::from("position,token,iteration,norm,rel_update,cosine\n");
            for t in &trace {
                s.push_str(&format!("{},{},{},{},{},{}\n", t.position, tokens[t.position], t.iteration, t.norm, t.rel_update, t.cosine));
            }
            Ok(s)
        }
        other => Err(format!("error: unknown format `{other}`; use json or csv")),
    }
}
