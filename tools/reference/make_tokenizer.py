"""Write tests/fixtures/tokenizer/tokenizer.json: a tiny BPE tokenizer (256 ids, the vocab
of the tiny test models) for `loopc run --prompt` tests.

Shape of a real Qwen/Ouro tokenizer, minus the byte-level mapping (which alone needs 256 ids):
a regex Split pre-tokenizer with the Qwen2 pattern (its `\\s+(?!\\S)` lookahead needs the
fancy-regex backend), a character-level BPE trained on a fixed corpus, a `<s>` BOS added by a
TemplateProcessing post-processor (so add_special_tokens matters), and a Fuse decoder, so
decode(encode(text)) gives the text back for text in the alphabet.

    pip install tokenizers   # tested with 0.23.3
    python tools/reference/make_tokenizer.py
Deterministic: the trainer has no randomness, so rerunning gives the same file.
"""
import json
import pathlib

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
VOCAB_SIZE = 256  # = the tiny models' vocab, so every id they generate decodes
SPECIALS = ["<unk>", "<s>", "</s>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A looped transformer runs the same block again and again.",
    "Once upon a time there was a little model that could think in loops.",
    "It's the recurrence that gives the model more depth at test time!",
    "We'll compile the graph, lower it to kernels, and run it on the weights.",
    "Hello, world. Hello again, world: 0 1 2 3 4 5 6 7 8 9.",
    "What is the capital of France? The capital of France is Paris.",
    "She sells sea shells by the sea shore; he reads books in the park.",
    "Numbers like 42 and 2024 are split into single digits by the pattern.",
    "Every prompt becomes token ids, and the generated ids become text again.",
]


def main() -> None:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    text = "Hello, the model runs again."
    enc = tok.encode(text)
    assert enc.ids[0] == tok.token_to_id("<s>")
    assert tok.decode(enc.ids) == text, tok.decode(enc.ids)

    out = pathlib.Path(__file__).resolve().parents[2] / "tests/fixtures/tokenizer/tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    # Compact JSON (the default pretty form is ~3x larger); still one stable line per run.
    out.write_text(json.dumps(json.loads(tok.to_str()), ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes, {tok.get_vocab_size()} tokens): {text!r} -> {enc.ids}")


if __name__ == "__main__":
    main()
