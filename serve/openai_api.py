"""The OpenAI-compatible surface of the gateway: request schemas, errors in OpenAI's shape, and
the routes (a mixin of `Gateway`, serve/app.py), which translate to the model replicas'
`OpenAIServing` methods (serve/openai_server.py).

    GET  /v1/models                    OpenAI's list; each entry also carries nlm's metadata
    POST /v1/completions               text or token-id prompts, n, stop, seed, logprobs, echo,
                                       stream (Server-Sent Events); causal families
    POST /v1/embeddings                families that embed
    GET  /tokenizer_info, POST /tokenize, /detokenize     vLLM's shapes (lm-evaluation-harness)
    /models/{name}/...                 all of the above for one model: a base URL per model, so
                                       a client that reads one tokenizer per server (lm-eval)
                                       scores every model with its own

Errors on these routes are {"error": {"message", "type", "param", "code"}} (OpenAI's shape),
400 for a bad request (OpenAI does not use 422), 401, 404 for an unknown model, 503 while a
replica restarts. Fields OpenAI defines that nlm cannot honour (best_of > n, suffix,
logit_bias, presence/frequency penalties) are refused with a 400 naming the field, never
ignored. The request bodies are read here rather than by FastAPI so that every error keeps
this shape.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)

from nlm.serve.schemas import ModelsResponse

log = logging.getLogger(__name__)
router = APIRouter()
STARTED = int(time.time())  # `created` of every model: when this gateway started
INFO_TIMEOUT_S = 10.0  # GET /v1/models waits this long for each model's replica
_UNAVAILABLE = (
    RayActorError,
    ReplicaUnavailableError,
    DeploymentUnavailableError,
    BackPressureError,
)


async def _awaited(response: Any) -> Any:
    """Await a DeploymentResponse (asyncio.wait_for wants a coroutine)."""
    return await response


_model_of_request: contextvars.ContextVar[str] = contextvars.ContextVar("model", default="")
UNAVAILABLE = (
    RayActorError,
    ReplicaUnavailableError,
    DeploymentUnavailableError,
    BackPressureError,
)
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    503: "service_unavailable",
}
MAX_PROMPTS = 1024
Text = Annotated[str, Field(max_length=100_000)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=100_000)]


def openai_paths(path: str) -> bool:
    """Whether `path` answers errors in OpenAI's shape."""
    return path.startswith(("/v1/completions", "/v1/embeddings", "/v1/models", "/models/")) or (
        path in ("/tokenizer_info", "/tokenize", "/detokenize")
    )


def openai_error(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": code}},
        status_code=status,
    )


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response(self) -> JSONResponse:
        return openai_error(self.status, self.message, self.code, self.param)


# ---------------------------------------------------------------- request schemas


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class CompletionRequest(_Body):
    """OpenAI's legacy Completions request (https://platform.openai.com/docs/api-reference/
    completions/create), plus `top_k`."""

    model: str = Field(min_length=1, max_length=128)
    prompt: (
        Text
        | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    max_tokens: int = Field(16, ge=0, le=1_000_000, description="0 with echo: score the prompt")
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, le=1_000_000, description="nlm extension")
    n: int = Field(1, ge=1, le=128)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    ignore_eos: bool = Field(False, description="vLLM extension: go on past </s>")
    # Defined by OpenAI, honoured only at their neutral values (a 400 names the field otherwise).
    best_of: int | None = None
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.best_of not in (None, self.n):
            raise ValueError("best_of: not supported by nlm (leave it out or equal to n)")
        if self.suffix:
            raise ValueError("suffix: not supported by nlm (insertion needs a suffix model)")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported by nlm")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ValueError(f"{name}: not supported by nlm (leave it out or 0)")
        return self


class EmbeddingRequest(_Body):
    model: str = Field(min_length=1, max_length=128)
    input: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)]
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32
    user: str | None = Field(None, max_length=256)


class TokenizeRequest(_Body):
    prompt: Text
    add_special_tokens: bool = False
    model: str | None = None


class DetokenizeRequest(_Body):
    tokens: Annotated[list[int], Field(max_length=100_000)]
    model: str | None = None


