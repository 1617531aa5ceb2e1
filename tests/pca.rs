//! The trace's PCA against numpy's SVD on a committed fixture (tools/reference/gen_pca_fixture.py).
mod common;
use loopc_runtime::trace::pca;

fn tensor(st: &safetensors::SafeTensors, name: &str) -> Vec<f64> {
    let t = st.tensor(name).unwrap();
    match t.dtype() {
        safetensors::Dtype::F64 => t
            .data()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        d => panic!("{d:?}"),
    }
}

#[test]
fn pca_matches_numpy_svd() {
    let bytes = std::fs::read(common::fixture("pca/pca.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let x: Vec<f32> = tensor(&st, "x").into_iter().map(|v| v as f32).collect();
    let (n, d) = (40, 6);
    let (comps, proj, vars) = pca(&x, n, d, 3);
    let close = |a: &[f64], b: &[f64], tol: f64, what: &str| {
        let e = a
            .iter()
            .zip(b)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f64::max);
        assert!(e < tol, "{what}: max |Δ| = {e:e}");
    };
    close(&comps, &tensor(&st, "components"), 1e-6, "components");
    close(&proj, &tensor(&st, "projections"), 1e-5, "projections");
    close(&vars, &tensor(&st, "variances"), 1e-5, "variances");
}
