//! loopc runtime: loads an artifact (`loopc build` output), binds a safetensors checkpoint and
//! runs prefill/decode for looped (recurrent-depth) transformers.
//!
//! The compiler lowers the model into the artifact's [`artifact::Program`]; the runtime only
//! interprets its instructions (embedding lookups, matrix products, concatenations, KV-cache
//! writes and calls to the generated kernels) and runs the control logic of the recurrence
//! (initial state, iterations, exit policy, exit gate). It depends on no compiler crate.
//!
//! ```no_run
//! use loopc_runtime::{generate, sample, Artifact, Model, Rng, SamplerConfig, Weights};
//!
//! # fn main() -> Result<(), loopc_runtime::RuntimeError> {
//! let artifact = Artifact::load("model.loopc")?;           // or Artifact::from_bytes(&bytes)
//! let weights = Weights::open("model.safetensors")?;       // a file or a checkpoint directory
//! let model = Model::new(artifact, weights)?;              // validates, binds weights, loads kernels
//!
//! let mut session = model.session();
//! session.set_steps(Some(8));                              // recurrence depth (None = artifact default)
//! session.reserve(3 + 16)?;                                // the KV cache for the whole sequence, once
//! let logits = session.prefill(&[1, 2, 3])?;               // [3, vocab]: every position
//! let mut rng = Rng::new(0);
//! let next = sample(logits.last_row(), &SamplerConfig::greedy(), &mut rng);
//! let step_logits = session.step(next)?;                   // [vocab]
//! assert_eq!(step_logits.len(), model.manifest().vocab);
//! println!("{:?} {:?}", session.exit_probs(), session.stats());
//! session.reset();                                         // new sequence, same allocations
//!
//! // Or in one go, keeping every logit (`generate` reserves the cache itself):
//! let out = generate(&mut session, &[1, 2, 3], 16, &SamplerConfig::temperature(0.7).with_top_p(0.9), &[0])?;
//! println!("{:?} ({} decode rows)", out.tokens, out.step_logits.rows);
//! # Ok(())
//! # }
//! ```
//!
//! Environment: `LOOPC_THREADS` (worker threads; default: available cores), `LOOPC_PROFILE=1`
//! (per-operation timers in [`Stats::profile`] and [`BatchSession::profile`]),
//! `LOOPC_HUGEPAGE_WEIGHTS=0` (use aligned f32
//! weights in place from the checkpoint's mapping instead of copying them into 64-byte
//! aligned, huge-page-advised memory),
//! `LOOPC_NO_AMX=1` (bf16 prefill without AMX tiles: widened f32 panels on Intel, else the
//! AVX-512-BF16 kernel), `LOOPC_BF16_WIDEN=1` (widened panels on other vendors' CPUs too),
//! `LOOPC_SPIN=0` (decode steps' parallel loops on rayon instead of the spinning team of
//! [`par`]), `LOOPC_SHARE_BUFFERS=0` (every activation buffer its own storage instead of the
//! memory plan that lets buffers with disjoint live ranges share it), `LOOPC_PACK_F32=0` (f32
//! matmul weights stay row-major instead of packed into the panels of `matmul::packed`).
//!
//! [`Model::with_options`] with [`WeightDtype::Bf16`] stores the matmul weights in bf16 (f32
//! accumulation; norms, biases, attention, the KV cache and activations stay f32).

mod amx;
pub mod artifact;
pub mod attention;
mod batch;
pub mod bf16;
pub mod ceilings;
mod cuda;
mod dtype;
pub mod error;
pub mod ew;
mod exec;
mod exit;
pub mod guard;
pub mod kernels;
mod kv;
pub mod matmul;
pub mod matmul_bf16;
mod mem;
mod model;
pub mod par;
pub mod rng;
mod rope;
mod rows;
pub mod sampler;
mod session;
pub mod trace;
pub mod weights;

/// The CUDA executor's device interface, so that a CUDA artifact can run over a device of the
/// caller's own ([`Model::with_gpu`]); the tests run the compiler's device kernels in a SIMT
/// interpreter through it. Not a stable API.
#[doc(hidden)]
pub mod device {
    pub use crate::cuda::{DevMem, Gemm, Gpu, Param};
}

pub use batch::BatchSession;
pub use cuda::Device;
pub use dtype::{LoadOptions, WeightDtype};
pub use error::{Result, RuntimeError};
pub use model::{Artifact, Model};
pub use rng::Rng;
pub use sampler::{argmax, sample, SamplerConfig};
pub use session::{
    generate, generate_with, profile_text, DepthSchedule, ExitProbs, GenerateOutput, Logits,
    PromptLogits, Session, Stats,
};
pub use weights::{check_weights, TensorInfo, Weights};

#[cfg(test)]
mod test_util;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_kernels;
