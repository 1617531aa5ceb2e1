//! `loopc trace`: what the loop does to each token, iteration by iteration, as JSON or CSV
//! (state norm, relative update, cosine to the previous state, every exit criterion's value and
//! the decision taken, the state after each layer of the block, per head attention entropy, and
//! whether the trajectory — of the whole block and of each layer — settled on a fixed point or a
//! cycle), with the PCA trajectories drawn as SVG and PNG.
use loopc_runtime::trace::{analyze, pca, LayerStep, Settled, TraceStep};
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

/// 3×5 bitmaps of the characters the PNG labels use (rows top to bottom, 3 bits each): tiny-skia
/// draws no text, and a font file would be a dependency for a dozen glyphs.
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        ':' => [0, 2, 0, 2, 0],
        '-' => [0, 0, 7, 0, 0],
        _ => return None,
    })
}

fn text(pm: &mut tiny_skia::Pixmap, x: f32, y: f32, s: &str, scale: f32) {
    let mut paint = tiny_skia::Paint::default();
    paint.set_color_rgba8(20, 20, 20, 255);
    for (k, c) in s.chars().enumerate() {
        let Some(g) = glyph(c) else { continue };
        for (row, bits) in g.iter().enumerate() {
            for col in 0..3 {
                if bits & (4 >> col) != 0 {
                    if let Some(r) = tiny_skia::Rect::from_xywh(
                        x + (k as f32 * 4.0 + col as f32) * scale,
                        y + row as f32 * scale,
                        scale,
                        scale,
                    ) {
                        pm.fill_rect(r, &paint, tiny_skia::Transform::identity(), None);
                    }
                }
            }
        }
    }
}

fn colour(f: f64) -> tiny_skia::Color {
    tiny_skia::Color::from_rgba8((255.0 * f) as u8, 60, (255.0 * (1.0 - f)) as u8, 255)
}

/// The width and height of [`png`]'s picture.
pub const PNG_SIZE: (u32, u32) = (1280, 480);

