//! The whole CUDA road on a CPU: an artifact built with `--target cuda` runs in a runtime
//! [`Session`](loopc_runtime::Session) whose device executes the compiler's device kernels (every
//! generated kernel and support kernel, from the `gpu`-dialect module of the same manifest) in
//! the SIMT simulator of tests/cuda_sim, with host products in place of cuBLAS; its logits,
//! per-token depths and KV lengths must be the CPU backend's. This checks the device kernels,
//! the launch table and the executor's bookkeeping together, where tests/cuda_backend.rs checks
//! the kernels one at a time and tests/cuda_exec.rs the executor over the CPU kernels.
//!
//! The simulator runs the `gpu`-dialect text, not the PTX: the module is regenerated from the
//! artifact's kernel list (the emitter is deterministic) and its launch table must be the
//! artifact's. Without the `mlir` feature there is no PTX at all; the test then pairs the CPU
//! build's program with the emitter's launch table, which is what `--target cuda` writes apart
//! from the PTX (tests/cuda_backend.rs checks that the two builds' programs are equal).
mod common;
#[allow(dead_code)]
mod cuda_sim;

use common::*;
use cuda_sim::{Func, Mem, V};
use loopc_compiler::backend::mlir::gpu;
use loopc_compiler::driver::{self, Options, Target};
use loopc_runtime::artifact::CudaKernel;
use loopc_runtime::device::{DevMem, Gemm, Gpu, Param};
use loopc_runtime::{Artifact, DepthSchedule, Device, LoadOptions, Model, Weights};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

const TOL: f32 = 1e-4;

/// A [`Gpu`] over the simulator: device memory is the simulator's, every launch runs the
/// entry's `gpu.func` block by block, products are host loops.
struct SimGpu {
    mem: Arc<Mutex<Mem>>,
    /// By launch index: the function and how to launch it.
    funcs: Vec<(Func, CudaKernel)>,
    /// Launches per entry name.
    launches: Mutex<HashMap<String, usize>>,
}

struct SimAlloc {
    mem: Arc<Mutex<Mem>>,
    addr: i64,
}

impl Drop for SimAlloc {
    fn drop(&mut self) {
        // A poisoned lock means a simulated launch failed; that failure is the report.
        if let Ok(mut m) = self.mem.lock() {
            m.free(self.addr);
        }
    }
}

impl SimGpu {
    fn new(text: &str, entries: &[CudaKernel]) -> Self {
        let mut by_name: HashMap<String, Func> = cuda_sim::parse(text)
            .into_iter()
            .map(|f| (f.name.clone(), f))
            .collect();
        let funcs = entries
            .iter()
            .map(|e| {
                let f = by_name
                    .remove(&e.entry)
                    .unwrap_or_else(|| panic!("the gpu module has no gpu.func @{}", e.entry));
                (f, e.clone())
            })
            .collect();
        SimGpu {
            mem: Arc::new(Mutex::new(Mem::new())),
            funcs,
            launches: Mutex::default(),
        }
    }

    fn words(bytes: usize) -> usize {
        assert_eq!(
            bytes % 4,
            0,
            "a transfer of {bytes} bytes (not whole words)"
        );
        bytes / 4
    }
}

impl Gpu for SimGpu {
    fn alloc(&self, bytes: usize, _what: &str) -> loopc_runtime::Result<DevMem> {
        let addr = self.mem.lock().unwrap().alloc(bytes.div_ceil(4).max(1));
        let own = SimAlloc {
            mem: self.mem.clone(),
            addr,
        };
        Ok(DevMem::new(addr as u64, Box::new(own)))
    }

    fn upload(&self, dst: u64, src: &[u8]) -> loopc_runtime::Result<()> {
        let mut m = self.mem.lock().unwrap();
        let w = m.words(dst as i64, Self::words(src.len()));
        for (d, s) in w.iter_mut().zip(src.chunks_exact(4)) {
            *d = u32::from_ne_bytes(s.try_into().unwrap());
        }
        Ok(())
    }

