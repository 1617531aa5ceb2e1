//! User input never panics: mutated versions of every example go through the whole front end
//! (parse, params, elaboration, passes, lowering) and must come back as a result or as
//! diagnostics, never as a panic.
use loopc_compiler::driver::{self, Options};
use std::path::PathBuf;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const PIECES: &[&str] = &[
    "(",
    ")",
    "{",
    "}",
    "[",
    "]",
    ",",
    "=",
    "==",
    "+",
    "-",
    "*",
    "/",
    "..",
    "\"",
    "{p}",
    "0",
    "-1",
    "1e999",
    "x",
    "recur",
    "state",
    "exit",
    "cache",
    "let",
    "return",
    "weight",
    "layer",
    "for",
    "if",
    "else",
    "split",
    "attention",
    "rope",
    "linear",
    "\n",
    " ",
    "#",
    "9999999999999999999999",
    "0.0",
    "steps",
    "dim",
];

fn mutate(rng: &mut Rng, text: &str) -> String {
    let mut s: Vec<char> = text.chars().collect();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(s.len());
        match rng.below(3) {
            0 => {
                let n = 1 + rng.below(12);
                let end = (at + n).min(s.len());
                s.drain(at..end);
            }
            1 => {
                let p: Vec<char> = PIECES[rng.below(PIECES.len())].chars().collect();
                s.splice(at..at, p);
            }
            _ => {
                // Swap a numeric or name token's neighbourhood with another place in the file.
                let other = rng.below(s.len());
                if at < s.len() && other < s.len() {
                    s.swap(at, other);
                }
            }
        }
        if s.is_empty() {
            break;
        }
    }
    s.into_iter().collect()
}

#[test]
fn mutated_examples_never_panic() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut rng = Rng(7);
    let mut outcomes = [0usize; 2];
    for (ex, cfg) in [
        ("huginn", "huginn_tiny"),
        ("ouro", "ouro_tiny"),
        ("ltg", "ltg_tiny"),
        ("parcae", "parcae_tiny"),
    ] {
        let text = std::fs::read_to_string(root.join(format!("examples/{ex}.loop"))).unwrap();
        let opts = Options {
            config: Some(root.join(format!("tests/fixtures/{cfg}/config.json"))),
            verify: true,
            opt_level: 1,
            ..Default::default()
        };
        for i in 0..150 {
            let src = mutate(&mut rng, &text);
            let res = std::panic::catch_unwind(|| {
                let f = driver::front_from_source(ex, &src, &opts)?;
                let (mut m, _) = driver::graph(&f, &opts)?;
                driver::optimize(&mut m, &opts)?;
                driver::program(&m).map(|_| ())
            });
            match res {
                Ok(r) => outcomes[usize::from(r.is_ok())] += 1,
                Err(_) => panic!("{ex} mutation {i} panicked; input:\n{src}"),
            }
        }
    }
    // The mutations must exercise both paths, or the test proves little.
    assert!(
        outcomes[0] > 50 && outcomes[1] > 5,
        "errors {} / compiled {}",
        outcomes[0],
        outcomes[1]
    );
}
