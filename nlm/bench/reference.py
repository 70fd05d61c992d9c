"""The reference of `nlm bench quality`: what a user writes from PyTorch's word_language_model
example at its defaults (pytorch/examples, word_language_model/main.py and model.py), as a plain
single-process loop: emsize = nhid = 200, 2 layers, dropout 0.2, untied, bptt 35, batch 20,
clip 0.25, plain SGD (p -= lr * grad) with lr divided by 4 whenever the validation loss does not
improve after an epoch; the LSTM at lr 20, the 2-layer Transformer (2 heads, feed-forward 200)
at lr 5, the Elman RNN (tanh) at lr 1. It trains on the token stream of nlm's own shards (same
vocabulary and training tokens as nlm's rows) and is scored on nlm.evaluation's stream with the
same open-vocabulary bits/byte (nlm/bench/quality.py says how the comparison is kept equal).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nlm.errors import NLMError

# The example's defaults (word_language_model/main.py), and the lr the issue asks per kind.
EMSIZE, NHID, NLAYERS, DROPOUT, NHEAD = 200, 200, 2, 0.2, 2
BPTT, BATCH, EVAL_BATCH, CLIP = 35, 20, 10, 0.25
REFERENCES: dict[str, dict[str, Any]] = {
    "lstm": {"kind": "LSTM", "lr": 20.0},
    "transformer": {"kind": "Transformer", "lr": 5.0},
    "rnn": {"kind": "RNN_TANH", "lr": 1.0},
}

# --- the reference: word_language_model's models and loop ----------------------------------


class ReferenceRNN(nn.Module):
    """word_language_model's RNNModel: embedding, dropout, nn.LSTM / nn.RNN(tanh), dropout,
    linear decoder (untied); uniform(-0.1, 0.1) init of the embedding and decoder."""

    def __init__(self, kind: str, vocab_size: int) -> None:
        super().__init__()
        self.family = f"reference-{kind.lower()}"
        self.drop = nn.Dropout(DROPOUT)
        self.encoder = nn.Embedding(vocab_size, EMSIZE)
        if kind == "LSTM":
            self.rnn: nn.Module = nn.LSTM(EMSIZE, NHID, NLAYERS, dropout=DROPOUT, batch_first=True)
        else:
            self.rnn = nn.RNN(
                EMSIZE, NHID, NLAYERS, nonlinearity="tanh", dropout=DROPOUT, batch_first=True
            )
        self.decoder = nn.Linear(NHID, vocab_size)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, x: torch.Tensor, state: Any = None) -> _Output:
        output, state = self.rnn(self.drop(self.encoder(x)), state)
        return _Output(self.decoder(self.drop(output)), state)


class ReferenceTransformer(nn.Module):
    """word_language_model's TransformerModel: embedding * sqrt(emsize), sinusoidal positions,
    nn.TransformerEncoder (2 heads, feed-forward 200, causal mask), linear decoder."""

    def __init__(self, vocab_size: int, max_len: int = 5000) -> None:
        super().__init__()
        self.family = "reference-transformer"
        self.encoder = nn.Embedding(vocab_size, EMSIZE)
        layer = nn.TransformerEncoderLayer(EMSIZE, NHEAD, NHID, DROPOUT, batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, NLAYERS, enable_nested_tensor=False)
        self.decoder = nn.Linear(EMSIZE, vocab_size)
        self.drop = nn.Dropout(DROPOUT)
        position = torch.arange(max_len).unsqueeze(1)
        div = torch.exp(torch.arange(0, EMSIZE, 2) * (-math.log(10000.0) / EMSIZE))
        pe = torch.zeros(max_len, EMSIZE)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(position * div), torch.cos(position * div)
        self.register_buffer("pe", pe, persistent=False)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, x: torch.Tensor, state: Any = None) -> _Output:
        steps = x.size(1)
        h = self.drop(self.encoder(x) * math.sqrt(EMSIZE) + self.pe[:steps])
        mask = nn.Transformer.generate_square_subsequent_mask(steps)
        h = self.transformer(h, mask=mask, is_causal=True)
        return _Output(self.decoder(h), None)  # no state: each window starts afresh


class _Output:
    def __init__(self, logits: torch.Tensor, state: Any) -> None:
        self.logits, self.state = logits, state


def build_reference(name: str, vocab_size: int) -> nn.Module:
    kind = REFERENCES[name]["kind"]
    return (
        ReferenceTransformer(vocab_size)
        if kind == "Transformer"
        else ReferenceRNN(kind, vocab_size)
    )


def split_stream(data: Path, split: str) -> torch.Tensor:
    """A split's token stream, joined back from its rows (seq_len+1 tokens overlapping by one,
    nlm.shards.ClmPacker)."""
    from nlm.bench.train import _read_rows
    from nlm.shards import read_manifest, split_paths

    rows = _read_rows(split_paths(data, read_manifest(data), split)).long()
    if len(rows) == 0:
        raise NLMError(f"{data}: no {split} rows")
    return torch.cat([rows[:, :-1].reshape(-1), rows[-1, -1:]])


def batchify(stream: torch.Tensor, batch: int) -> torch.Tensor:
    """The example's batchify, batch-first: (batch, len(stream) // batch) contiguous streams."""
    width = len(stream) // batch
    return stream[: width * batch].view(batch, width)


