"""Fine-tuning data: JSONL examples, label maps, encoding to ids, padded batches.

    classify:  {"text": "...", "label": L}   or   {"text_a": "...", "text_b": "...", "label": L}
    tag:       {"tokens": ["我", "爱", ...], "tags": ["S", "S", ...]}

Every problem is an NLMError naming `path:line (field 'x')`. Labels are strings or integers.
The label map is the training file's label set, sorted (a B/M/E/S tag set is always the four
tags in that order); an eval file may only use labels from it.

Gold B/M/E/S sequences must be valid (M and E only inside a word, B and S only outside one):
an invalid one is rejected, naming the line and position, never silently repaired. Predicted
sequences are valid by construction (constrained decoding, nlm.finetune.cws.viterbi_bmes).

Model inputs follow the course notes:
    gpt:   <s> text </s>        pairs: <s> a [SEP] b </s>       classify from the last position
    bert:  [CLS] text [SEP]     pairs: [CLS] a [SEP] b [SEP]    classify from the first; types 0/1
The layout follows the backbone's `summary_type` fact (nlm/models/base.py): "first" is bert's,
"last" gpt's. gpt batches are left-padded (so position -1 is every row's </s>, as generation
pads), bert batches right-padded; `attention_mask` marks real tokens. Tagging labels sit on each token's
first id (-100 elsewhere); sequences longer than the model are cut into windows.
"""

from __future__ import annotations

import dataclasses
import json
import unicodedata
from pathlib import Path
from typing import Any

import torch

from nlm.errors import NLMError, describe_location
from nlm.models import model_class
from nlm.models.base import IGNORE_INDEX
from nlm.tokenizers.base import BOS_ID, CLS_ID, EOS_ID, SEP_ID, UNK_ID, Tokenizer

TASKS = ("classify", "tag", "seq2seq")
BMES = ("B", "M", "E", "S")
Label = str | int


@dataclasses.dataclass
class ClassifyExample:
    text: str
    label: Label | None
    text_b: str | None = None
    line: int = 0


@dataclasses.dataclass
class TagExample:
    tokens: list[str]
    tags: list[str] | None
    line: int = 0


@dataclasses.dataclass
class Seq2SeqExample:
    source: str
    target: str | None
    line: int = 0


Example = ClassifyExample | TagExample | Seq2SeqExample


# --- reading ---------------------------------------------------------------------------------


def read_examples(path: str | Path, task: str, require_labels: bool = True) -> list[Example]:
    """Every example of a JSONL file (blank lines skipped), checked field by field."""
    if task not in TASKS:
        raise NLMError(f"task '{task}': not one of {', '.join(TASKS)}")
    path = Path(path)
    if not path.is_file():
        raise NLMError(f"{path}: no such file")
    examples: list[Example] = []
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise NLMError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise NLMError(
                        f"{path}:{number}: expected a JSON object, got {type(record).__name__}"
                    )
                parse = {"classify": _classify_example, "seq2seq": _seq2seq_example}.get(
                    task, _tag_example
                )
                examples.append(parse(record, path, number, require_labels))
    except UnicodeDecodeError as exc:
        raise NLMError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not examples:
        raise NLMError(f"{path}: no examples (an empty file?)")
    return examples


def _classify_example(record: dict, path: Path, line: int, require_labels: bool) -> ClassifyExample:
    def where(field: str) -> str:
        return describe_location(path, line, field)

    if "text" in record:
        text, text_b = record["text"], None
        if "text_b" in record or "text_a" in record:
            raise NLMError(f"{where('text')}: give either 'text' or 'text_a' + 'text_b', not both")
    elif "text_a" in record:
        text, text_b = record["text_a"], record.get("text_b")
        if text_b is None:
            raise NLMError(f"{where('text_b')}: missing (pairs need 'text_a' and 'text_b')")
    else:
        raise NLMError(
            f"{where('text')}: missing (a classify example has 'text' or 'text_a' + 'text_b')"
        )
    for field, value in (("text" if text_b is None else "text_a", text), ("text_b", text_b)):
        if value is None:
            continue
        if not isinstance(value, str):
            raise NLMError(f"{where(field)}: expected a string, got {type(value).__name__}")
        if not value.strip():
            raise NLMError(f"{where(field)}: empty text")
    label = _label(record, "label", where("label"), require_labels)
    return ClassifyExample(text, label, text_b, line)


