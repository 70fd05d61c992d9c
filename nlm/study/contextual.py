"""`nlm study --contextual`: one word, several senses (the course notes' §8: ELMo "实现了一词多义区分").

A static word vector (the fnn/rnn/lstm study's input embeddings) is one point per word, whatever
the sentence. A contextual model gives every occurrence its own vector. For each studied word:

1. its occurrences in the corpus: up to `occurrences` windows of +-`window` words around it;
2. each occurrence's vector from every contextual checkpoint (elmo: the layer mix
   γ·Σ softmax(s)_j·h_j; bert: the last layer), at the word's own position;
3. 2-means on the unit vectors (cosine k-means, k-means++ seeding, a small torch loop: the
   project does not install scikit-learn); `separation` = 1 - within / total sum of squares;
4. each cluster's nearest vocabulary words: the words the model itself puts in that slot from the
   context, i.e. the highest mean log-probability over the cluster's occurrences, the target
   excluded (elmo: log p_forward(w | left) + log p_backward(w | right), the shared softmax's
   vectors nearest the two directions' states; bert: the slot masked; a causal model: its left
   context only); beside them the static vectors' nearest neighbours (cosine, input embeddings).

Without `words`, the study picks them: among the `candidates` most frequent lower-case corpus words
(letters only, at least 3 characters, enough occurrences), those whose first contextual model's
occurrences split best into two clusters (the highest separation): words used in clearly
different contexts. Writes OUT/contextual.md, OUT/contextual.json and OUT/contextual.png.
"""

from __future__ import annotations

import collections
import random
from pathlib import Path
from typing import Any

import torch

from nlm.checkpoint import Checkpoint, load_checkpoint
from nlm.errors import NLMError
from nlm.files import write_json
from nlm.inference import Engine, token_hidden
from nlm.tokenizers.base import MASK_ID, SPECIAL_TOKENS
from nlm.wordvectors import nearest, unit_vectors


def occurrences(
    documents: list[str], word: str, limit: int, window: int, seed: int
) -> list[tuple[str, int]]:
    """Up to `limit` (text, index) pairs: +-`window` whitespace words around one occurrence of
    `word` and its word index in that text; a seeded draw when there are more."""
    found = []
    for doc in documents:
        words = doc.split()
        for i, w in enumerate(words):
            if w == word:
                a = max(0, i - window)
                found.append((" ".join(words[a : i + window + 1]), i - a))
    if len(found) > limit:
        found = random.Random(seed).sample(found, limit)
    return found


def _slot(engine: Engine, text: str, index: int, word: str) -> tuple[list[int], int, int] | None:
    """(ids as the engine lays them out, start of the text's tokens, the word's position), or
    None when the word is not one token at that place (an unknown word, a subword split)."""
    job = engine.embed_job(text, "token")
    words = text.split()
    before = len(engine.tokenizer.encode(" ".join(words[:index]))) if index else 0
    position = job.start + before
    if job.ids[position] != engine.tokenizer.token_to_id(word):
        return None
    return job.ids, job.start, position


