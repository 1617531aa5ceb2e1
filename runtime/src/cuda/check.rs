//! Load-time checks of a program against what the CUDA executor and the image can do, so that
//! an unsupported policy or a missing support kernel is a clear error before anything runs.

use crate::artifact::{cuda::support, CudaImage, ExitPolicy, Instr, Manifest};
use crate::error::{Result, RuntimeError};

fn unsupported(what: impl Into<String>) -> RuntimeError {
    RuntimeError::Unsupported(what.into())
}

/// The support kernels a program needs.
fn needed(m: &Manifest) -> Result<Vec<&'static str>> {
    let mut need = vec![];
    let mut lists: Vec<&[Instr]> = vec![&m.program.prelude, &m.program.coda];
    if let Some(r) = &m.program.recur {
        lists.push(&r.body);
        // Forced depth schedules can be set on any recurrence: exited rows are frozen with it.
        need.push(support::SELECT_ROWS);
        match r.exit {
            ExitPolicy::Criterion { criterion, .. } if criterion.needs_logits() => {
                need.push(support::EXIT_LOGITS);
            }
            ExitPolicy::Converge { .. } | ExitPolicy::Criterion { .. } => {
                need.push(support::EXIT_LATENT)
            }
            ExitPolicy::ExpertChoice { .. } => {
                need.extend([support::ROUTE_EXPERT, support::EPILOGUE]);
                lists.push(&r.router);
            }
            ExitPolicy::TokenChoice { .. } => {
                need.extend([support::ROUTE_TOKEN, support::EPILOGUE]);
                lists.push(&r.router);
            }
            _ => {}
        }
        if matches!(r.exit, ExitPolicy::Act { .. }) {
            need.push(support::EPILOGUE);
        }
    }
    for list in lists {
        for ins in list {
            let epi = |e: &crate::artifact::Epilogue, need: &mut Vec<&'static str>| -> Result<()> {
                if e.row_scale.is_some() || e.residual.is_some() || e.bias.is_some() {
                    need.push(support::EPILOGUE);
                }
                if let Some(g) = e.glu {
                    if support::act_code(&g.act).is_none() {
                        return Err(unsupported(format!(
                            "the gated epilogue's activation {:?} (the device knows silu, gelu_tanh, relu, sigmoid, tanh)",
                            g.act
                        )));
                    }
                    need.push(support::GLU);
                }
                if e.norm.is_some() {
                    need.push(support::ROW_NORM);
                }
                if e.rope.is_some() {
                    need.push(support::ROPE_ROWS);
                }
                Ok(())
            };
            match ins {
                Instr::Embed { .. } => need.push(support::EMBED),
                Instr::Concat { .. } | Instr::SliceCols { .. } | Instr::PosEmbed { .. } => {
                    need.push(support::COPY_COLS)
                }
                Instr::Sinusoidal { .. } => need.push(support::SINUSOIDAL),
                Instr::TimingSignal { .. } => need.push(support::TIMING_SIGNAL),
                Instr::MatMul { epi: e, .. } => epi(e, &mut need)?,
                Instr::MatMulParts { parts, .. } => {
                    need.push(support::EPILOGUE);
                    for p in parts {
                        epi(&p.epi, &mut need)?;
                    }
                }
                Instr::MatMulKN { .. }
                | Instr::Copy { .. }
                | Instr::KvWrite { .. }
                | Instr::Kernel { .. } => {}
            }
        }
    }
    need.sort();
    need.dedup();
    Ok(need)
}

/// What the executor refuses, and the image's completeness.
pub(crate) fn check_program(m: &Manifest, image: &CudaImage) -> Result<()> {
    if let Some(r) = &m.program.recur {
        match &r.exit {
            ExitPolicy::Fixed | ExitPolicy::Converge { .. } | ExitPolicy::Gate { .. } => {}
            ExitPolicy::Criterion { .. } => {}
            ExitPolicy::Act { .. } if r.gate.is_some() => {}
            ExitPolicy::Act { .. } => {
                return Err(RuntimeError::Manifest(
                    "ACT halting without an exit gate".into(),
                ))
            }
            ExitPolicy::ExpertChoice { .. } | ExitPolicy::TokenChoice { .. } => {}
        }
    }
    if image.kernels.len() != m.kernels.len() {
        return Err(RuntimeError::Artifact(format!(
            "the CUDA launch table has {} kernels for the manifest's {}",
            image.kernels.len(),
            m.kernels.len()
        )));
    }
    for name in needed(m)? {
        if image.support(name).is_none() {
            return Err(RuntimeError::Artifact(format!(
                "the CUDA image lacks the support kernel `{name}` that this program needs"
            )));
        }
    }
    Ok(())
}
