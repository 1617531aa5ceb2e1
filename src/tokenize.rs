//! Text ↔ token ids for `loopc run --prompt`, through a Hugging Face `tokenizer.json`
//! (the `tokenizers` crate, pure Rust: fancy-regex, no oniguruma, no hub access).
use std::path::Path;
pub use tokenizers::Tokenizer;

/// Load a `tokenizer.json`; errors name the file.
pub fn load(path: &Path) -> Result<Tokenizer, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("error: cannot read tokenizer `{}`: {e}", path.display()))?;
    text.parse::<Tokenizer>().map_err(|e| {
        format!(
            "error: `{}` is not a valid tokenizer.json: {e}",
            path.display()
        )
    })
}

/// Token ids of `text`, with the tokenizer's special tokens added (e.g. a BOS from its
/// post-processor), as the model saw them in training.
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>, String> {
    tok.encode(text, true)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| format!("error: cannot tokenize the prompt: {e}"))
}

/// The text of `ids`, special tokens included (so an end-of-text token shows). Ids the
/// tokenizer does not know are left out.
pub fn decode(tok: &Tokenizer, ids: &[u32]) -> Result<String, String> {
    tok.decode(ids, false)
        .map_err(|e| format!("error: cannot decode the generated tokens: {e}"))
}