    fn download(&self, src: u64, dst: &mut [u8]) -> loopc_runtime::Result<()> {
        let mut m = self.mem.lock().unwrap();
        let w = m.words(src as i64, Self::words(dst.len()));
        for (d, s) in dst.chunks_exact_mut(4).zip(w.iter()) {
            d.copy_from_slice(&s.to_ne_bytes());
        }
        Ok(())
    }

    fn copy(&self, dst: u64, src: u64, bytes: usize) -> loopc_runtime::Result<()> {
        let mut m = self.mem.lock().unwrap();
        let n = Self::words(bytes);
        let v = m.words(src as i64, n).to_vec();
        m.words(dst as i64, n).copy_from_slice(&v);
        Ok(())
    }

    fn zero(&self, dst: u64, bytes: usize) -> loopc_runtime::Result<()> {
        let mut m = self.mem.lock().unwrap();
        m.words(dst as i64, Self::words(bytes)).fill(0);
        Ok(())
    }

    fn launch(&self, f: usize, items: usize, params: &[Param]) -> loopc_runtime::Result<()> {
        if items == 0 {
            return Ok(());
        }
        let (func, l) = &self.funcs[f];
        let args: Vec<V> = params
            .iter()
            .map(|p| match *p {
                Param::Ptr(a) => V::I(a as i64),
                Param::I64(v) => V::I(v),
                Param::F32(v) => V::F(v),
                Param::F64(v) => V::D(v),
            })
            .collect();
        let grid = items.div_ceil(l.items_per_block as usize);
        func.launch(&mut self.mem.lock().unwrap(), grid, l.block as usize, &args);
        *self
            .launches
            .lock()
            .unwrap()
            .entry(l.entry.clone())
            .or_default() += 1;
        Ok(())
    }

    fn gemm(&self, g: &Gemm) -> loopc_runtime::Result<()> {
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        let mut m = self.mem.lock().unwrap();
        let f = |w: &[u32]| -> Vec<f32> { w.iter().map(|&b| f32::from_bits(b)).collect() };
        let x = f(m.words(g.x as i64, (g.m - 1) * g.ldx + g.k));
        let w_len = if g.kn {
            g.k.saturating_sub(1) * g.ldw + g.n
        } else {
            (g.n - 1) * g.ldw + g.k
        };
        let w = f(m.words(g.w as i64, w_len));
        let c = m.words(g.c as i64, (g.m - 1) * g.ldc + g.n);
        for i in 0..g.m {
            for j in 0..g.n {
                let mut acc = 0f32;
                for k in 0..g.k {
                    let wv = if g.kn {
                        w[k * g.ldw + j]
                    } else {
                        w[j * g.ldw + k]
                    };
                    acc += x[i * g.ldx + k] * wv;
                }
                c[i * g.ldc + j] = acc.to_bits();
            }
        }
        Ok(())
    }
}

/// `examples/{example}.loop` with its `exit`/`cache` lines replaced, built for `target`.
fn artifact(
    example: &str,
    cfg: &str,
    exit: &str,
    cache: &str,
    set: &[&str],
    target: Target,
) -> Artifact {
    let src =
        std::fs::read_to_string(root().join("examples").join(format!("{example}.loop"))).unwrap();
    let src = src
        .replace("exit fixed", &format!("exit {exit}"))
        .replace("cache per_step", &format!("cache {cache}"));
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("loopc_cudasim_{}_{n}.loop", std::process::id()));
    std::fs::write(&path, src).unwrap();
    let opts = Options {
        set: set.iter().map(|s| s.to_string()).collect(),
        config: Some(fixture(cfg)),
        opt_level: 1,
        verify: true,
        target,
        ..Default::default()
    };
    let built = driver::build(&path, &opts);
    let _ = std::fs::remove_file(&path);
    let built = built.unwrap_or_else(|e| panic!("build failed:\n{e}"));
    Artifact::from_bytes(built.artifact_bytes()).unwrap()
}