/// A PNG with two panels: left, the states' first two principal components (one line per token
/// through its iterations, points from blue, the first iteration, to red, the last, labelled
/// `position:token`); right, the convergence curves, log10 of the relative update against the
/// iteration, one per token. Returns the encoded file.
pub fn png(trace: &[TraceStep], tokens: &[u32], proj: &[f64], k: usize) -> Result<Vec<u8>, String> {
    use tiny_skia::{Paint, PathBuilder, Pixmap, Stroke, Transform};
    let (w, h) = PNG_SIZE;
    let mut pm = Pixmap::new(w, h).ok_or("error: cannot allocate the PNG")?;
    pm.fill(tiny_skia::Color::WHITE);
    let pad = 40.0f64;
    let panel = w as f64 / 2.0;
    let span = |v: &mut dyn Iterator<Item = f64>| {
        let (lo, hi) = v.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
            (a.min(x), b.max(x))
        });
        if !(lo.is_finite() && hi.is_finite()) {
            (0.0, 1.0)
        } else if hi > lo {
            (lo, hi)
        } else {
            (lo - 1.0, lo + 1.0)
        }
    };
    let n = trace.len();
    let xs: Vec<f64> = (0..n).map(|i| proj[i * k]).collect();
    let ys: Vec<f64> = (0..n)
        .map(|i| if k > 1 { proj[i * k + 1] } else { 0.0 })
        .collect();
    let lu: Vec<f64> = trace
        .iter()
        .map(|t| (t.rel_update.max(1e-12) as f64).log10())
        .collect();
    let iters = trace.iter().map(|t| t.iteration).max().unwrap_or(0).max(1);
    let ((x0, x1), (y0, y1)) = (span(&mut xs.iter().copied()), span(&mut ys.iter().copied()));
    let (l0, l1) = span(&mut lu.iter().copied());
    // Panel `p`'s data → pixel maps.
    let px = |p: usize, x: f64, lo: f64, hi: f64| {
        (p as f64 * panel + pad + (x - lo) / (hi - lo) * (panel - 2.0 * pad)) as f32
    };
    let py = |y: f64, lo: f64, hi: f64| {
        (h as f64 - pad - (y - lo) / (hi - lo) * (h as f64 - 2.0 * pad)) as f32
    };
    let mut frame = PathBuilder::new();
    for p in 0..2 {
        let x = (p as f64 * panel + pad) as f32;
        frame.move_to(x, pad as f32);
        frame.line_to(x, (h as f64 - pad) as f32);
        frame.line_to(x + (panel - 2.0 * pad) as f32, (h as f64 - pad) as f32);
    }
    let mut grey = Paint::default();
    grey.set_color_rgba8(150, 150, 150, 255);
    grey.anti_alias = true;
    if let Some(path) = frame.finish() {
        pm.stroke_path(
            &path,
            &grey,
            &Stroke::default(),
            Transform::identity(),
            None,
        );
    }
    let mut positions: Vec<usize> = trace.iter().map(|t| t.position).collect();
    positions.sort_unstable();
    positions.dedup();
    for &p in &positions {
        let idx: Vec<usize> = (0..n).filter(|&i| trace[i].position == p).collect();
        for panel_i in 0..2 {
            let at = |i: usize| match panel_i {
                0 => (px(0, xs[i], x0, x1), py(ys[i], y0, y1)),
                _ => (
                    px(1, trace[i].iteration as f64, 0.0, iters as f64),
                    py(lu[i], l0, l1),
                ),
            };
            let mut pb = PathBuilder::new();
            for (j, &i) in idx.iter().enumerate() {
                let (x, y) = at(i);
                if j == 0 {
                    pb.move_to(x, y);
                } else {
                    pb.line_to(x, y);
                }
            }
            if let Some(path) = pb.finish() {
                pm.stroke_path(
                    &path,
                    &grey,
                    &Stroke::default(),
                    Transform::identity(),
                    None,
                );
            }
            for &i in &idx {
                let (x, y) = at(i);
                let mut dot = Paint::default();
                dot.set_color(colour(trace[i].iteration as f64 / iters as f64));
                dot.anti_alias = true;
                if let Some(c) = PathBuilder::from_circle(x, y, 3.0) {
                    pm.fill_path(
                        &c,
                        &dot,
                        tiny_skia::FillRule::Winding,
                        Transform::identity(),
                        None,
                    );
                }
            }
            if let (0, Some(&last)) = (panel_i, idx.last()) {
                let (x, y) = at(last);
                text(
                    &mut pm,
                    x + 5.0,
                    y - 12.0,
                    &format!("{p}:{}", tokens[p]),
                    2.0,
                );
            }
        }
    }
    // Axis ranges of the convergence panel: the first and last iteration, log10 bounds.
    text(
        &mut pm,
        px(1, 0.0, 0.0, 1.0),
        (h as f64 - pad + 8.0) as f32,
        "1",
        2.0,
    );
    text(
        &mut pm,
        px(1, 1.0, 0.0, 1.0) - 12.0,
        (h as f64 - pad + 8.0) as f32,
        &(iters + 1).to_string(),
        2.0,
    );
    text(
        &mut pm,
        (panel + 4.0) as f32,
        (pad - 16.0) as f32,
        &format!("{}", l1.ceil() as i64),
        2.0,
    );
    text(
        &mut pm,
        (panel + 4.0) as f32,
        (h as f64 - pad + 8.0) as f32,
        &format!("{}", l0.floor() as i64),
        2.0,
    );
    pm.encode_png()
        .map_err(|e| format!("error: cannot encode the PNG: {e}"))
}

pub struct Options<'a> {
    pub steps: Option<usize>,
    pub tol: f32,
    pub format: &'a str,
    pub svg: Option<&'a std::path::Path>,
    pub png: Option<&'a std::path::Path>,
}

fn settled_json(st: &Settled) -> serde_json::Value {
    match st {
        Settled::FixedPoint { distance } => {
            serde_json::json!({"kind": "fixed_point", "period": 1, "distance": distance})
        }
        Settled::Cycle { period, distance } => {
            serde_json::json!({"kind": "cycle", "period": period, "distance": distance})
        }
        Settled::Moving { rel_update } => {
            serde_json::json!({"kind": "moving", "period": null, "distance": rel_update})
        }
    }
}

/// A layer's trajectory as trace steps, so `analyze` classifies it like the block's.
fn layer_traj(steps: &[&TraceStep], l: usize) -> Vec<TraceStep> {
    steps
        .iter()
        .map(|t| {
            let LayerStep {
                norm,
                rel_update,
                cosine,
                state,
            } = t.layers[l].clone();
            TraceStep {
                norm,
                rel_update,
                cosine,
                state,
                layers: vec![],
                attn_entropy: vec![],
                ..(*t).clone()
            }
        })
        .collect()
}

fn opt(x: Option<f64>) -> String {
    x.map_or(String::new(), |v| v.to_string())
}

