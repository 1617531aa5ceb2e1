//! `loopc trace`: what the loop does to each token, iteration by iteration, as JSON or CSV
//! (state norm, relative update, cosine to the previous state, and whether the trajectory
//! settled on a fixed point or a cycle).
use loopc_runtime::trace::{analyze, pca, Settled, TraceStep};
use loopc_runtime::Model;

/// An SVG of the states' first two principal components: one polyline per token through its
/// iterations, points coloured from blue (first iteration) to red (last), labelled with the token.
pub fn svg(trace: &[TraceStep], tokens: &[u32], proj: &[f64], k: usize) -> String {
    let (w, h, pad) = (640.0, 480.0, 40.0);
    let xs: Vec<f64> = (0..trace.len()).map(|i| proj[i * k]).collect();
    let ys: Vec<f64> = (0..trace.len())
        .map(|i| if k > 1 { proj[i * k + 1] } else { 0.0 })
        .collect();
    let span = |v: &[f64]| {
        let (lo, hi) = v
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                (a.min(x), b.max(x))
            });
        if hi > lo {
            (lo, hi)
        } else {
            (lo - 1.0, lo + 1.0)
        }
    };
    let ((x0, x1), (y0, y1)) = (span(&xs), span(&ys));
    let px = |x: f64| pad + (x - x0) / (x1 - x0) * (w - 2.0 * pad);
    let py = |y: f64| h - pad - (y - y0) / (y1 - y0) * (h - 2.0 * pad);
    let iters = trace.iter().map(|t| t.iteration).max().unwrap_or(0).max(1);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
<text x=\"{pad}\" y=\"20\">PCA of the recurrent state (PC1 → x, PC2 → y); colour: iteration 1 (blue) → {} (red)</text>\n",
        iters + 1
    );
    let mut positions: Vec<usize> = trace.iter().map(|t| t.position).collect();
    positions.sort_unstable();
    positions.dedup();
    for p in positions {
        let idx: Vec<usize> = (0..trace.len())
            .filter(|&i| trace[i].position == p)
            .collect();
        let pts: Vec<String> = idx
            .iter()
            .map(|&i| format!("{:.1},{:.1}", px(xs[i]), py(ys[i])))
            .collect();
        out += &format!("<polyline class=\"series\" fill=\"none\" stroke=\"#999\" stroke-width=\"1\" points=\"{}\"/>\n", pts.join(" "));
        for &i in &idx {
            let f = trace[i].iteration as f64 / iters as f64;
            let colour = format!(
                "rgb({},{},{})",
                (255.0 * f) as u8,
                60,
                (255.0 * (1.0 - f)) as u8
            );
            out += &format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"/>\n",
                px(xs[i]),
                py(ys[i])
            );
        }
        if let Some(&last) = idx.last() {
            out += &format!(
                "<text x=\"{:.1}\" y=\"{:.1}\">t{p}:{}</text>\n",
                px(xs[last]) + 4.0,
                py(ys[last]) - 4.0,
                tokens[p]
            );
        }
    }
    out + "</svg>\n"
}

pub fn run(
    model: &Model,
    tokens: &[u32],
    steps: Option<usize>,
    tol: f32,
    format: &str,
    svg_out: Option<&std::path::Path>,
) -> Result<String, String> {
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
    let d = trace.first().map_or(0, |t| t.state.len());
    let flat: Vec<f32> = trace.iter().flat_map(|t| t.state.iter().copied()).collect();
    let k = 3.min(d);
    let (_, proj, vars) = if trace.is_empty() {
        (vec![], vec![], vec![])
    } else {
        pca(&flat, trace.len(), d, k)
    };
    if let Some(path) = svg_out {
        std::fs::write(path, svg(&trace, tokens, &proj, k))
            .map_err(|e| format!("error: cannot write `{}`: {e}", path.display()))?;
    }
    match format {
        "json" => {
            let rows: Vec<serde_json::Value> = trace
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    serde_json::json!({"position": t.position, "token": tokens[t.position], "iteration": t.iteration,
                        "norm": t.norm, "rel_update": t.rel_update, "cosine": t.cosine, "pca": &proj[i * k..(i + 1) * k]})
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
                "tolerance": tol, "pca_variance": vars, "rows": rows, "settled": settled});
            Ok(serde_json::to_string_pretty(&out).unwrap() + "\n")
        }
        "csv" => {
            let mut s = String::from("position,token,iteration,norm,rel_update,cosine\n");
            for t in &trace {
                s.push_str(&format!(
                    "{},{},{},{},{},{}\n",
                    t.position, tokens[t.position], t.iteration, t.norm, t.rel_update, t.cosine
                ));
            }
            Ok(s)
        }
        other => Err(format!("error: unknown format `{other}`; use json or csv")),
    }
}