def _seq2seq_example(record: dict, path: Path, line: int, require_labels: bool) -> Seq2SeqExample:
    values = {}
    for field in ("source", "target"):
        where = describe_location(path, line, field)
        value = record.get(field)
        if value is None:
            if field == "target" and not require_labels:
                continue
            raise NLMError(f"{where}: missing (a seq2seq example has 'source' and 'target')")
        if not isinstance(value, str):
            raise NLMError(f"{where}: expected a string, got {type(value).__name__}")
        if not value.strip():
            raise NLMError(f"{where}: empty text")
        values[field] = value
    return Seq2SeqExample(values["source"], values.get("target"), line)


def _tag_example(record: dict, path: Path, line: int, require_labels: bool) -> TagExample:
    def where(field: str) -> str:
        return describe_location(path, line, field)

    tokens = record.get("tokens")
    if tokens is None:
        raise NLMError(f"{where('tokens')}: missing (a tag example has 'tokens' and 'tags')")
    if not isinstance(tokens, list) or not tokens:
        raise NLMError(f"{where('tokens')}: expected a non-empty list of strings")
    for i, token in enumerate(tokens):
        if not isinstance(token, str) or not token:
            raise NLMError(f"{where('tokens')}: item {i} is {token!r}, not a non-empty string")
    tags = record.get("tags")
    if tags is None:
        if require_labels:
            raise NLMError(f"{where('tags')}: missing (a tag example has 'tokens' and 'tags')")
        return TagExample(tokens, None, line)
    if not isinstance(tags, list):
        raise NLMError(f"{where('tags')}: expected a list of strings")
    if len(tags) != len(tokens):
        raise NLMError(f"{where('tags')}: {len(tags)} tags for {len(tokens)} tokens")
    for i, tag in enumerate(tags):
        if not isinstance(tag, str) or not tag:
            raise NLMError(f"{where('tags')}: item {i} is {tag!r}, not a non-empty string")
    return TagExample(tokens, tags, line)


def _label(record: dict, field: str, where: str, required: bool) -> Label | None:
    if field not in record:
        if required:
            raise NLMError(f"{where}: missing")
        return None
    value = record[field]
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise NLMError(f"{where}: expected a string or an integer, got {value!r}")
    if isinstance(value, str) and not value:
        raise NLMError(f"{where}: empty label")
    return value


# --- label maps ------------------------------------------------------------------------------


def example_labels(example: Example) -> list[Label]:
    if isinstance(example, ClassifyExample):
        return [] if example.label is None else [example.label]
    return list(example.tags or [])


def build_label_map(examples: list[Example], path: str | Path) -> list[Label]:
    """The sorted label set of the training examples (B/M/E/S: all four, in that order)."""
    seen: set[Label] = set()
    for example in examples:
        seen.update(example_labels(example))
    if not seen:
        raise NLMError(f"{path}: no labels")
    if all(isinstance(x, str) for x in seen) and seen <= set(BMES):
        return list(BMES)
    if len({type(x) for x in seen}) > 1:
        raise NLMError(f"{path}: labels mix strings and integers ({sorted(map(repr, seen))[:4]})")
    if len(seen) < 2 and isinstance(examples[0], ClassifyExample):
        raise NLMError(f"{path}: only one label ({next(iter(seen))!r}): nothing to classify")
    return sorted(seen)  # type: ignore[type-var]