/// The CUDA artifact of the same source: `--target cuda` with the `mlir` feature; without it,
/// the CPU program with the emitter's launch table and no PTX (see the module comment).
fn cuda_artifact(cpu: &Artifact, build: impl FnOnce() -> Artifact) -> Artifact {
    if cfg!(feature = "mlir") {
        let a = build();
        assert!(
            a.manifest.target.starts_with("cuda"),
            "{}",
            a.manifest.target
        );
        let ptx = std::str::from_utf8(&a.object).expect("PTX is text");
        let image = a.manifest.cuda.as_ref().expect("launch table");
        for k in image
            .kernels
            .iter()
            .chain(image.support.iter().map(|s| &s.launch))
        {
            assert!(
                ptx.contains(&format!(".entry {}(", k.entry)),
                "the PTX has no entry {}",
                k.entry
            );
        }
        a
    } else {
        let _ = build;
        let mut a = cpu.clone();
        a.manifest.target = gpu::TARGET.into();
        a.manifest.cuda = Some(gpu::gpu_module(&a.manifest.kernels).unwrap().image);
        a.object =
            b"// no PTX without the mlir feature; the simulator runs the gpu module\n".to_vec();
        a
    }
}

struct Run {
    logits: Vec<f32>,
    depths: Vec<usize>,
    kv: Vec<(String, Vec<usize>)>,
}

/// Prefill `prompt`, then decode `decode` one token at a time.
fn run(m: &Model, steps: Option<usize>, sched: Option<DepthSchedule>) -> Run {
    let (prompt, decode) = ([3u32, 17, 5, 9, 1, 22, 8], [4u32, 11, 2]);
    let mut s = m.session();
    s.set_steps(steps);
    s.set_depth_schedule(sched);
    let mut logits = s.prefill(&prompt).unwrap().data().to_vec();
    let mut depths = s.last_depths().to_vec();
    for t in decode {
        logits.extend_from_slice(s.step(t).unwrap().data());
        depths.extend_from_slice(s.last_depths());
    }
    Run {
        logits,
        depths,
        kv: s.kv_lens(),
    }
}

/// The CPU build on the CPU against the CUDA build in the simulator; returns the simulated run's
/// per-token depths.
#[allow(clippy::too_many_arguments)]
fn compare(
    example: &str,
    cfg: &str,
    weights: &str,
    exit: &str,
    cache: &str,
    set: &[&str],
    steps: Option<usize>,
    sched: Option<DepthSchedule>,
) -> Vec<usize> {
    let what = format!("{example} exit {exit} cache {cache} {set:?} steps {steps:?} {sched:?}");
    let cpu_a = artifact(example, cfg, exit, cache, set, Target::Cpu);
    let cuda_a = cuda_artifact(&cpu_a, || {
        artifact(example, cfg, exit, cache, set, Target::Cuda)
    });
    let g = gpu::gpu_module(&cuda_a.manifest.kernels).unwrap();
    assert_eq!(
        Some(&g.image),
        cuda_a.manifest.cuda.as_ref(),
        "{what}: the regenerated module's launch table is the artifact's"
    );
    let cpu = Model::with_options(
        cpu_a,
        Weights::open(fixture(weights)).unwrap(),
        &LoadOptions {
            threads: Some(1),
            device: Device::Cpu,
            ..Default::default()
        },
    )
    .unwrap();
    let sim: Arc<Mutex<Option<Arc<SimGpu>>>> = Arc::default();
    let dev = Model::with_gpu(
        cuda_a,
        Weights::open(fixture(weights)).unwrap(),
        1,
        |entries| {
            let gpu = Arc::new(SimGpu::new(&g.text, entries));
            *sim.lock().unwrap() = Some(gpu.clone());
            Ok(gpu)
        },
    )
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    let t0 = std::time::Instant::now();
    let want = run(&cpu, steps, sched.clone());
    let got = run(&dev, steps, sched);
    assert_eq!(want.depths, got.depths, "{what}: per-token depths");
    assert_eq!(want.kv, got.kv, "{what}: KV slot lengths");
    let d = max_abs_diff(&want.logits, &got.logits);
    assert!(
        d <= TOL,
        "{what}: max |Δ| {d} between the CPU and the simulated device"
    );
    // Every generated kernel of the artifact ran on the simulated device.
    let sim = sim.lock().unwrap().clone().unwrap();
    let launches = sim.launches.lock().unwrap();
    for k in &dev.manifest().kernels {
        assert!(
            launches.get(&k.symbol).is_some_and(|&n| n > 0),
            "{what}: kernel {} never launched",
            k.symbol
        );
    }
    eprintln!(
        "{what}: max |Δ| {d:.2e}, {} launches, {:.1} s",
        launches.values().sum::<usize>(),
        t0.elapsed().as_secs_f64()
    );
    got.depths
}