def _first_error(exc: ValidationError) -> OpenAIError:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    param = loc[0] if loc else None
    message = err.get("msg", "invalid").removeprefix("Value error, ")
    if ":" in message and param is None:  # from _unsupported: "field: why"
        param = message.split(":", 1)[0]
    if err.get("type") == "extra_forbidden":
        message = "unknown field (not part of this API)"
    # Union members add their type names to `loc`; the field and list indices are what count.
    where = (loc[0] + "".join(f"[{p}]" for p in loc[1:] if p.isdigit())) if loc else None
    where = where or param or "body"
    return OpenAIError(400, f"field '{where}': {message}", "invalid_request", param)


async def _read(request: Request, schema: type[BaseModel]) -> Any:
    try:
        raw = json.loads(await request.body() or b"null")
    except (ValueError, UnicodeDecodeError):
        raise OpenAIError(400, "the body is not valid JSON", "invalid_json") from None
    if not isinstance(raw, dict):
        raise OpenAIError(400, "the body must be a JSON object", "invalid_request")
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise _first_error(exc) from None


_DECLARED_BODIES: set[type[BaseModel]] = set()  # every schema a route names through `_body`


def _body(schema: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` declaring a route's JSON body as `schema` (in components/schemas, added by
    `add_body_schemas`). The routes read the body themselves (`_read`) so that a bad one gets
    OpenAI's error shape, which FastAPI's own body parameters would not give."""
    _DECLARED_BODIES.add(schema)
    ref = {"$ref": f"#/components/schemas/{schema.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def add_body_schemas(app: Any) -> None:
    """Put the request bodies that `_body` refers to into `app`'s OpenAPI document."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        document = generate()
        components = document.setdefault("components", {}).setdefault("schemas", {})
        for schema in _DECLARED_BODIES:
            body = schema.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[schema.__name__] = body
        app.openapi_schema = document
        return document

    app.openapi = openapi


def _answer(answer: dict[str, Any]) -> dict[str, Any]:
    if "error" in answer:
        err = answer["error"]
        raise OpenAIError(answer.get("status", 400), err["message"], err["code"], err.get("param"))
    return answer


_REQUESTS: list[Any] = []


def _requests_counter() -> Any:
    """The gateway's request counter, made in the replica on first use (Ray metrics must be
    created inside the process that records them)."""
    if not _REQUESTS:
        from ray.serve import metrics

        _REQUESTS.append(
            metrics.Counter(
                "nlm_requests",
                description="Requests to the OpenAI-compatible routes by model, route, status.",
                tag_keys=("model", "path", "status"),
            )
        )
    return _REQUESTS[0]


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


# ---------------------------------------------------------------- the routes (Gateway mixin)


class OpenAIRoutes:
    """Routes of the OpenAI surface. Needs `models` (name -> handle), `catalog` and
    `started` (unix time) on the gateway."""

    def _model(self, name: str | None, endpoint: str) -> Any:
        # Metric labels name served models only: a label per made-up name would let any client
        # grow the metric without bound (and a non-ASCII one failed the exporter: a 500).
        _model_of_request.set(name if name in self.models else "unknown")
        if name not in self.models:
            raise OpenAIError(
                404,
                f"The model '{name}' does not exist (serving: {', '.join(sorted(self.models))})",
                "model_not_found",
                "model",
            )
        if endpoint not in self.catalog[name]["endpoints"]:
            family = self.catalog[name]["family"]
            serving = [m for m, c in sorted(self.catalog.items()) if endpoint in c["endpoints"]]
            raise OpenAIError(
                400,
                f"'{name}' is a {family} model, which does not serve this endpoint "
                f"(models that do: {', '.join(serving) or 'none'})",
                "wrong_family",
                "model",
            )
        return self.models[name]

    def _only(self, path_model: str | None, body_model: str | None) -> str:
        """The model a tokenizer or per-model call is for."""
        if path_model is not None:
            if body_model not in (None, path_model):
                raise OpenAIError(
                    400,
                    f"field 'model': '{body_model}' on the route of model '{path_model}'",
                    "model_mismatch",
                    "model",
                )
            return path_model
        if body_model is not None:
            return body_model
        if len(self.models) == 1:
            return next(iter(self.models))
        raise OpenAIError(
            400,
            "several models are served: name one in 'model', or use /models/<name>/...",
            "model_required",
            "model",
        )

    async def _guard(self, call: Any, route: str) -> Any:
        """Await a route's work: OpenAI-shaped errors, and the request counted by model,
        route and status (Prometheus `nlm_requests_total`)."""
        try:
            answer = await call
        except OpenAIError as exc:
            answer = exc.response()
        except UNAVAILABLE as exc:
            answer = openai_error(
                503,
                f"the model is restarting or overloaded, retry ({type(exc).__name__})",
                "unavailable",
            )
        except RayTaskError as exc:
            log.exception("a model replica failed")
            answer = openai_error(500, f"the model failed ({type(exc.cause).__name__})", "internal")
        status = answer.status_code if hasattr(answer, "status_code") else 200
        _requests_counter().inc(
            tags={"model": _model_of_request.get(), "path": route, "status": str(status)}
        )
        return answer

    # ---- models

    async def _models(self, only: str | None = None) -> dict[str, Any]:
        """Every model (or `only`): those that answer within INFO_TIMEOUT_S with their details,
        the others (a replica restarting, or too busy) marked `available: false`."""

        async def one(name: str) -> dict[str, Any]:
            response = self.models[name].info.remote()
            try:
                info = await asyncio.wait_for(_awaited(response), INFO_TIMEOUT_S)
            except (*_UNAVAILABLE, TimeoutError) as exc:
                response.cancel()
                info = {
                    "name": name,
                    "available": False,
                    "family": self.catalog[name]["family"],
                    "endpoints": self.catalog[name]["endpoints"],
                    "reason": f"{type(exc).__name__}: restarting or busy, retry",
                }
            return {"id": name, "object": "model", "created": STARTED, "owned_by": "nlm"} | info

        names = [only] if only else list(self.models)
        return {"object": "list", "data": await asyncio.gather(*(one(n) for n in names))}

    @router.get("/v1/models", tags=["openai"], response_model=ModelsResponse)
    async def list_models(self) -> Any:
        """OpenAI's model list; each entry also has nlm's metadata (family, endpoints,
        parameters, vocabulary, tokenizer, recorded test figures, the replica's counters)."""
        return await self._guard(self._models(), "/v1/models")

    @router.get("/models/{name}/v1/models", tags=["openai"], response_model=ModelsResponse)
    async def list_one_model(self, name: str) -> Any:
        async def run() -> Any:
            self._model(name, "score")
            return await self._models(name)

        return await self._guard(run(), "/models/{name}/v1/models")

    # ---- completions

    async def _completions(self, request: Request, name: str | None) -> Any:
        body = await _read(request, CompletionRequest)
        model = self._only(name, body.model) if name else body.model
        handle = self._model(model, "generate")
        args = body.model_dump()
        args["model_name"] = body.model
        if body.stream:
            return await self._stream(handle, args)
        started = time.monotonic()
        answer = _answer(await handle.completion.remote(args))
        answer.setdefault("usage", {})
        log.debug("completion in %.3f s", time.monotonic() - started)
        return answer

    async def _stream(self, handle: Any, args: dict[str, Any]) -> Any:
        chunks = handle.options(stream=True).completion_chunks.remote(args)
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            raise OpenAIError(500, "the model ended the stream at once", "internal") from None
        _answer(first)
        usage = bool(args.get("stream_options") and args["stream_options"]["include_usage"])

        async def events() -> Any:
            try:
                piece = first
                while True:
                    if "usage" not in piece or usage:
                        yield _sse(piece)
                    try:
                        piece = await chunks.__anext__()
                    except StopAsyncIteration:
                        break
                yield "data: [DONE]\n\n"
            except UNAVAILABLE as exc:
                error = openai_error(
                    503, f"the model went away ({type(exc).__name__})", "unavailable"
                )
                yield f"data: {error.body.decode()}\n\n"
            finally:
                chunks.cancel()  # a client that left frees its rows at the next decode step

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @router.post("/v1/completions", tags=["openai"], openapi_extra=_body(CompletionRequest))
    async def completions(self, request: Request) -> Any:
        """Complete prompts (text or token ids); `stream: true` answers Server-Sent Events."""
        return await self._guard(self._completions(request, None), "/v1/completions")

    @router.post(
        "/models/{name}/v1/completions", tags=["openai"], openapi_extra=_body(CompletionRequest)
    )
    async def model_completions(self, name: str, request: Request) -> Any:
        return await self._guard(self._completions(request, name), "/models/{name}/v1/completions")

    # ---- embeddings

    async def _embeddings(self, request: Request, name: str | None) -> Any:
        body = await _read(request, EmbeddingRequest)
        model = self._only(name, body.model) if name else body.model
        handle = self._model(model, "embed")
        args = {**body.model_dump(), "model_name": body.model}
        return _answer(await handle.embeddings.remote(args))

    @router.post("/v1/embeddings", tags=["openai"], openapi_extra=_body(EmbeddingRequest))
    async def embeddings(self, request: Request) -> Any:
        """A vector per input: the mean of the final hidden states over the input's tokens."""
        return await self._guard(self._embeddings(request, None), "/v1/embeddings")

    @router.post(
        "/models/{name}/v1/embeddings", tags=["openai"], openapi_extra=_body(EmbeddingRequest)
    )
    async def model_embeddings(self, name: str, request: Request) -> Any:
        return await self._guard(self._embeddings(request, name), "/models/{name}/v1/embeddings")

    # ---- the tokenizer (vLLM's shapes)

    async def _tokenizer_info(self, name: str | None) -> Any:
        model = self._only(name, None)
        return await self._model(model, "score").tokenizer_info.remote()

    async def _tokenize(self, request: Request, name: str | None) -> Any:
        body = await _read(request, TokenizeRequest)
        handle = self._model(self._only(name, body.model), "score")
        return await handle.tokenize.remote(body.model_dump())

    async def _detokenize(self, request: Request, name: str | None) -> Any:
        body = await _read(request, DetokenizeRequest)
        handle = self._model(self._only(name, body.model), "score")
        return _answer(await handle.detokenize.remote(body.model_dump()))

    @router.get("/tokenizer_info", tags=["tokenizer"])
    async def tokenizer_info(self) -> Any:
        """The tokenizer's special tokens (one served model; else /models/<name>/...)."""
        return await self._guard(self._tokenizer_info(None), "/tokenizer_info")

    @router.post("/tokenize", tags=["tokenizer"], openapi_extra=_body(TokenizeRequest))
    async def tokenize(self, request: Request) -> Any:
        return await self._guard(self._tokenize(request, None), "/tokenize")

    @router.post("/detokenize", tags=["tokenizer"], openapi_extra=_body(DetokenizeRequest))
    async def detokenize(self, request: Request) -> Any:
        return await self._guard(self._detokenize(request, None), "/detokenize")

    @router.get("/models/{name}/tokenizer_info", tags=["tokenizer"])
    async def model_tokenizer_info(self, name: str) -> Any:
        return await self._guard(self._tokenizer_info(name), "/models/{name}/tokenizer_info")

    @router.post(
        "/models/{name}/tokenize", tags=["tokenizer"], openapi_extra=_body(TokenizeRequest)
    )
    async def model_tokenize(self, name: str, request: Request) -> Any:
        return await self._guard(self._tokenize(request, name), "/models/{name}/tokenize")

    @router.post(
        "/models/{name}/detokenize", tags=["tokenizer"], openapi_extra=_body(DetokenizeRequest)
    )
    async def model_detokenize(self, name: str, request: Request) -> Any:
        return await self._guard(self._detokenize(request, name), "/models/{name}/detokenize")

    # ---- the playground

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self) -> Any:
        """A page to try the models: completions streamed token by token, fill-mask, neighbours."""
        from importlib.resources import files

        return HTMLResponse(files("nlm.serve").joinpath("playground.html").read_text("utf-8"))


__all__ = ["OpenAIRoutes", "openai_error", "openai_paths", "router"]
