"""Named model sizes. `preset_config(family, preset)` gives the config fields; any of them,
vocab_size above all (the trainer sets it from the tokenizer), can be overridden:
`build_model("lstm", "small", vocab_size=tokenizer.vocab_size)`.

- tiny:  a training step well under a second on one CPU core; every test uses it.
- small: a few million parameters, trains on wt2-mini (~217k words) on 2 CPU cores in minutes.
         lstm is 2 x 256, dropout, tied: the PyTorch word_language_model example (2 x 200,
         untied) is the baseline it should beat.
- base:  GPT-2 124M (12 x 768, 12 heads, block 1024) / BERT-base (12 x 768, block 512); for
         fnn/rnn/lstm the large classic settings (Zaremba et al.'s 2 x 650 medium LSTM).
- notes: fnn/rnn/lstm only; the course notes' small setting: ~1000 words + <unk> (plus the
         7 special ids), 10-dim word vectors, 1-2 layers.
"""

from __future__ import annotations

from typing import Any

from nlm.errors import NLMError

WT2_VOCAB = 33280  # WikiText-2's 33278 words + <pad> and spare specials, a multiple of 64

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "fnn": {
        "tiny": dict(vocab_size=256, n=4, embed_dim=16, hidden_size=32, tie_weights=True),
        "small": dict(
            vocab_size=WT2_VOCAB, n=5, embed_dim=128, hidden_size=256, dropout=0.2, tie_weights=True
        ),
        "base": dict(
            vocab_size=WT2_VOCAB, n=6, embed_dim=256, hidden_size=512, dropout=0.3, tie_weights=True
        ),
        # The notes' worked example: W^1 maps the concatenated context to the embedding size and
        # the scores are L_T^T x tanh(W^1 x), i.e. tied with hidden_size == embed_dim.
        "notes": dict(vocab_size=1008, n=5, embed_dim=10, hidden_size=10, tie_weights=True),
    },
    "rnn": {
        "tiny": dict(vocab_size=256, embed_dim=32, hidden_size=32, n_layer=1, dropout=0.0),
        "small": dict(vocab_size=WT2_VOCAB, embed_dim=256, hidden_size=256, n_layer=2, dropout=0.2),
        "base": dict(vocab_size=WT2_VOCAB, embed_dim=650, hidden_size=650, n_layer=2, dropout=0.5),
        "notes": dict(
            vocab_size=1008, embed_dim=10, hidden_size=32, n_layer=2, dropout=0.0, tie_weights=False
        ),
    },
    "lstm": {
        "tiny": dict(vocab_size=256, embed_dim=32, hidden_size=32, n_layer=1, dropout=0.0),
        "small": dict(vocab_size=WT2_VOCAB, embed_dim=256, hidden_size=256, n_layer=2, dropout=0.2),
        "base": dict(vocab_size=WT2_VOCAB, embed_dim=650, hidden_size=650, n_layer=2, dropout=0.5),
        "notes": dict(
            vocab_size=1008, embed_dim=10, hidden_size=32, n_layer=2, dropout=0.0, tie_weights=False
        ),
    },
    "gpt": {
        "tiny": dict(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0),
        "small": dict(
            vocab_size=WT2_VOCAB, block_size=256, n_layer=4, n_head=4, n_embd=256, dropout=0.1
        ),
        "base": dict(
            vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, dropout=0.0
        ),
    },
    "bert": {
        "tiny": dict(
            vocab_size=256,
            max_positions=64,
            n_layer=2,
            n_head=2,
            n_embd=32,
            intermediate_size=64,
            dropout=0.0,
        ),
        "small": dict(
            vocab_size=WT2_VOCAB,
            max_positions=128,
            n_layer=4,
            n_head=4,
            n_embd=256,
            intermediate_size=1024,
            dropout=0.1,
        ),
        "base": dict(
            vocab_size=30522,
            max_positions=512,
            n_layer=12,
            n_head=12,
            n_embd=768,
            intermediate_size=3072,
            dropout=0.1,
        ),
    },
    # ELMo (Peters et al. 2018): base is the released "ELMo small" biLM's LSTM (2 layers of 1024
    # cells projected to 128 per direction, 13.6M parameters with its char CNN) on a word
    # vocabulary; nlm's token layer is a plain embedding table.
    "elmo": {
        "tiny": dict(vocab_size=256, embed_dim=32, hidden_size=32, n_layer=2, dropout=0.0),
        "small": dict(vocab_size=WT2_VOCAB, embed_dim=128, hidden_size=512, n_layer=2, dropout=0.1),
        "base": dict(vocab_size=WT2_VOCAB, embed_dim=128, hidden_size=1024, n_layer=2, dropout=0.1),
    },
    # The encoder-decoder; base is T5-small's size (6 + 6 layers of 512, 8 heads, d_ff 2048).
    "transformer": {
        "tiny": dict(
            vocab_size=256,
            max_positions=64,
            n_layer=2,
            n_head=2,
            n_embd=32,
            ffn_size=64,
            dropout=0.0,
        ),
        "small": dict(
            vocab_size=WT2_VOCAB,
            max_positions=256,
            n_layer=3,
            n_head=4,
            n_embd=256,
            ffn_size=1024,
            dropout=0.1,
        ),
        "base": dict(
            vocab_size=32128,
            max_positions=512,
            n_layer=6,
            n_head=8,
            n_embd=512,
            ffn_size=2048,
            dropout=0.1,
        ),
    },
}


def preset_config(family: str, preset: str) -> dict[str, Any]:
    """A fresh dict of config fields for `family` at size `preset`."""
    if family not in PRESETS:
        raise NLMError(f"unknown model '{family}' (known: {', '.join(PRESETS)})")
    known = PRESETS[family]
    if preset not in known:
        raise NLMError(f"unknown preset '{preset}' for {family} (known: {', '.join(known)})")
    return dict(known[preset])