const HUGINN_CFG: &str = "huginn_tiny/config.json";
const HUGINN_W: &str = "huginn_tiny/model.safetensors";
const OURO_CFG: &str = "ouro_tiny/config.json";
const OURO_W: &str = "ouro_tiny/model.safetensors";

#[test]
fn huginn_fixed_depth_in_the_simulator() {
    compare(
        "huginn",
        HUGINN_CFG,
        HUGINN_W,
        "fixed",
        "per_step",
        &[],
        Some(4),
        None,
    );
}

#[test]
fn huginn_per_token_exits_in_the_simulator() {
    // Forced per-token depths under a ring cache (masked state updates, KV gaps filled from the
    // previous slot), then a latent-difference exit decided on the device's exit values.
    let d = compare(
        "huginn",
        HUGINN_CFG,
        HUGINN_W,
        "fixed",
        "ring(2)",
        &["init_scale=0"],
        Some(4),
        Some(DepthSchedule::Cycle(vec![2, 4, 1, 3])),
    );
    assert!(d.iter().any(|&x| x != d[0]), "depths {d:?}: no early exit");
    let d = compare(
        "huginn",
        HUGINN_CFG,
        HUGINN_W,
        "latent_diff(threshold = 0.9, max = 7)",
        "per_step",
        &["init_scale=0"],
        None,
        None,
    );
    eprintln!("latent-diff depths {d:?}");
}

#[test]
fn ouro_fixed_and_gate_exit_in_the_simulator() {
    compare(
        "ouro",
        OURO_CFG,
        OURO_W,
        "fixed",
        "per_step",
        &[],
        None,
        None,
    );
    let d = compare(
        "ouro",
        OURO_CFG,
        OURO_W,
        "gate(q = 0.5)",
        "per_step",
        &[],
        None,
        None,
    );
    eprintln!("gate depths {d:?}");
}

#[test]
fn ut_ltg_and_parcae_in_the_simulator() {
    // ACT's running average and the timing signals, learned and sinusoidal positions with
    // input injection, Parcae's per-head q/k norms.
    compare(
        "ut",
        "ut_tiny/config.json",
        "ut_tiny/model.safetensors",
        "fixed",
        "per_step",
        &["max_steps=6"],
        None,
        None,
    );
    for set in [["inject=1", "positions=1"], ["inject=0", "positions=2"]] {
        compare(
            "ltg",
            "ltg_tiny/config.json",
            "ltg_tiny/model.safetensors",
            "fixed",
            "per_step",
            &set,
            Some(3),
            None,
        );
    }
    compare(
        "parcae",
        "parcae_tiny/config.json",
        "parcae_tiny/model.safetensors",
        "fixed",
        "per_step",
        &[],
        Some(4),
        None,
    );
}
