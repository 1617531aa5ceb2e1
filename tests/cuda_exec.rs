//! The CUDA executor without a GPU: `Device::CudaEmulated` runs a CPU artifact through the
//! device executor (device buffers, masks, KV slots, grids, the support kernels' contract) over
//! host memory, and must give the CPU session's logits, depths and KV lengths. Also the errors a
//! CPU machine can provoke: target mismatches, a missing driver, unsupported policies, an
//! incomplete image.
mod common;
use common::*;
use loopc_compiler::driver::{self, Options};
use loopc_runtime::{Artifact, DepthSchedule, Device, LoadOptions, Model, Weights};

const TOL: f32 = 1e-4;

/// `examples/{example}.loop` with its `exit`/`cache` lines replaced, built for the CPU.
fn artifact(example: &str, cfg: &str, exit: &str, cache: &str, set: &[&str]) -> Artifact {
    let src =
        std::fs::read_to_string(root().join("examples").join(format!("{example}.loop"))).unwrap();
    let src = src
        .replace("exit fixed", &format!("exit {exit}"))
        .replace("cache per_step", &format!("cache {cache}"));
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("loopc_cuda_{}_{n}.loop", std::process::id()));
    std::fs::write(&path, src).unwrap();
    let opts = Options {
        set: set.iter().map(|s| s.to_string()).collect(),
        config: Some(fixture(cfg)),
        opt_level: 1,
        verify: true,
        ..Default::default()
    };
    let built = driver::build(&path, &opts).unwrap_or_else(|e| panic!("build failed:\n{e}"));
    let _ = std::fs::remove_file(&path);
    Artifact::from_bytes(built.artifact_bytes()).unwrap()
}

fn load(a: &Artifact, weights: &str, device: Device) -> loopc_runtime::Result<Model> {
    Model::with_options(
        a.clone(),
        Weights::open(fixture(weights)).unwrap(),
        &LoadOptions {
            threads: Some(1),
            device,
            ..Default::default()
        },
    )
}

struct Run {
    logits: Vec<f32>,
    depths: Vec<usize>,
    kv: Vec<(String, Vec<usize>)>,
}

/// Prefill `prompt`, then decode `decode` one token at a time.
fn run(
    m: &Model,
    prompt: &[u32],
    decode: &[u32],
    steps: Option<usize>,
    sched: Option<DepthSchedule>,
) -> Run {
    run_at(m, prompt, decode, steps, sched, None)
}

/// As [`run`], with a run-time exit threshold.
fn run_at(
    m: &Model,
    prompt: &[u32],
    decode: &[u32],
    steps: Option<usize>,
    sched: Option<DepthSchedule>,
    threshold: Option<f64>,
) -> Run {
    let mut s = m.session();
    s.set_exit_threshold(threshold).unwrap();
    s.set_steps(steps);
    s.set_depth_schedule(sched);
    let mut logits = s.prefill(prompt).unwrap().data().to_vec();
    let mut depths = s.last_depths().to_vec();
    for &t in decode {
        logits.extend_from_slice(s.step(t).unwrap().data());
        depths.extend_from_slice(s.last_depths());
    }
    Run {
        logits,
        depths,
        kv: s.kv_lens(),
    }
}

/// The emulated device against the CPU on one artifact; returns the max |Δ| of the logits.
fn compare(a: &Artifact, weights: &str, steps: Option<usize>, sched: Option<DepthSchedule>) -> f32 {
    let prompt = [3u32, 17, 5, 9, 1, 22, 8];
    let decode = [4u32, 11, 2];
    let cpu = run(
        &load(a, weights, Device::Cpu).unwrap(),
        &prompt,
        &decode,
        steps,
        sched.clone(),
    );
    let emu = run(
        &load(a, weights, Device::CudaEmulated).unwrap(),
        &prompt,
        &decode,
        steps,
        sched,
    );
    assert_eq!(cpu.depths, emu.depths, "per-token depths");
    assert_eq!(cpu.kv, emu.kv, "KV slot lengths");
    assert_eq!(cpu.logits.len(), emu.logits.len());
    let d = max_abs_diff(&cpu.logits, &emu.logits);
    assert!(
        d <= TOL,
        "max |Δ| {d} between the CPU and the emulated device"
    );
    d
}

