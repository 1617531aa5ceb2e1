//! Scalar semantics of the elementwise ops ([`EwOp`]): the reference the generated kernels are
//! tested against, and the evaluator of derived weights ([`crate::artifact::Derive::Map`]).
use crate::artifact::EwOp;

/// The instructions `op` reads.
pub fn operands(op: &EwOp) -> Vec<u32> {
    use EwOp::*;
    match *op {
        Input(_) | Const(_) => vec![],
        Add(a, b) | Sub(a, b) | Mul(a, b) | Div(a, b) | Max(a, b) => vec![a, b],
        Neg(a) | Exp(a) | Sigmoid(a) | Silu(a) | Relu(a) | Tanh(a) | GeluTanh(a) | Sqrt(a)
        | Softplus(a) => vec![a],
    }
}

/// The instructions some output depends on (the backends emit only these).
pub fn live_ops(ops: &[EwOp], outputs: &[u32]) -> Vec<bool> {
    let mut live = vec![false; ops.len()];
    for &o in outputs {
        live[o as usize] = true;
    }
    for i in (0..ops.len()).rev() {
        if live[i] {
            for a in operands(&ops[i]) {
                live[a as usize] = true;
            }
        }
    }
    live
}

/// Every instruction reads earlier instructions and existing inputs, and there is a last one.
pub fn validate(ops: &[EwOp], inputs: usize) -> Result<(), String> {
    if ops.is_empty() {
        return Err("no elementwise instructions".into());
    }
    for (i, op) in ops.iter().enumerate() {
        if let EwOp::Input(k) = op {
            if *k as usize >= inputs {
                return Err(format!("op {i} reads input {k} of {inputs}"));
            }
        }
        if operands(op).iter().any(|&a| a as usize >= i) {
            return Err(format!(
                "op {i} ({op:?}) uses an op that does not precede it"
            ));
        }
    }
    Ok(())
}

/// `ln(1 + eˣ)` without overflow for large `x` nor cancellation for very negative `x`.
pub fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// The value of the last instruction for inputs `x` (ops validated by [`validate`]).
pub fn eval(ops: &[EwOp], x: &[f64]) -> f64 {
    let mut v: Vec<f64> = Vec::with_capacity(ops.len());
    for op in ops {
        let a = |k: u32| v[k as usize];
        let r = match *op {
            EwOp::Input(k) => x[k as usize],
            EwOp::Const(c) => c as f64,
            EwOp::Add(p, q) => a(p) + a(q),
            EwOp::Sub(p, q) => a(p) - a(q),
            EwOp::Mul(p, q) => a(p) * a(q),
            EwOp::Div(p, q) => a(p) / a(q),
            EwOp::Max(p, q) => a(p).max(a(q)),
            EwOp::Neg(p) => -a(p),
            EwOp::Exp(p) => a(p).exp(),
            EwOp::Sigmoid(p) => 1.0 / (1.0 + (-a(p)).exp()),
            EwOp::Silu(p) => a(p) / (1.0 + (-a(p)).exp()),
            EwOp::Relu(p) => a(p).max(0.0),
            EwOp::Tanh(p) => a(p).tanh(),
            EwOp::GeluTanh(p) => {
                let y = a(p);
                let k = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * y * (1.0 + (k * (y + 0.044715 * y * y * y)).tanh())
            }
            EwOp::Sqrt(p) => a(p).sqrt(),
            EwOp::Softplus(p) => softplus(a(p)),
        };
        v.push(r);
    }
    v.last().copied().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softplus_matches_its_definition_and_is_stable() {
        for x in [-30.0, -3.0, -0.5, 0.0, 0.7, 5.0, 19.0] {
            let want = (1.0 + f64::exp(x)).ln();
            assert!((softplus(x) - want).abs() <= 1e-12 * want.max(1.0), "{x}");
        }
        assert_eq!(softplus(1000.0), 1000.0);
        assert!(softplus(-800.0) >= 0.0);
    }

    #[test]
    fn derived_decay_formula() {
        // exp(−softplus(b)·exp(a)) for Parcae's default init (a = 0, decay target √(1/5)).
        let ops = [
            EwOp::Input(0),
            EwOp::Softplus(0),
            EwOp::Input(1),
            EwOp::Exp(2),
            EwOp::Mul(1, 3),
            EwOp::Neg(4),
            EwOp::Exp(5),
        ];
        validate(&ops, 2).unwrap();
        let target: f64 = (0.2f64).sqrt();
        let dt = -target.ln();
        let b = dt + (-(-dt).exp_m1()).ln(); // inverse softplus, as the authors' init
        assert!((eval(&ops, &[b, 0.0]) - target).abs() < 1e-12);
        assert!(validate(&[EwOp::Neg(0)], 1).is_err());
        assert!(validate(&[EwOp::Input(2)], 1).is_err());
    }
}
