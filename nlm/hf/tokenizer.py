"""nlm tokenizers in Hugging Face's own format, built with the `tokenizers` library.

Each kind becomes the `tokenizers` pipeline that gives nlm's ids, special ids included:
- word: WordLevel over nlm's vocabulary (its ids, `<unk>` for the rest), split on whitespace as
  Python's `str.split()` does (the normalizer turns U+001C..U+001F, which Python counts as
  whitespace and Rust does not, into spaces).
- char: WordLevel over the characters, one split per character (whitespace dropped first when
  the tokenizer is `segmented`); the decoder fuses the characters back together.
- spm-bpe / spm-unigram: BPE (merges from the SentencePiece model, as `transformers` converts
  it) / Unigram (pieces and scores) with SentencePiece's whitespace handling: runs of spaces
  collapse to one, the ends are stripped, "▁" marks a space and starts every piece of text;
  byte fallback (nlm's default) as `tokenizers`' own (a character without a piece is its UTF-8
  byte pieces <0xE6>..., which the decoder turns back into the character), as `transformers`
  converts Llama's SentencePiece model.
- hf (imported): the Hugging Face tokenizer it came from.

The seven special tokens are added as special tokens, so a literal "[MASK]" or "<unk>" in a text
is one id, as in nlm; a span model's sentinels `<extra_id_k>` follow as additional special tokens
with nlm's ids (the last of the vocabulary), as T5's tokenizer has them. What cannot be made exact is refused with a one-line NLMError (a
SentencePiece model with a normalization rule or whitespace handling nlm never trains).
"""

from __future__ import annotations

from typing import Any

from nlm.errors import NLMError
from nlm.tokenizers.base import SPECIAL_TOKENS, Tokenizer

# tokenizer_config.json's name for each of nlm's special tokens
ROLES = {
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
# Python's str.isspace() characters that are not Unicode White_Space (Rust's is_whitespace).
_PY_ONLY_SPACE = "[\x1c-\x1f]"


def backend_tokenizer(tokenizer: Tokenizer) -> Any:
    """A `tokenizers.Tokenizer` that encodes every text to the ids `tokenizer` gives."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    kind = tokenizer.kind
    if kind == "hf":
        return Backend.from_str(tokenizer.backend_json)
    if kind in ("word", "char"):
        vocab = {token: i for i, token in enumerate(tokenizer.tokens)}
        backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
        if kind == "word":
            backend.normalizer = normalizers.Replace(Regex(_PY_ONLY_SPACE), " ")
            backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        else:
            if tokenizer.settings.get("segmented"):
                backend.normalizer = normalizers.Replace(Regex(rf"\s|{_PY_ONLY_SPACE}"), "")
            backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
            backend.decoder = decoders.Fuse()
    elif kind in ("spm-bpe", "spm-unigram"):
        backend = _sentencepiece_backend(tokenizer)
    else:
        raise NLMError(f"tokenizer kind {kind!r} has no Hugging Face equivalent")
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    sentinels = sentinel_tokens(tokenizer)
    if sentinels:  # T5's <extra_id_k>, after the vocabulary (nlm/tokenizers/sentinels.py)
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in sentinels]
        )
        first = tokenizer.first_sentinel  # type: ignore[attr-defined]
        if backend.token_to_id(sentinels[0]) != first or backend.get_vocab_size() != (
            tokenizer.vocab_size
        ):
            raise NLMError(
                f"{kind} tokenizer: its sentinel tokens would not get nlm's ids "
                f"{first}..{tokenizer.vocab_size - 1} in `tokenizers`; not exported"
            )
    return backend


def sentinel_tokens(tokenizer: Tokenizer) -> list[str]:
    """`<extra_id_0>` ... of a tokenizer with sentinels, in id order; [] for a plain one."""
    from nlm.tokenizers.sentinels import sentinel_count, sentinel_token

    return [sentinel_token(k) for k in range(sentinel_count(tokenizer))]


def _sentencepiece_backend(tokenizer: Any) -> Any:
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    proto = pb.ModelProto()
    proto.ParseFromString(tokenizer.model_proto)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    refuse = None
    if norm.precompiled_charsmap or norm.name not in ("identity", ""):
        refuse = f"normalization rule '{norm.name}'"
    elif spec.treat_whitespace_as_suffix or not spec.split_by_whitespace:
        refuse = "non-default whitespace handling"
    elif not norm.add_dummy_prefix or not norm.escape_whitespaces:
        refuse = "non-default whitespace handling"
    if refuse:
        raise NLMError(
            f"{tokenizer.kind} tokenizer: its {refuse} has no exact `tokenizers` equivalent; "
            "not exported"
        )
    pieces = [(p.piece, p.score) for p in proto.pieces]
    byte_fallback = bool(spec.byte_fallback)
    if tokenizer.kind == "spm-unigram":
        model = models.Unigram(pieces, unk_id=1, byte_fallback=byte_fallback)
    else:
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        normal = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == p.NORMAL}
        model = models.BPE(
            vocab,
            _bpe_merges(normal),  # byte pieces never merge
            unk_token="<unk>",
            fuse_unk=True,
            byte_fallback=byte_fallback,
        )
    backend = Backend(model)
    steps = []
    if norm.remove_extra_whitespaces:  # SentencePiece: strip the ends, collapse runs of " "
        steps += [
            normalizers.Replace(Regex("^ +| +$"), ""),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    if steps:
        backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    if byte_fallback:  # bytes back to characters before the spaces: transformers' Llama decoder
        backend.decoder = decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(content=" ", left=1, right=0),
            ]
        )
    else:
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return backend


def _bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """SentencePiece BPE as ranked merges: every split of a piece into two pieces, ranked by
    the merged piece's id (SentencePiece merges the best-scoring piece first; a BPE model's
    scores fall with the id). What `transformers`' SentencePieceExtractor does."""
    merges = []
    for piece, piece_id in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((piece_id, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def fast_tokenizer(tokenizer: Tokenizer, family: str, max_length: int) -> Any:
    """A `transformers.PreTrainedTokenizerFast` with the special tokens' roles and the inputs
    the family's model takes (GPT-2 gets no token_type_ids); bert adds [CLS] ... [SEP]."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = backend_tokenizer(tokenizer)
    if tokenizer.kind == "hf":
        roles = dict(tokenizer.special_tokens)
    else:
        roles = dict(ROLES)
    if sentinel_tokens(tokenizer):  # as T5's tokenizer lists its <extra_id_k>
        roles["extra_special_tokens"] = sentinel_tokens(tokenizer)
    if family == "bert" and tokenizer.kind != "hf":
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", tokenizer.cls_id), ("[SEP]", tokenizer.sep_id)],
        )
    names = ["input_ids", "attention_mask"]
    if family == "bert":
        names = ["input_ids", "token_type_ids", "attention_mask"]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_input_names=names,
        model_max_length=max_length,
        padding_side="left" if family == "gpt" else "right",
        clean_up_tokenization_spaces=False,
        **roles,
    )