const HUGINN_CFG: &str = "huginn_tiny/config.json";
const HUGINN_W: &str = "huginn_tiny/model.safetensors";

#[test]
fn huginn_fixed_depth_matches_cpu() {
    let a = artifact("huginn", HUGINN_CFG, "fixed", "per_step", &[]);
    for r in [1, 4] {
        compare(&a, HUGINN_W, Some(r), None);
    }
}

#[test]
fn huginn_forced_depths_under_each_cache_policy() {
    for cache in [
        "per_step",
        "ring(2)",
        "last_step",
        "share_first",
        "recursion_wise",
    ] {
        let a = artifact("huginn", HUGINN_CFG, "fixed", cache, &["init_scale=0"]);
        // Unequal depths inside the prefill, and decode tokens that stop early (later slots then
        // fill their gap from lower ones).
        let sched = DepthSchedule::Cycle(vec![2, 4, 1, 3, 4, 2, 1]);
        compare(&a, HUGINN_W, Some(4), Some(sched));
    }
}

#[test]
fn huginn_latent_exits_match_cpu() {
    for exit in [
        "latent_diff(threshold = 0.9, max = 7)",
        "cosine(threshold = 0.3, every = 2, max = 7)",
    ] {
        let a = artifact("huginn", HUGINN_CFG, exit, "per_step", &["init_scale=0"]);
        compare(&a, HUGINN_W, None, None);
    }
}

/// The criteria that judge the output distribution: the readout runs after every iteration and
/// `exit_logits` keeps each row's history on the device. Each criterion is swept over
/// thresholds; every one must match the CPU (logits, per-token depths, KV lengths), and some
/// must make the depths of one call's tokens differ (so the per-row history and the masks are
/// exercised).
#[test]
fn huginn_logit_exits_match_cpu() {
    let prompt = [3u32, 17, 5, 9, 1, 22, 8];
    let decode = [4u32, 11, 2];
    for (exit, sweep) in [
        (
            "kl(threshold = 1e-3, max = 7)",
            &[1.0, 0.3, 1e-1, 1e-2, 1e-3][..],
        ),
        (
            "minp_kl(threshold = 1e-3, max = 7)",
            &[0.3, 1e-1, 1e-2, 1e-3][..],
        ),
        (
            "entropy_diff(threshold = 1e-2, every = 2, max = 7)",
            &[1.0, 1e-1, 1e-2, 1e-3, 1e-4][..],
        ),
        (
            "argmax_stability(threshold = 2, max = 7)",
            &[1.0, 2.0, 3.0, 4.0][..],
        ),
    ] {
        let a = artifact("huginn", HUGINN_CFG, exit, "per_step", &["init_scale=0"]);
        let cpu_m = load(&a, HUGINN_W, Device::Cpu).unwrap();
        let emu_m = load(&a, HUGINN_W, Device::CudaEmulated).unwrap();
        let mut varied = false;
        for &thr in sweep {
            let cpu = run_at(&cpu_m, &prompt, &decode, None, None, Some(thr));
            let emu = run_at(&emu_m, &prompt, &decode, None, None, Some(thr));
            assert_eq!(cpu.depths, emu.depths, "{exit} at {thr}: per-token depths");
            assert_eq!(cpu.kv, emu.kv, "{exit} at {thr}: KV slot lengths");
            let d = max_abs_diff(&cpu.logits, &emu.logits);
            assert!(d <= TOL, "{exit} at {thr}: max |Δ| {d}");
            // Depths that differ inside the prefill (one call, per-row masks).
            let mut ds = cpu.depths[..prompt.len()].to_vec();
            ds.sort();
            ds.dedup();
            eprintln!("{exit} at {thr}: depths {:?}, |Δ| {d:.1e}", cpu.depths);
            varied |= ds.len() > 1;
        }
        assert!(varied, "{exit}: no threshold made the depths differ");
    }
}