pub fn run(model: &Model, tokens: &[u32], o: &Options) -> Result<String, String> {
    if !matches!(o.format, "json" | "csv") {
        return Err(format!(
            "error: unknown format `{}`; use json or csv",
            o.format
        ));
    }
    let mut s = model.session();
    s.set_steps(o.steps);
    s.set_trace(true);
    s.prefill(tokens).map_err(|e| format!("error: {e}"))?;
    let trace = s.take_trace();
    let mut positions: Vec<usize> = trace.iter().map(|t| t.position).collect();
    positions.sort_unstable();
    positions.dedup();
    let n_layers = trace.first().map_or(0, |t| t.layers.len());
    let settled: Vec<serde_json::Value> = positions
        .iter()
        .map(|&p| {
            let mine: Vec<&TraceStep> = trace.iter().filter(|t| t.position == p).collect();
            let mut v = settled_json(&analyze(&mine, o.tol, 8));
            let layers: Vec<serde_json::Value> = (0..n_layers)
                .map(|l| {
                    let traj = layer_traj(&mine, l);
                    let mut v = settled_json(&analyze(&traj.iter().collect::<Vec<_>>(), o.tol, 8));
                    v["layer"] = l.into();
                    v
                })
                .collect();
            v["position"] = p.into();
            v["layers"] = layers.into();
            v
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
    if let Some(path) = o.svg {
        std::fs::write(path, svg(&trace, tokens, &proj, k))
            .map_err(|e| format!("error: cannot write `{}`: {e}", path.display()))?;
    }
    if let Some(path) = o.png {
        if trace.is_empty() {
            return Err("error: --png: the model has no recurrence to draw".into());
        }
        std::fs::write(path, png(&trace, tokens, &proj, k)?)
            .map_err(|e| format!("error: cannot write `{}`: {e}", path.display()))?;
    }
    if o.format == "csv" {
        let mut s = String::from(
            "position,token,iteration,norm,rel_update,cosine,exited,latent_diff,cosine_diff,kl,minp_kl,entropy_diff,argmax_stability,entropy,argmax",
        );
        for l in 0..n_layers {
            s += &format!(",layer{l}_norm,layer{l}_rel_update,layer{l}_cosine");
        }
        if let Some(t) = trace.first() {
            for (site, heads) in t.attn_entropy.iter().enumerate() {
                for h in 0..heads.len() {
                    s += &format!(",attn{site}_head{h}_entropy");
                }
            }
        }
        s.push('\n');
        for t in &trace {
            let c = &t.criteria;
            s += &format!(
                "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                t.position,
                tokens[t.position],
                t.iteration,
                t.norm,
                t.rel_update,
                t.cosine,
                u8::from(t.exited),
                c.latent_diff,
                c.cosine,
                opt(c.kl),
                opt(c.minp_kl),
                opt(c.entropy_diff),
                opt(c.argmax_stability),
                opt(c.entropy),
                c.argmax.map_or(String::new(), |a| a.to_string())
            );
            for l in &t.layers {
                s += &format!(",{},{},{}", l.norm, l.rel_update, l.cosine);
            }
            for e in t.attn_entropy.iter().flatten() {
                s += &format!(",{e}");
            }
            s.push('\n');
        }
        return Ok(s);
    }
    let rows: Vec<serde_json::Value> = trace
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let c = &t.criteria;
            let layers: Vec<serde_json::Value> = t
                .layers
                .iter()
                .enumerate()
                .map(|(l, x)| serde_json::json!({"layer": l, "norm": x.norm, "rel_update": x.rel_update, "cosine": x.cosine}))
                .collect();
            serde_json::json!({"position": t.position, "token": tokens[t.position], "iteration": t.iteration,
                "norm": t.norm, "rel_update": t.rel_update, "cosine": t.cosine, "pca": &proj[i * k..(i + 1) * k],
                "exited": t.exited,
                "criteria": {"latent_diff": c.latent_diff, "cosine": c.cosine, "kl": c.kl, "minp_kl": c.minp_kl,
                    "entropy_diff": c.entropy_diff, "argmax_stability": c.argmax_stability,
                    "entropy": c.entropy, "argmax": c.argmax},
                "layers": layers, "attn_entropy": t.attn_entropy})
        })
        .collect();
    let out = serde_json::json!({"tokens": tokens, "iterations": trace.iter().map(|t| t.iteration + 1).max().unwrap_or(0),
        "tolerance": o.tol, "pca_variance": vars, "layers": n_layers,
        "attention_heads": trace.first().map(|t| t.attn_entropy.iter().map(Vec::len).collect::<Vec<_>>()).unwrap_or_default(),
        "rows": rows, "settled": settled});
    Ok(serde_json::to_string_pretty(&out).unwrap() + "\n")
}