def tag_scheme(labels: list[Label]) -> str:
    """'bmes' (word segmentation), 'bio' (B-X/I-X/O chunks) or 'plain' (runs of equal tags)."""
    if list(labels) == list(BMES):
        return "bmes"
    if all(isinstance(x, str) and (x == "O" or x[:2] in ("B-", "I-")) for x in labels):
        return "bio"
    return "plain"


def check_labels(examples: list[Example], labels: list[Label], path: str | Path) -> None:
    """Every label must be in the map, and gold B/M/E/S sequences must be valid."""
    from nlm.finetune.cws import first_invalid_bmes

    known = set(labels)
    bmes = isinstance(examples[0], TagExample) and tag_scheme(labels) == "bmes"
    for example in examples:
        field = "label" if isinstance(example, ClassifyExample) else "tags"
        for label in example_labels(example):
            if label not in known:
                shown = ", ".join(map(repr, labels[:20])) + (" …" if len(labels) > 20 else "")
                raise NLMError(
                    f"{describe_location(path, example.line, field)}: unknown label {label!r} "
                    f"(the training labels are {shown})"
                )
        if bmes and example.tags is not None:
            bad = first_invalid_bmes(example.tags)
            if bad is not None:
                before = example.tags[bad - 1] if bad > 0 else "the start"
                raise NLMError(
                    f"{describe_location(path, example.line, 'tags')}: invalid B/M/E/S sequence at "
                    f"item {bad}: {example.tags[bad]!r} after {before!r} (B/S start a word, M/E "
                    "continue one, the last tag must be E or S)"
                )


# --- encoding --------------------------------------------------------------------------------


def token_ids(tokenizer: Tokenizer, token: str) -> list[int]:
    """The ids of one pre-split token: its vocabulary id, else its encoding, else <unk>."""
    found = tokenizer.token_to_id(token)
    if found is not None:
        return [found]
    return tokenizer.encode(token) or [UNK_ID]


