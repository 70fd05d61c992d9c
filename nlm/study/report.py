"""Write a comparison (the dict from compare.py) as report.json, report.md and PNG figures.

Figures use matplotlib's Agg backend. Labels need a font with every glyph (Chinese words need
a CJK font); when no installed font has them, points are labelled by the word's number and
report.md carries the number -> word legend. Projection is PCA only: t-SNE would need
scikit-learn (and scipy), which the project does not install.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nlm.files import write_text

FIGURES = ("projection-pca.png", "overlap-heatmap.png")


def write_report(
    data: dict[str, Any],
    vectors: dict[str, torch.Tensor],
    ids: dict[str, int],
    out: str | Path,
    title: str = "Word-vector comparison",
) -> Path:
    """Write OUT/report.json, OUT/report.md and the figures; report.md is written last.

    `vectors` maps model name -> (V, D) table and `ids` token -> id (for the projection).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    font = font_for(_all_labels(data))
    data = {**data, "figures": list(FIGURES), "labels": "words" if font else "numbers"}
    _plot_projection(data, vectors, ids, font, out / FIGURES[0])
    _plot_heatmap(data, out / FIGURES[1])
    _write_atomic(out / "report.json", json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    _write_atomic(out / "report.md", markdown(data, title))
    return out / "report.md"


def _write_atomic(path: Path, text: str) -> None:
    write_text(path, text)


# ---------------------------------------------------------------- markdown


def _cell(token: str) -> str:
    return token.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _model_metric(metrics: dict[str, Any]) -> str:
    for key in ("val_ppl", "ppl", "val_loss", "loss"):
        if isinstance(metrics.get(key), int | float):
            return f"{key} {metrics[key]:.3f}"
    return "-"


def markdown(data: dict[str, Any], title: str) -> str:
    k, names = data["k"], [m["name"] for m in data["models"]]
    tok = data["tokenizer"]
    lines = [
        f"# {title}",
        "",
        f"Tokenizer: {tok['kind']}, {tok['vocab_size']} tokens (fingerprint "
        f"`{tok['fingerprint'][:12]}`). Word vectors: {data['which']} embeddings. "
        f"{len(data['words'])} words drawn with seed {data['seed']}; k = {k}.",
        "",
        "## Models",
        "",
        "| model | family | parameters | dim | metric | path |",
        "| --- | --- | ---: | ---: | --- | --- |",
    ]
    for m in data["models"]:
        lines.append(
            f"| {m['name']} | {m['family']} | {m['parameters']:,} | {m['embedding_dim']} | "
            f"{_model_metric(m['metrics'])} | `{m['path']}` |"
        )
    lines += [
        "",
        "## Agreement between models",
        "",
        f"overlap@{k}: mean share of the {k} nearest neighbours two models agree on, over the "
        f"chosen words and over the whole vocabulary (two unrelated tables: "
        f"{data['chance_overlap']:.3f} by chance). Spearman: rank correlation of the cosine "
        "similarities of the same word pairs. CKA: linear centred kernel alignment (1 = same "
        "geometry up to rotation and scale). Procrustes: residual after the best rotation of "
        "centred, unit-norm tables (0 = same up to rotation and scale, at most 1).",
        "",
        f"| pair | overlap@{k} (words) | overlap@{k} (vocab) | Spearman | CKA | Procrustes |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in data["pairs"]:
        lines.append(
            f"| {p['a']} – {p['b']} | {p['overlap_words']:.3f} | {p['overlap_vocab']:.3f} | "
            f"{p['spearman']:.3f} | {p['cka']:.3f} | {p['procrustes']:.3f} |"
        )
    lines += [
        "",
        f"overlap@{k} over the whole vocabulary, by frequency: the words split into four equal "
        "bands from the most to the least frequent.",
        "",
        "| pair | most frequent 25 % | 25–50 % | 50–75 % | least frequent 25 % |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for p in data["pairs"]:
        bands = " | ".join(f"{v:.3f}" for v in p["overlap_vocab_by_frequency"])
        lines.append(f"| {p['a']} – {p['b']} | {bands} |")
    lines += [
        "",
        "Per model: the mean cosine of two distinct words (near 0: spread out; near 1: one "
        "dominant direction, so all cosines are high) and the floor, CKA and Procrustes against "
        "a random Gaussian table of the same shape.",
        "",
        "| model | mean cosine | CKA vs random | Procrustes vs random |",
        "| --- | ---: | ---: | ---: |",
    ]
    for m in data["models"]:
        lines.append(
            f"| {m['name']} | {m['mean_cosine']:.3f} | {m['cka_vs_random']:.3f} | "
            f"{m['procrustes_vs_random']:.3f} |"
        )
    lines += [
        "",
        "## Figures",
        "",
        f"![PCA of the chosen words and their neighbours]({FIGURES[0]})",
        "",
        f"![Agreement heatmaps]({FIGURES[1]})",
        "",
        "2-D projection: PCA of each model's vectors of the chosen words and their neighbours "
        "(t-SNE is not drawn: it needs scikit-learn, which is not installed).",
    ]
    if data.get("labels") == "numbers":
        lines += [
            "",
            "No installed font has these glyphs, so the figures label each chosen word by its "
            "number (neighbours share its colour): "
            + ", ".join(f"{n} {_cell(w)}" for n, w in enumerate(data["words"], 1))
            + ".",
        ]
    lines += ["", "## Neighbours", ""]
    for n, word in enumerate(data["words"], 1):
        lines += [f"### {n}. {_cell(word)}", "", "| # | " + " | ".join(names) + " |"]
        lines.append("| ---: | " + " | ".join("---" for _ in names) + " |")
        for r in range(k):
            cells = []
            for name in names:
                token, sim = data["neighbors"][word][name][r]
                cells.append(f"{_cell(token)} {sim:.3f}")
            lines.append(f"| {r + 1} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- figures


def _all_labels(data: dict[str, Any]) -> list[str]:
    labels = set(data["words"])
    for per_model in data["neighbors"].values():
        for rows in per_model.values():
            labels.update(token for token, _ in rows)
    return sorted(labels)


@functools.cache
def _font_charmaps() -> list[tuple[str, frozenset[int]]]:
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    maps = []
    for entry in sorted(font_manager.fontManager.ttflist, key=lambda f: f.fname):
        if "lastresort" in entry.fname.lower():  # maps every code point to a placeholder box
            continue
        try:
            maps.append((entry.fname, frozenset(FT2Font(entry.fname).get_charmap())))
        except (OSError, RuntimeError):
            continue
    return maps


def font_for(labels: Sequence[str]) -> str | None:
    """Path of an installed font that has every glyph of `labels` (None when none has)."""
    needed = {ord(ch) for label in labels for ch in label if not ch.isspace()}
    if all(c < 128 for c in needed):
        return "default"
    for path, charmap in _font_charmaps():
        if needed <= charmap:
            return path
    return None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _font_props(font: str | None):
    if font in (None, "default"):
        return {}
    from matplotlib.font_manager import FontProperties

    return {"fontproperties": FontProperties(fname=font)}


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """(N, 2) coordinates on the two leading principal axes, with a fixed sign per axis."""
    x = x.double() - x.double().mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    coords = x @ vh[:2].T
    # an axis is defined up to sign: point each so its farthest point lies on the positive side
    far = coords.abs().argmax(dim=0, keepdim=True)
    coords = coords * torch.sign(coords.gather(0, far))
    if coords.shape[1] < 2:
        coords = torch.cat([coords, coords.new_zeros(len(coords), 2 - coords.shape[1])], 1)
    return coords


def _plot_projection(data, vectors, ids, font, path: Path) -> None:
    plt = _pyplot()
    names = [m["name"] for m in data["models"]]
    words = data["words"]
    cmap = plt.get_cmap("tab20")
    props = _font_props(font)
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        groups = {w: [t for t, _ in data["neighbors"][w][name]] for w in words}
        tokens = list(dict.fromkeys(words + [t for w in words for t in groups[w]]))
        xy = dict(
            zip(tokens, pca_2d(vectors[name][[ids[t] for t in tokens]]).tolist(), strict=True)
        )
        labelled = set(words)
        for g, word in enumerate(words):
            colour = _colour(cmap, g)
            (qx, qy) = xy[word]
            for token in groups[word]:
                x, y = xy[token]
                ax.plot([qx, x], [qy, y], color=colour, alpha=0.25, linewidth=0.8)
                ax.scatter(x, y, s=12, color=colour, alpha=0.8)
                if font and token not in labelled:
                    labelled.add(token)
                    ax.annotate(token, (x, y), fontsize=6, alpha=0.75, **props)
        for g, word in enumerate(words):  # queries last, on top
            (x, y) = xy[word]
            ax.scatter(x, y, s=60, color=_colour(cmap, g), edgecolors="black", zorder=3)
            label = word if font else str(g + 1)
            ax.annotate(label, (x, y), fontsize=9, weight="bold", zorder=4, **props)
        ax.set_title(f"{name}: PCA of {len(words)} words + neighbours")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _colour(cmap, group: int):
    # tab20 holds 10 hue pairs (dark, light): take the 10 dark ones first, then the light ones
    return cmap((2 * group) % 20 + (group // 10) % 2)


def _plot_heatmap(data, path: Path) -> None:
    plt = _pyplot()
    names = [m["name"] for m in data["models"]]
    k = data["k"]
    panels = (
        ("overlap_words", f"overlap@{k}, chosen words"),
        ("overlap_vocab", f"overlap@{k}, whole vocabulary"),
        ("cka", "linear CKA"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        m = torch.eye(len(names), dtype=torch.float64)
        for p in data["pairs"]:
            i, j = names.index(p["a"]), names.index(p["b"])
            m[i, j] = m[j, i] = p[key]
        ax.imshow(m.numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(names)), names)
        ax.set_yticks(range(len(names)), names)
        for i in range(len(names)):
            for j in range(len(names)):
                value = float(m[i, j])
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    color="black" if value > 0.6 else "white",
                )
        ax.set_title(label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