def train_reference(
    model: nn.Module, train: torch.Tensor, val: torch.Tensor, lr: float, epochs: int,
    max_batches: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """The example's train(): bptt windows over 20 streams, state detached between windows,
    clip 0.25, p -= lr * grad; after each epoch lr /= 4 unless validation improved."""
    data, steps, best = batchify(train, BATCH), 0, float("inf")
    recurrent = isinstance(model, ReferenceRNN)
    for _ in range(epochs):
        model.train()
        state = None
        for n, i in enumerate(range(0, data.size(1) - 1, BPTT)):
            if max_batches and n >= max_batches:
                break
            x, y = data[:, i : i + BPTT], data[:, i + 1 : i + 1 + BPTT]
            x = x[:, : y.size(1)]
            if recurrent and state is not None:
                state = (
                    tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
                )
            out = model(x, state)
            state = out.state
            loss = nn.functional.cross_entropy(
                out.logits.reshape(-1, out.logits.size(-1)), y.reshape(-1)
            )
            model.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-lr)
            steps += 1
        val_nll, val_count = score_stream(model, val)
        if val_nll / val_count < best:
            best = val_nll / val_count
        else:
            lr /= 4.0
    return {"steps": steps, "val_ppl": math.exp(best), "final_lr": lr}


@torch.inference_mode()
def score_stream(model: nn.Module, stream: torch.Tensor) -> tuple[float, int]:
    """Total NLL (nats) and count of every prediction of stream[1:]: 10 contiguous streams
    (the example's eval batch), bptt windows, the recurrent state carried."""
    from nlm.evaluation import score_recurrent

    model.eval()
    return score_recurrent(model, stream, BPTT, EVAL_BATCH)


def reference_run(
    name: str, data: Path, documents: list[str], epochs: int, max_batches: int = 0
) -> dict[str, Any]:
    """Train one reference on the shards' train split and score it on `documents` as nlm is."""
    from nlm.evaluation import open_vocabulary, text_bytes, token_stream
    from nlm.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(data / "tokenizer")
    torch.manual_seed(1111)  # the example's seed
    model = build_reference(name, tokenizer.vocab_size)
    started = time.perf_counter()
    trained = train_reference(
        model, split_stream(data, "train"), split_stream(data, "val"),
        REFERENCES[name]["lr"], epochs, max_batches,
    )  # fmt: skip
    stream = token_stream(tokenizer, documents)
    total, count = score_stream(model, stream)
    wall = time.perf_counter() - started
    n_bytes = text_bytes(documents)
    return {
        "model": f"reference {name}",
        "kind": name,
        "params": sum(p.numel() for p in model.parameters()),
        "steps": trained["steps"],
        "wall_s": round(wall, 1),
        "tokens": count,
        "ppl": math.exp(total / count),
        **open_vocabulary(tokenizer, documents, stream[1:], total, n_bytes),
    }
