//! The two decode-attention paths agree: the kernel the Cranelift backend generates (which
//! serves CPUs without AVX-512 and is the contract's definition) and the runtime's vector path
//! (`loopc_runtime::attention::causal_rows`, which serves decode steps and short prompts where
//! AVX-512 is present). Models only ever run one of them on a given machine, so this is where
//! the other stays checked.

use libloading::Library;
use loopc_compiler::backend::cranelift;
use loopc_runtime::artifact::{KernelDecl, KernelSpec};
use loopc_runtime::attention::{causal_rows, rows_supported, Shape};
use loopc_runtime::kernels::KernelFn;

fn lcg(s: &mut u64) -> f32 {
    *s = s
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

#[test]
fn generated_kernel_and_runtime_rows_agree() {
    if !rows_supported() {
        eprintln!("no AVX-512 here: the runtime path is not used on this machine");
        return;
    }
    let cases = [
        (1usize, 1usize, 16usize),
        (4, 4, 64),
        (16, 16, 64),
        (6, 2, 20),
        (3, 1, 80),
        (2, 2, 128),
    ];
    let decls: Vec<KernelDecl> = cases
        .iter()
        .enumerate()
        .map(|(i, &(heads, kv_heads, head_dim))| KernelDecl {
            symbol: format!("attn{i}"),
            spec: KernelSpec::Attention {
                heads,
                kv_heads,
                head_dim,
                scale: 1.0 / (head_dim as f32).sqrt(),
            },
        })
        .collect();
    let built = cranelift::compile_kernels(&decls).expect("cranelift");
    let path =
        std::env::temp_dir().join(format!("loopc-attention-paths-{}.so", std::process::id()));
    std::fs::write(&path, &built.shared_object).unwrap();
    let lib = unsafe { Library::new(&path) }.expect("dlopen");
    let _ = std::fs::remove_file(&path);
    let mut seed = 5u64;
    let mut worst = 0f32;
    for (d, &(heads, kv_heads, head_dim)) in decls.iter().zip(&cases) {
        let kernel: KernelFn = unsafe { *lib.get::<KernelFn>(d.symbol.as_bytes()).unwrap() };
        let s = Shape {
            heads,
            kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
        };
        // (rows r0..r1, pos0): a decode step, a short prompt, a batch row deep in its cache,
        // and compacted rows whose positions sit below their row indices.
        for (r0, r1, pos0) in [(0usize, 1usize, 0i64), (0, 1, 200), (0, 7, 12), (4, 9, -2)] {
            let keys = (pos0 + r1 as i64) as usize;
            let q: Vec<f32> = (0..r1 * heads * head_dim)
                .map(|_| 3.0 * lcg(&mut seed))
                .collect();
            let k: Vec<f32> = (0..keys * kv_heads * head_dim)
                .map(|_| 3.0 * lcg(&mut seed))
                .collect();
            let v: Vec<f32> = (0..keys * kv_heads * head_dim)
                .map(|_| lcg(&mut seed))
                .collect();
            let mut want = vec![0f32; q.len()];
            let mut got = vec![0f32; q.len()];
            let ptrs = [
                q.as_ptr() as *mut f32,
                k.as_ptr() as *mut f32,
                v.as_ptr() as *mut f32,
                want.as_mut_ptr(),
            ];
            let ints = [(r0 * heads) as i64, (r1 * heads) as i64, pos0, keys as i64];
            unsafe { kernel(ptrs.as_ptr(), ints.as_ptr()) };
            unsafe {
                causal_rows(
                    q.as_ptr(),
                    k.as_ptr(),
                    v.as_ptr(),
                    got.as_mut_ptr(),
                    r0,
                    r1,
                    pos0,
                    s,
                    1,
                )
            };
            for (i, (a, b)) in want.iter().zip(&got).enumerate() {
                let e = (a - b).abs() / a.abs().max(1.0);
                assert!(
                    e <= 1e-5,
                    "{} rows {r0}..{r1} pos0={pos0} element {i}: kernel {a}, runtime {b}",
                    d.symbol
                );
                worst = worst.max(e);
            }
        }
    }
    eprintln!("attention paths: max relative |Δ| = {worst:.2e}");
}
