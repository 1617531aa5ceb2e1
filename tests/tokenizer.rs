//! `loopc run --prompt TEXT --tokenizer tokenizer.json`: text in, text out, through the tiny
//! BPE fixture (`tools/reference/make_tokenizer.py`, 256 ids = the tiny models' vocab).
use std::process::Command;
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, Tokenizer};

const TOKENIZER: &str = "tests/fixtures/tokenizer/tokenizer.json";
const PROMPT: &str = "Hello, the model runs again.";
const MODEL: [&str; 8] = [
    "run",
    "examples/ouro.loop",
    "--config",
    "tests/fixtures/ouro_tiny/config.json",
    "--weights",
    "tests/fixtures/ouro_tiny/model.safetensors",
    "--max-new-tokens",
    "4",
];

fn loopc(extra: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_loopc"))
        .args(MODEL)
        .args(extra)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(TOKENIZER)).unwrap()
}

#[test]
fn fixture_round_trips_and_adds_bos() {
    let tok = tokenizer();
    assert_eq!(tok.get_vocab_size(true), 256);
    let ids = tok.encode(PROMPT, true).unwrap().get_ids().to_vec();
    assert_eq!(
        ids[0],
        tok.token_to_id("<s>").unwrap(),
        "the post-processor adds <s>: {ids:?}"
    );
    assert_eq!(tok.decode(&ids[1..], false).unwrap(), PROMPT);
    // The Qwen2 split pattern's `\s+(?!\S)` (a lookahead: fancy-regex) leaves the last space of
    // a run to the word after it.
    let mut pts = PreTokenizedString::from("a  b");
    tok.get_pre_tokenizer()
        .unwrap()
        .pre_tokenize(&mut pts)
        .unwrap();
    let splits: Vec<&str> = pts
        .get_splits(OffsetReferential::Original, OffsetType::Byte)
        .iter()
        .map(|s| s.0)
        .collect();
    assert_eq!(splits, ["a", " ", " b"]);
}

#[test]
fn prompt_generates_the_same_ids_as_tokens_and_prints_text() {
    let (ok, out, err) = loopc(&["--prompt", PROMPT, "--tokenizer", TOKENIZER, "--print-ids"]);
    assert!(ok, "{err}");
    let (ids_line, text) = out.split_once('\n').expect("ids line, then text");
    let gen: Vec<u32> = ids_line
        .split_whitespace()
        .map(|t| t.parse().unwrap())
        .collect();
    assert_eq!(gen.len(), 4, "{out}");
    assert!(!text.trim().is_empty(), "decoded text: {out:?}");
    assert_eq!(
        text.strip_suffix('\n').unwrap(),
        tokenizer().decode(&gen, false).unwrap()
    );

    let prompt: Vec<String> = tokenizer()
        .encode(PROMPT, true)
        .unwrap()
        .get_ids()
        .iter()
        .map(|i| i.to_string())
        .collect();
    let (ok, out2, err) = loopc(&["--tokens", &prompt.join(" ")]);
    assert!(ok, "{err}");
    assert_eq!(out2.trim_end(), ids_line, "--tokens prints only the ids");

    // Without --print-ids: the text alone.
    let (ok, out3, err) = loopc(&["--prompt", PROMPT, "--tokenizer", TOKENIZER]);
    assert!(ok, "{err}");
    assert_eq!(out3, text);
}

#[test]
fn prompt_without_tokenizer_is_an_error() {
    let (ok, out, err) = loopc(&["--prompt", PROMPT]);
    assert!(!ok);
    assert!(out.is_empty());
    assert!(err.contains("--prompt needs --tokenizer"), "{err}");
}

#[test]
fn missing_or_invalid_tokenizer_names_the_file() {
    let (ok, _, err) = loopc(&[
        "--prompt",
        PROMPT,
        "--tokenizer",
        "tests/fixtures/tokenizer/nope.json",
    ]);
    assert!(!ok);
    assert!(
        err.contains("cannot read tokenizer `tests/fixtures/tokenizer/nope.json`"),
        "{err}"
    );
    let (ok, _, err) = loopc(&[
        "--prompt",
        PROMPT,
        "--tokenizer",
        "tests/fixtures/ouro_tiny/config.json",
    ]);
    assert!(!ok);
    assert!(
        err.contains("`tests/fixtures/ouro_tiny/config.json` is not a valid tokenizer.json"),
        "{err}"
    );
}

#[test]
fn ids_beyond_the_vocab_are_an_error() {
    // From --tokens: the runtime's message is shown.
    let (ok, _, err) = loopc(&["--tokens", "1 300"]);
    assert!(!ok);
    assert!(err.contains("token id 300") && err.contains("256"), "{err}");
    // From a tokenizer with a bigger vocab than the model's: names the tokenizer.
    let big = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("big-tokenizer-{}.json", std::process::id()));
    let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
        "pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
        "model":{"type":"WordLevel","vocab":{"<unk>":0,"hello":1000},"unk_token":"<unk>"}}"#;
    std::fs::write(&big, json).unwrap();
    let (ok, _, err) = loopc(&["--prompt", "hello", "--tokenizer", big.to_str().unwrap()]);
    std::fs::remove_file(&big).ok();
    assert!(!ok);
    assert!(
        err.contains("gave token id 1000")
            && err.contains("below 256")
            && err.contains("big-tokenizer"),
        "{err}"
    );
}