def wrap(family: str, a: list[int], b: list[int] | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, token_type_ids) in the family's layout (see the module docstring): [CLS]
    first where its task head reads the first position, else <s> ... </s>."""
    if model_class(family).summary_type == "first":
        ids = [CLS_ID, *a, SEP_ID]
        types = [0] * len(ids)
        if b is not None:
            ids += [*b, SEP_ID]
            types += [1] * (len(b) + 1)
        return ids, types
    ids = [BOS_ID, *a, *([SEP_ID, *b] if b is not None else []), EOS_ID]
    return ids, [0] * len(ids)


def encode_classify(
    example: ClassifyExample,
    tokenizer: Tokenizer,
    family: str,
    max_length: int,
    label_index: dict[Label, int] | None = None,
) -> tuple[dict[str, Any], bool]:
    """(row, truncated): a row holds input_ids, token_type_ids and label (an index, or -100)."""
    a = tokenizer.encode(example.text) or [UNK_ID]
    b = None if example.text_b is None else (tokenizer.encode(example.text_b) or [UNK_ID])
    budget = max_length - (2 if b is None else 3)
    truncated = len(a) + (len(b) if b else 0) > budget
    if b is None:
        a = a[:budget]
    else:
        while len(a) + len(b) > budget:  # BERT's rule: trim the longer text, one id at a time
            if len(a) >= len(b):
                a = a[:-1]
            else:
                b = b[:-1]
    ids, types = wrap(family, a, b)
    label = IGNORE_INDEX
    if label_index is not None and example.label is not None:
        label = label_index[example.label]
    return {"input_ids": ids, "token_type_ids": types, "label": label}, truncated


def is_punctuation(token: str) -> bool:
    return all(unicodedata.category(c).startswith("P") for c in token)


def windows(lengths: list[int], budget: int, cut_after: list[bool]) -> list[tuple[int, int]]:
    """Split tokens into [start, end) ranges of at most `budget` ids each. A window ends after
    the last token where `cut_after` allows it (a word end, a punctuation mark), else as late as
    it fits, so long sequences are cut where a cut does the least harm."""
    spans, start = [], 0
    while start < len(lengths):
        end, used, best = start, 0, None
        while end < len(lengths) and (used + lengths[end] <= budget or end == start):
            used += lengths[end]
            end += 1
            if cut_after[end - 1]:
                best = end
        if end < len(lengths) and best is not None:
            end = best
        spans.append((start, end))
        start = end
    return spans


def tag_windows(
    tokens: list[str], tags: list[str] | None, lengths: list[int], budget: int, scheme: str
) -> list[tuple[int, int]]:
    """Windows for a tag example: cut at word/chunk ends when tags are known, else after
    punctuation."""
    if tags is not None and scheme == "bmes":
        cut = [t in ("E", "S") for t in tags]
    elif tags is not None and scheme == "bio":
        cut = [i + 1 == len(tags) or not tags[i + 1].startswith("I-") for i in range(len(tags))]
    else:
        cut = [is_punctuation(t) for t in tokens]
    return windows(lengths, budget, cut)


def encode_tag(
    example: TagExample,
    tokenizer: Tokenizer,
    family: str,
    max_length: int,
    label_index: dict[Label, int] | None = None,
    scheme: str = "plain",
) -> list[dict[str, Any]]:
    """Rows for one tag example (several when it is longer than the model): input_ids,
    token_type_ids, labels (per position, -100 off first ids), span (the window's token range)
    and first (the position of each of its tokens' first id in input_ids)."""
    budget = max_length - 2
    pieces = [token_ids(tokenizer, t)[:budget] for t in example.tokens]
    rows = []
    for start, end in tag_windows(
        example.tokens, example.tags, [len(p) for p in pieces], budget, scheme
    ):
        ids: list[int] = []
        labels: list[int] = []
        first: list[int] = []
        for i in range(start, end):
            first.append(len(ids) + 1)  # +1: after [CLS] / <s>
            ids += pieces[i]
            label = IGNORE_INDEX
            if label_index is not None and example.tags is not None:
                label = label_index[example.tags[i]]
            labels += [label] + [IGNORE_INDEX] * (len(pieces[i]) - 1)
        input_ids, types = wrap(family, ids)
        labels = [IGNORE_INDEX, *labels, IGNORE_INDEX]
        rows.append(
            {
                "input_ids": input_ids,
                "token_type_ids": types,
                "labels": labels,
                "span": [start, end],
                "first": first,
            }
        )
    return rows


def encode_examples(
    examples: list[Example],
    tokenizer: Tokenizer,
    family: str,
    max_length: int,
    labels: list[Label],
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(rows, stats) for a whole file; stats count truncated examples and extra windows."""
    index = {label: i for i, label in enumerate(labels)}
    rows: list[dict[str, Any]] = []
    stats = {"examples": len(examples), "truncated": 0, "windows": 0}
    scheme = tag_scheme(labels)
    for example in examples:
        if isinstance(example, ClassifyExample):
            row, truncated = encode_classify(example, tokenizer, family, max_length, index)
            rows.append(row)
            stats["truncated"] += truncated
        else:
            pieces = encode_tag(example, tokenizer, family, max_length, index, scheme)
            rows += pieces
            stats["windows"] += len(pieces)
    return rows, stats


def collate(rows: list[dict[str, Any]], pad_left: bool) -> dict[str, torch.Tensor]:
    """Pad a list of rows into tensors: input_ids, token_type_ids, attention_mask, and labels
    ((B,) for classify, (B, T) for tag, padding -100)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    types = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    tagging = "labels" in rows[0]
    labels = torch.full(
        (len(rows), width) if tagging else (len(rows),), IGNORE_INDEX, dtype=torch.long
    )
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        where = slice(width - n, width) if pad_left else slice(0, n)
        ids[i, where] = torch.tensor(row["input_ids"])
        types[i, where] = torch.tensor(row["token_type_ids"])
        mask[i, where] = 1
        if tagging:
            labels[i, where] = torch.tensor(row["labels"])
        else:
            labels[i] = row["label"]
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": labels}