/// MoR routers on the device (`route_expert` / `route_token`, the gated update and token
/// choice's `h_0 + w·h_d` as `epilogue` launches) against the CPU, for the routed fixtures'
/// settings, with the fixture's cache (recursion-wise or recursive sharing) and with per-step
/// slots (`kv_share=2`). Decode runs at the fixture's threshold, at 0 (every decoded token
/// recurses) and at 0.5.
#[test]
fn mor_routers_match_cpu() {
    let prompt = [3u32, 17, 5, 9, 1, 22, 8, 14, 30];
    let decode = [4u32, 11, 2, 19];
    for case in [
        "expert_middle_cycle",
        "expert_middle_cycle_kvshare",
        "expert_middle_sequence",
        "token_middle_cycle",
        "token_cycle",
        "token_middle_cycle_kvshare",
    ] {
        let w = format!("mor_tiny/{case}.safetensors");
        let f = fixture(&w);
        let kv = read(&f, "kv_sharing").i64[0];
        for kv in [kv, 2] {
            let set = [
                format!("routing={}", read(&f, "routing").i64[0]),
                format!("sharing={}", read(&f, "sharing").i64[0]),
                format!("alpha={}", read(&f, "alpha").f32[0]),
                format!("kv_share={kv}"),
            ];
            let set: Vec<&str> = set.iter().map(|s| s.as_str()).collect();
            let a = artifact("mor", "mor_tiny/config.json", "fixed", "per_step", &set);
            let cpu_m = load(&a, &w, Device::Cpu).unwrap();
            let emu_m = load(&a, &w, Device::CudaEmulated).unwrap();
            let mut varied = false;
            for thr in [None, Some(0.0), Some(0.5)] {
                let cpu = run_at(&cpu_m, &prompt, &decode, None, None, thr);
                let emu = run_at(&emu_m, &prompt, &decode, None, None, thr);
                let what = format!("{case} kv_share={kv} at {thr:?}");
                assert_eq!(cpu.depths, emu.depths, "{what}: per-token depths");
                assert_eq!(cpu.kv, emu.kv, "{what}: KV slot lengths");
                let d = max_abs_diff(&cpu.logits, &emu.logits);
                assert!(d <= TOL, "{what}: max |Δ| {d}");
                eprintln!(
                    "{case} kv_share={kv} at {thr:?}: depths {:?}, |Δ| {d:.1e}",
                    cpu.depths
                );
                let mut ds = cpu.depths[..prompt.len()].to_vec();
                ds.sort();
                ds.dedup();
                varied |= ds.len() > 1;
            }
            assert!(
                varied,
                "{case}: the router gave every prompt token the same depth"
            );
        }
    }
}

#[test]
fn ouro_fixed_and_gate_exit_match_cpu() {
    for exit in ["fixed", "gate(q = 0.5)"] {
        let a = artifact("ouro", "ouro_tiny/config.json", exit, "per_step", &[]);
        compare(&a, "ouro_tiny/model.safetensors", None, None);
    }
}

#[test]
fn ltg_positions_and_parcae_match_cpu() {
    // Learned positions (`PosEmbed` → `copy_cols` from row `pos0`), sinusoidal ones (the
    // `sinusoidal` support kernel), input injection; Parcae's per-head q/k norms and softcap.
    for set in [["inject=1", "positions=1"], ["inject=0", "positions=2"]] {
        let a = artifact("ltg", "ltg_tiny/config.json", "fixed", "per_step", &set);
        compare(&a, "ltg_tiny/model.safetensors", Some(3), None);
    }
    let a = artifact(
        "parcae",
        "parcae_tiny/config.json",
        "fixed",
        "per_step",
        &[],
    );
    compare(&a, "parcae_tiny/model.safetensors", Some(4), None);
}

#[test]
fn ut_act_matches_cpu() {
    // ACT's weighted state average (two `epilogue` launches per iteration) and the timing
    // signals of positions and of the recurrence step (`timing_signal`).
    for max in ["max_steps=3", "max_steps=6"] {
        let a = artifact("ut", "ut_tiny/config.json", "fixed", "per_step", &[max]);
        compare(&a, "ut_tiny/model.safetensors", None, None);
    }
}

#[test]
fn exit_probabilities_match_cpu() {
    let a = artifact("ouro", "ouro_tiny/config.json", "fixed", "per_step", &[]);
    let w = "ouro_tiny/model.safetensors";
    let mut cpu = load(&a, w, Device::Cpu).unwrap().session();
    let mut emu = load(&a, w, Device::CudaEmulated).unwrap().session();
    cpu.prefill(&[1, 2, 3]).unwrap();
    emu.prefill(&[1, 2, 3]).unwrap();
    let (c, e) = (cpu.exit_probs().unwrap(), emu.exit_probs().unwrap());
    assert!(max_abs_diff(c, e) <= 1e-5);
}

