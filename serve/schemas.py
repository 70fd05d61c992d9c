"""The HTTP API's request and response bodies (pydantic). FastAPI turns them into the OpenAPI
schema, which is the contract clients (and the schemathesis fuzz test) rely on.

Requests are strict (`extra="forbid"`, no "5" -> 5 coercion), so a typo or a wrong type is a
422 naming the field rather than a silently ignored parameter. Limits that depend on the
deployment (longest input, most new tokens, most inputs per request) are checked at run time
against `Limits` and answered with 400, because they are configuration, not schema.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from nlm.models import FAMILIES

# The registry's names, in its order (OpenAPI shows them as the field's enum).
Family = Literal[tuple(FAMILIES)]  # type: ignore[valid-type]
ModelName = Annotated[
    str, Field(min_length=1, max_length=128, description="a name from GET /v1/models")
]
# Every string and list is bounded here, so no body parses into more than these allow (the
# gateway's body limit bounds the bytes before that; Limits bound what a model runs after).
MAX_LIST = 1024  # inputs in one request's list (Limits.max_items is the deployed, smaller bound)
Text = Annotated[str, Field(max_length=100_000)]
OneOrMany = Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_LIST)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# ---------------------------------------------------------------- errors


class ErrorBody(BaseModel):
    code: str = Field(description="machine-readable: unknown_model, wrong_family, empty_input, ...")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": what}
    for status, what in [
        (
            400,
            "bad input: empty, too long, too many tokens or items, over the compute or cache "
            "budget (over_budget), wrong model family",
        ),
        (401, "missing or wrong bearer token (only when NLM_API_TOKEN is set)"),
        (404, "unknown model or word"),
        (413, "the body is over the server's max_body_bytes (body_too_large)"),
        (422, "the body does not match the schema (wrong type, unknown field, out of range)"),
        (
            503,
            "the model's replica is restarting (unavailable) or its queue is full (overloaded); "
            "retry after the Retry-After header's seconds",
        ),
        (504, "the model did not answer within the server's request_timeout_s (timeout)"),
    ]
}


# ---------------------------------------------------------------- requests


class GenerateRequest(_Strict):
    model: ModelName
    prompt: OneOrMany = Field(description="a prompt, or a list of prompts answered together")
    max_tokens: int = Field(32, ge=1, le=1_000_000, description="new tokens per prompt")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 means greedy")
    top_k: int | None = Field(None, ge=1, le=1_000_000)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="same seed, same output, whatever else is batched"
    )
    stop_at_eos: bool = Field(True, description="end at </s> (end of document) before max_tokens")


class ScoreRequest(_Strict):
    model: ModelName
    text: OneOrMany
    source: OneOrMany | None = Field(
        None,
        description="seq2seq models (required there): score log p(text | source); "
        "same shape as text",
    )

    @model_validator(mode="after")
    def _pairs_match(self) -> ScoreRequest:
        if self.source is not None and isinstance(self.text, str) != isinstance(self.source, str):
            raise ValueError("source must have the shape of text (both strings or both lists)")
        if isinstance(self.source, list) and len(self.source) != len(self.text):
            raise ValueError("source must have as many items as text")
        return self


class FillMaskRequest(_Strict):
    model: ModelName
    text: OneOrMany = Field(description="text with one or more [MASK] tokens")
    top_k: int = Field(5, ge=1, le=1000)


class EmbedRequest(_Strict):
    model: ModelName
    texts: OneOrMany
    granularity: Literal["pooled", "token"] = Field(
        "pooled",
        description="pooled: one vector per text (the mean over its tokens); token: one vector "
        "per token, with the tokens (elmo: the layer mix; bert, gpt, lstm...: the final hidden "
        "states)",
    )


class NeighborsRequest(_Strict):
    model: ModelName
    word: Annotated[str, Field(min_length=1, max_length=200)]
    k: int = Field(10, ge=1, le=1000)


# ---------------------------------------------------------------- responses


class EndpointStats(BaseModel):
    requests: int = Field(description="HTTP requests that reached this replica's batcher")
    items: int = Field(description="inputs (a request may carry a list)")
    batches: int = Field(description="batched executions; fewer than requests means batching")
    largest_batch: int = Field(description="most requests merged into one execution")
    steps: int | None = Field(None, description="generate: decode steps of the running batch")
    largest_step: int | None = Field(
        None, description="generate: most sequences decoded together in one step"
    )
    cancelled: int | None = Field(
        None, description="generate: streamed rows dropped because their client went away"
    )
    slices: int | None = Field(
        None, description="engine slices run (long work is split; Limits.max_slice_cost)"
    )
    largest_slice: int | None = Field(
        None, description="most token positions in one slice (fine-tuned models: inputs)"
    )


class ReplicaInfo(BaseModel):
    pid: int
    replica_id: str
    max_batch_size: int
    batch_wait_timeout_s: float
    stats: dict[str, EndpointStats]


class ModelInfo(BaseModel):
    name: str
    available: Literal[True] = True
    family: Family
    endpoints: list[str]
    parameters: int
    vocab_size: int
    tokenizer: str = Field(description="tokenizer kind: word, char, spm-bpe, spm-unigram")
    max_positions: int | None = Field(description="longest input the model accepts, if bounded")
    device: str | None = Field(default=None, description="where the weights are: cpu, cuda:0")
    dtype: str | None = Field(default=None, description="the weights' dtype, e.g. bfloat16")
    test_ppl: float | None = Field(
        description="test perplexity from the checkpoint's metrics.json (`nlm eval --record`)"
    )
    test_pseudo_ppl: float | None = Field(
        default=None, description="bert: test pseudo-perplexity (`nlm eval --record`)"
    )
    val_ppl: float | None = Field(
        default=None, description="validation perplexity at the end of training, if recorded"
    )
    bits_per_byte: float | None = Field(
        description="test bits/byte from the checkpoint's metrics.json, if recorded (open "
        "vocabulary since nlm prices <unk>; metrics.json says which: "
        "test_bits_per_byte_closed_vocab is the closed figure)"
    )
    metrics: dict[str, Any] = Field(description="the checkpoint's metrics.json as saved")
    replica: ReplicaInfo = Field(
        description="the replica that answered, with its batching counters"
    )


class _OpenAIModel(BaseModel):
    id: str = Field(description="the model's name (what requests send as 'model')")
    object: Literal["model"]
    created: int = Field(description="unix time the gateway started")
    owned_by: str


class ModelEntry(_OpenAIModel, ModelInfo):
    """One entry of GET /v1/models: OpenAI's fields, then nlm's metadata."""


class UnavailableModel(_OpenAIModel):
    """A model whose replica did not answer in time (restarting, or too busy): listed, marked."""

    name: str
    available: Literal[False] = Field(description="its replica did not answer: retry later")
    family: Family
    endpoints: list[str]
    reason: str


class ModelsResponse(BaseModel):
    """OpenAI's model list (`client.models.list()` reads it); models that do not answer are
    listed with `available: false` instead of failing the whole list."""

    object: Literal["list"]
    data: list[ModelEntry | UnavailableModel]


class Generation(BaseModel):
    text: str
    tokens: list[str]
    token_ids: list[int]
    logprobs: list[float] = Field(description="log-prob of each new token under the model (T=1)")
    prompt_tokens: int
    seed: int = Field(description="the seed used; send it back to reproduce this output")
    finish_reason: Literal["length", "end_of_document"]


class GenerateResponse(Generation):
    model: str


class GenerateBatchResponse(BaseModel):
    model: str
    results: list[Generation]


class Score(BaseModel):
    measure: Literal["log-likelihood", "pseudo-log-likelihood", "conditional log-likelihood"]
    num_tokens: int
    num_bytes: int
    logprob: float = Field(description="total natural-log probability of the text's tokens")
    ppl: float = Field(
        description="per-token perplexity, exp(-logprob / num_tokens); a pseudo-perplexity for "
        "a pseudo-log-likelihood"
    )
    unk_tokens: int = Field(description="tokens of the text that are <unk>")
    unk_bytes: int | None = Field(
        description="UTF-8 bytes of the text the tokenizer maps to <unk> (null: it cannot tell)"
    )
    bits_per_byte: float | None = Field(
        description="open vocabulary: (-logprob / ln 2 + the spelling bits of each <unk>) / "
        "UTF-8 bytes; null for a pseudo-log-likelihood (no probability of the text) and when "
        "the tokenizer has no spelling model but the text has <unk>"
    )
    bits_per_byte_closed_vocab: float | None = Field(
        description="-logprob / ln 2 / UTF-8 bytes (<unk> at the price of one token); null for "
        "a pseudo-log-likelihood"
    )


class ScoreResponse(Score):
    model: str


class ScoreBatchResponse(BaseModel):
    model: str
    results: list[Score]


class Candidate(BaseModel):
    token: str
    token_id: int
    prob: float


class MaskFill(BaseModel):
    position: int = Field(description="index of the [MASK] among the text's masks, from 0")
    candidates: list[Candidate]


class FillMask(BaseModel):
    masks: list[MaskFill]


class FillMaskResponse(FillMask):
    model: str


class FillMaskBatchResponse(BaseModel):
    model: str
    results: list[FillMask]


class TokenEmbeddings(BaseModel):
    tokens: list[str]
    embeddings: list[list[float]] = Field(description="one vector per token")


class EmbedResponse(BaseModel):
    model: str
    dim: int
    granularity: Literal["pooled", "token"] = "pooled"
    embeddings: list[list[float]] | list[TokenEmbeddings]


class Neighbor(BaseModel):
    token: str
    cosine: float


class NeighborsResponse(BaseModel):
    model: str
    word: str
    neighbors: list[Neighbor]


# ---------------------------------------------------------------- fine-tuned models (serve/tasks.py)

Token = Annotated[str, Field(min_length=1, max_length=100)]
Tokens = Annotated[list[Token], Field(min_length=1, max_length=16_384)]


class ClassifyRequest(_Strict):
    model: ModelName
    text: OneOrMany = Field(description="a text, or a list answered together")
    text_b: OneOrMany | None = Field(
        None,
        description="second texts of pairs (joined with the separator token): same shape as text",
    )

    @model_validator(mode="after")
    def _pairs_match(self) -> ClassifyRequest:
        if self.text_b is not None and isinstance(self.text, str) != isinstance(self.text_b, str):
            raise ValueError("text_b must have the shape of text (both strings or both lists)")
        if isinstance(self.text_b, list) and len(self.text_b) != len(self.text):
            raise ValueError("text_b must have as many items as text")
        return self


class Classification(BaseModel):
    label: str | int
    score: float = Field(description="the probability of the label")
    probs: dict[str, float] = Field(description="every label's probability")


class ClassifyResponse(Classification):
    model: str


class ClassifyBatchResponse(BaseModel):
    model: str
    results: list[Classification]


class TagRequest(_Strict):
    model: ModelName
    text: OneOrMany | None = Field(None, description="raw text: each character is a token")
    tokens: Tokens | Annotated[list[Tokens], Field(min_length=1, max_length=MAX_LIST)] | None = (
        Field(None, description="pre-split tokens, or a list of such sequences")
    )

    @model_validator(mode="after")
    def _one_input(self) -> TagRequest:
        if (self.text is None) == (self.tokens is None):
            raise ValueError("give exactly one of text and tokens")
        return self

    @property
    def inputs(self) -> str | list:
        return self.text if self.text is not None else self.tokens  # type: ignore[return-value]

    @property
    def batched(self) -> bool:
        if self.text is not None:
            return isinstance(self.text, list)
        return isinstance(self.tokens[0], list)  # type: ignore[index]


class Tagging(BaseModel):
    tokens: list[str]
    tags: list[str]
    words: list[str] | None = Field(
        None, description="the segmentation (B/M/E/S models, text input)"
    )


class TagResponse(Tagging):
    model: str


class TagBatchResponse(BaseModel):
    model: str
    results: list[Tagging]


class Health(BaseModel):
    status: Literal["ok"]
    models: int