@torch.inference_mode()
def read_occurrences(
    engine: Engine, contexts: list[tuple[str, int]], word: str, slots_too: bool = True
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """((N, H) the word's contextual vectors, (N, V) log-probs of its slot (empty unless
    `slots_too`), the N texts)."""
    model = engine.model
    slots = [(_slot(engine, t, i, word), t) for t, i in contexts]
    slots = [(s, t) for s, t in slots if s is not None]
    if not slots:
        return torch.empty(0, model.hidden_size), torch.empty(0), []
    seqs = [s[0] for s, _ in slots]
    vectors = torch.stack(
        [h[0] for h in token_hidden(model, seqs, [(p, p + 1) for (_, _, p), _ in slots])]
    )
    logprobs = []
    for (ids, _, p), _ in slots if slots_too else []:
        x = torch.tensor([ids])
        if model.objective == "mlm":  # bert: the slot masked
            x[0, p] = MASK_ID
            out = model(x)
            lp = out.logits[0, p].float().log_softmax(-1)
        else:  # the left context's prediction, and the right context's for a backward LM
            out = model(x)
            lp = out.logits[0, p - 1].float().log_softmax(-1)
            if out.backward_logits is not None:
                lp = lp + out.backward_logits[0, p].float().log_softmax(-1)
        logprobs.append(lp)
    texts = [t for _, t in slots]
    return vectors.float(), torch.stack(logprobs) if logprobs else torch.empty(0), texts


def kmeans(x: torch.Tensor, k: int = 2, seed: int = 0, iters: int = 50) -> torch.Tensor:
    """Cluster labels (N,) of cosine k-means on the rows of x (k-means++ seeding)."""
    x = torch.nn.functional.normalize(x.double(), dim=1)
    generator = torch.Generator().manual_seed(seed)
    centers = [x[int(torch.randint(len(x), (1,), generator=generator))]]
    while len(centers) < min(k, len(x)):
        d = torch.cdist(x, torch.stack(centers)).min(dim=1).values ** 2
        if float(d.sum()) == 0:
            break
        centers.append(x[int(torch.multinomial(d / d.sum(), 1, generator=generator))])
    c = torch.stack(centers)
    labels = torch.zeros(len(x), dtype=torch.long)
    for _ in range(iters):
        labels = torch.cdist(x, c).argmin(dim=1)
        new = torch.stack(
            [x[labels == j].mean(0) if bool((labels == j).any()) else c[j] for j in range(len(c))]
        )
        if torch.allclose(new, c):
            break
        c = new
    return labels


def separation(x: torch.Tensor, labels: torch.Tensor) -> float:
    """1 - within-cluster / total sum of squares of the unit rows (0: no structure)."""
    x = torch.nn.functional.normalize(x.double(), dim=1)
    total = float(((x - x.mean(0)) ** 2).sum())
    within = sum(
        float(((x[labels == j] - x[labels == j].mean(0)) ** 2).sum()) for j in labels.unique()
    )
    return 1.0 - within / total if total > 0 else 0.0


def slot_words(tokenizer: Any, logprobs: torch.Tensor, word: str, k: int) -> list[str]:
    """The k words with the highest mean log-probability, neither special nor `word`."""
    mean = logprobs.mean(0).clone()
    mean[: len(SPECIAL_TOKENS)] = float("-inf")
    own = tokenizer.token_to_id(word)
    if own is not None:
        mean[own] = float("-inf")
    return [tokenizer.id_to_token(int(i)) for i in mean.topk(k).indices]


def candidate_words(documents: list[str], tokenizer: Any, count: int, least: int) -> list[str]:
    """The `count` most frequent lower-case corpus words of letters only, >= 3 characters, in the
    vocabulary and occur at least `least` times."""
    counts = collections.Counter(w for d in documents for w in d.split())
    out = []
    for w, n in counts.most_common():
        if n < least or len(out) >= count:
            break
        if len(w) >= 3 and w.isalpha() and w.islower() and tokenizer.token_to_id(w) is not None:
            out.append(w)
    return out


def run_contextual(
    documents: list[str],
    contextual: dict[str, str | Path],
    static: dict[str, str | Path],
    out: str | Path,
    words: list[str] | None = None,
    n_words: int = 6,
    candidates: int = 30,
    occurrences_per_word: int = 40,
    window: int = 12,
    k: int = 8,
    seed: int = 7,
) -> dict[str, Any]:
    """The study (module docstring); returns what OUT/contextual.json holds."""
    if not contextual:
        raise NLMError("--contextual: give at least one contextual checkpoint (--elmo, --bert)")
    for name, value in [("--random", n_words), ("--occurrences", occurrences_per_word), ("--k", k)]:
        if value < 1:
            raise NLMError(f"{name} {value}: must be at least 1")
    ctx: dict[str, Checkpoint] = {name: load_checkpoint(p) for name, p in contextual.items()}
    engines = {name: Engine(c) for name, c in ctx.items()}
    statics = {name: load_checkpoint(p) for name, p in static.items()}
    first = next(iter(engines.values()))
    least = max(4, occurrences_per_word // 4)
    if words:
        for w in words:
            if first.tokenizer.token_to_id(w) is None:
                raise NLMError(f"--words: '{w}' is not in the {next(iter(ctx))} vocabulary")
    else:
        scored = []
        for i, w in enumerate(candidate_words(documents, first.tokenizer, candidates, least)):
            vectors, _, _ = read_occurrences(
                first,
                occurrences(documents, w, occurrences_per_word, window, seed + i),
                w,
                slots_too=False,
            )
            if len(vectors) >= least:
                scored.append((separation(vectors, kmeans(vectors, 2, seed)), w))
        words = [w for _, w in sorted(scored, reverse=True)[:n_words]]
        if not words:
            raise NLMError(f"no word occurs {least} times in the corpus and the vocabulary")
    report: dict[str, Any] = {"words": [], "contextual": list(ctx), "static": list(statics)}
    figure = []
    static_tables = {
        n: (unit_vectors(c.model, c.tokenizer), c.tokenizer) for n, c in statics.items()
    }
    for i, w in enumerate(words):
        contexts = occurrences(documents, w, occurrences_per_word, window, seed + 1000 + i)
        entry: dict[str, Any] = {
            "word": w,
            "occurrences": len(contexts),
            "static": {},
            "models": {},
        }
        for name, (table, tok) in static_tables.items():
            try:
                entry["static"][name] = [t for t, _ in nearest(table, tok, w, k=k)]
            except NLMError:
                entry["static"][name] = None  # not in that model's vocabulary
        for name, engine in engines.items():
            vectors, logprobs, texts = read_occurrences(engine, contexts, w)
            if len(vectors) < 2:
                entry["models"][name] = None
                continue
            labels = kmeans(vectors, 2, seed)
            clusters = []
            for j in range(int(labels.max()) + 1):
                members = (labels == j).nonzero().flatten().tolist()
                clusters.append({
                    "size": len(members),
                    "neighbours": slot_words(engine.tokenizer, logprobs[members], w, k),
                    "examples": [texts[m] for m in members[:2]],
                })  # fmt: skip
            entry["models"][name] = {
                "separation": round(separation(vectors, labels), 4),
                "clusters": clusters,
            }
            figure.append((w, name, vectors, labels))
        report["words"].append(entry)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "contextual.json", report)
    _plot(figure, list(engines), words, out / "contextual.png")
    (out / "contextual.md").write_text(markdown(report), encoding="utf-8")
    return report


def markdown(report: dict[str, Any]) -> str:
    """The report: per word, each model's clusters (size, slot words, an example) beside the
    static vectors' neighbours."""
    lines = [
        "# One word, several senses: contextual vs static vectors",
        "",
        "Each occurrence of a word gets its own vector from the contextual models "
        f"({', '.join(report['contextual'])}); 2-means splits them, and each cluster lists the "
        "words the model puts in that slot from the context. The static models "
        f"({', '.join(report['static']) or 'none given'}) have one vector per word: its "
        "nearest neighbours by cosine. `separation` = 1 - within/total sum of squares of the "
        "unit vectors. Figure: contextual.png (PCA of each word's occurrence vectors).",
        "",
    ]
    for entry in report["words"]:
        lines += [f"## {entry['word']} ({entry['occurrences']} occurrences)", ""]
        for name, neighbours in entry["static"].items():
            shown = ", ".join(neighbours) if neighbours else "(not in its vocabulary)"
            lines.append(f"- static {name}: {shown}")
        for name, result in entry["models"].items():
            if result is None:
                lines.append(f"- {name}: too few occurrences it reads as one token")
                continue
            lines.append(f"- {name} (separation {result['separation']:.3f}):")
            for j, c in enumerate(result["clusters"]):
                example = c["examples"][0] if c["examples"] else ""
                lines.append(
                    f"  - cluster {j + 1} ({c['size']}): {', '.join(c['neighbours'])}"
                    f' — e.g. "{example}"'
                )
        lines.append("")
    return "\n".join(lines)


def _plot(figure: list, models: list[str], words: list[str], path: Path) -> None:
    from nlm.study.report import _font_props, _pyplot, font_for, pca_2d

    plt = _pyplot()
    props = _font_props(font_for(words))
    fig, axes = plt.subplots(
        len(words), len(models), figsize=(4 * len(models), 3.2 * len(words)), squeeze=False
    )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for w, name, vectors, labels in figure:
        ax = axes[words.index(w)][models.index(name)]
        xy = pca_2d(torch.nn.functional.normalize(vectors, dim=1))
        ax.scatter(xy[:, 0], xy[:, 1], c=labels.tolist(), cmap="coolwarm", s=14)
        ax.set_title(f"{name}: {w}", **props)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def static_runs(out: str | Path) -> dict[str, str]:
    """The word-vector study's checkpoints under OUT/runs (fnn, rnn, lstm...) that exist."""
    runs = Path(out) / "runs"
    if not runs.is_dir():
        return {}
    return {p.name: str(p) for p in sorted(runs.iterdir()) if (p / "model").is_dir()}