/// A CPU artifact relabelled as a CUDA one (the executor's checks come before any PTX is read).
fn as_cuda(a: &Artifact) -> Artifact {
    let mut c = a.clone();
    c.manifest.target = "cuda-sm_90".into();
    c.manifest.cuda = Some(emulated_image(&c.manifest));
    c.object = b"// no PTX: the load must stop before the driver reads it\n".to_vec();
    c
}

/// The launch table every kernel and support kernel (the shape of the emulator's).
fn emulated_image(m: &loopc_runtime::artifact::Manifest) -> loopc_runtime::artifact::CudaImage {
    use loopc_runtime::artifact::cuda::{support, CudaImage, CudaKernel, SupportKernel};
    let k = |e: &str| CudaKernel {
        entry: e.into(),
        block: 128,
        items_per_block: 1,
        shared_bytes: 0,
    };
    CudaImage {
        arch: "sm_90".into(),
        kernels: m.kernels.iter().map(|d| k(&d.symbol)).collect(),
        support: support::ALL
            .iter()
            .map(|n| SupportKernel {
                name: n.to_string(),
                launch: k(n),
            })
            .collect(),
    }
}

fn err(r: loopc_runtime::Result<Model>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn target_mismatches_are_clear_errors() {
    let a = artifact("huginn", HUGINN_CFG, "fixed", "per_step", &[]);
    let e = err(load(&a, HUGINN_W, Device::Cuda(0)));
    assert!(
        e.contains("not for CUDA") && e.contains("--target cuda"),
        "{e}"
    );
    let c = as_cuda(&a);
    let e = err(load(&c, HUGINN_W, Device::Cpu));
    assert!(
        e.contains("cuda-sm_90") && e.contains("--device cuda"),
        "{e}"
    );
    let e = err(load(&c, HUGINN_W, Device::CudaEmulated));
    assert!(e.contains("holds PTX"), "{e}");
}

#[test]
fn cuda_without_a_driver_or_the_feature_is_a_clear_error() {
    let c = as_cuda(&artifact("huginn", HUGINN_CFG, "fixed", "per_step", &[]));
    let e = err(load(&c, HUGINN_W, Device::Cuda(0)));
    if cfg!(feature = "cuda") {
        // A machine with a driver gets past this point; this one has none (CI, this host).
        if std::path::Path::new("/dev/nvidiactl").exists() {
            return;
        }
        assert!(
            e.contains("no CUDA driver") || e.contains("cannot initialise the CUDA driver"),
            "{e}"
        );
    } else {
        assert!(e.contains("built without CUDA support"), "{e}");
    }
}

#[test]
fn unsupported_policies_and_incomplete_images_are_errors() {
    // A logit criterion needs `exit_logits`.
    let mut c = as_cuda(&artifact(
        "huginn",
        HUGINN_CFG,
        "kl(threshold = 0.3, max = 7)",
        "per_step",
        &[],
    ));
    c.manifest
        .cuda
        .as_mut()
        .unwrap()
        .support
        .retain(|s| s.name != "exit_logits");
    let e = err(load(&c, HUGINN_W, Device::Cuda(0)));
    assert!(e.contains("lacks the support kernel `exit_logits`"), "{e}");
    // An image without `embed` (which every model here needs) is refused at load, before the
    // driver.
    let mut c = as_cuda(&artifact("huginn", HUGINN_CFG, "fixed", "per_step", &[]));
    c.manifest
        .cuda
        .as_mut()
        .unwrap()
        .support
        .retain(|s| s.name != "embed");
    let e = err(load(&c, HUGINN_W, Device::Cuda(0)));
    assert!(e.contains("lacks the support kernel `embed`"), "{e}");
}

/// Whether a program applies a rotary epilogue anywhere.
fn has_rope_epilogue(m: &loopc_runtime::artifact::Manifest) -> bool {
    use loopc_runtime::artifact::Instr;
    let p = &m.program;
    let body = p.recur.iter().flat_map(|r| r.body.iter());
    p.prelude
        .iter()
        .chain(body)
        .chain(p.coda.iter())
        .any(|ins| match ins {
            Instr::MatMul { epi, .. } => epi.rope.is_some(),
            Instr::MatMulParts { parts, .. } => parts.iter().any(|q| q.epi.rope.is_some()),
            _ => false,
        })
}

#[test]
fn an_image_without_rope_rows_is_refused_for_a_rotary_epilogue() {
    for (ex, cfg, w) in [
        ("huginn", HUGINN_CFG, HUGINN_W),
        (
            "ouro",
            "ouro_tiny/config.json",
            "ouro_tiny/model.safetensors",
        ),
    ] {
        let a = artifact(ex, cfg, "fixed", "per_step", &[]);
        assert!(
            has_rope_epilogue(&a.manifest),
            "{ex}: no rotary epilogue to check"
        );
        let mut c = as_cuda(&a);
        c.manifest
            .cuda
            .as_mut()
            .unwrap()
            .support
            .retain(|s| s.name != "rope_rows");
        let e = err(load(&c, w, Device::Cuda(0)));
        assert!(
            e.contains("lacks the support kernel `rope_rows`"),
            "{ex}: {e}"
        );
    }
}

#[test]
fn device_names_parse() {
    assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
    assert_eq!("cuda:3".parse::<Device>(), Ok(Device::Cuda(3)));
    assert_eq!("cuda-emu".parse::<Device>(), Ok(Device::CudaEmulated));
    assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
    assert!("gpu".parse::<Device>().is_err());
    assert!("cuda:x".parse::<Device>().is_err());
}

/// The executor's launch plan for a 3-token prefill and one decode step of the tiny Huginn model
/// at r = 2, with a forced depth of 1 for the second token (so the masked state update and KV
/// writes appear): every launch with its grid and symbolic parameters (`allocation+element`;
/// the buffers the memory plan places together are elements of `activation buffers`), every
/// product with its shapes and strides, every copy. The emulator has checked each access
/// against its allocation while recording.
#[test]
fn launch_plan_snapshot() {
    let a = artifact("huginn", HUGINN_CFG, "fixed", "per_step", &["init_scale=0"]);
    let m = load(&a, HUGINN_W, Device::CudaEmulated).unwrap();
    let mut s = m.session();
    s.set_steps(Some(2));
    s.set_depth_schedule(Some(DepthSchedule::Positions(vec![2, 1, 2, 2])));
    s.device_log(true);
    s.prefill(&[3, 17, 5]).unwrap();
    s.step(4).unwrap();
    let log = s.device_log(false);
    assert!(log.iter().any(|l| l.contains("select_rows")));
    insta::assert_snapshot!(log.join("\n"));
}

/// `Session::reserve` on the device: the slots and rotary tables it allocates hold the calls
/// within it (no slot grows), and the logits are the CPU's.
#[test]
fn reserved_device_cache_holds_the_sequence() {
    let a = artifact("huginn", HUGINN_CFG, "fixed", "per_step", &["init_scale=0"]);
    let prompt = [3u32, 17, 5, 9, 1, 22, 8];
    let decode: Vec<u32> = (0..20u32).map(|i| (i * 37 + 11) % 250).collect();
    let mut emu = load(&a, HUGINN_W, Device::CudaEmulated).unwrap().session();
    emu.set_steps(Some(3));
    emu.reserve(prompt.len() + decode.len()).unwrap();
    let reserved = emu.stats().kv_bytes_allocated;
    assert!(reserved > 0);
    let cpu = run(
        &load(&a, HUGINN_W, Device::Cpu).unwrap(),
        &prompt,
        &decode,
        Some(3),
        None,
    );
    let mut logits = emu.prefill(&prompt).unwrap().data().to_vec();
    for &t in &decode {
        logits.extend_from_slice(emu.step(t).unwrap().data());
        assert_eq!(emu.stats().kv_bytes_allocated, reserved);
    }
    assert!(max_abs_diff(&logits, &cpu.logits) <= TOL);
    assert_eq!(emu.kv_lens(), cpu.kv);
    // Both reserve exactly the rows asked for (in 16-row units), no headroom: a CPU session
    // reserved alike ends up holding the same bytes.
    let mut host = load(&a, HUGINN_W, Device::Cpu).unwrap().session();
    host.set_steps(Some(3));
    host.reserve(prompt.len() + decode.len()).unwrap();
    host.prefill(&prompt).unwrap();
    for &t in &decode {
        host.step(t).unwrap();
    }
    assert_eq!(host.stats().kv_bytes_allocated, reserved);
}
