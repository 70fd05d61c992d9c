"""The Ray Serve application: a FastAPI ingress (`Gateway`) in front of one `ModelServer`
deployment per checkpoint (serve/deployments.py).

    nlm serve runs/gpt-small runs/bert-small runs/lstm      # local: nlm/cli/serve.py builds this
    serve deploy serve/config.yaml                          # a cluster: import_path build_app

`build_app({"checkpoints": [...], ...})` is the application builder both use. Model names come
from the checkpoint or run directory's name (`name=path` overrides); they are the deployment
names too, so serve/config.yaml can size each model's replicas.

The gateway validates bodies (schemas.py), routes by model name, and turns every failure into
JSON {"error": {"code", "message"}} with a 4xx status (503 with Retry-After while a replica
restarts or its queue is full), so no input can produce a 500. Bounds against abuse: bodies over
`max_body_bytes` get 413 before they are read (serve/limits.py), a request not answered within
`request_timeout_s` gets 504 and its work is dropped, at most `max_queued_requests` wait per
model. When NLM_API_TOKEN is set, every /v1/ endpoint wants
`Authorization: Bearer <token>`; /healthz and the OpenAPI schema stay open.
"Security model" in docs/OPERATIONS.md says exactly what the token guards. The token reaches the
gateway replica through its runtime environment, never as a pickled constructor argument.

Browsers: a POST body must be JSON (`Content-Type: application/json`, else 415), so a web page
cannot send a CORS "simple" request (form or text/plain, no preflight) that the API acts on;
and the Host header must name this server (Starlette's TrustedHostMiddleware; by default the
bind host, plus localhost / 127.0.0.1 / ::1 when it is loopback), so a DNS-rebinding page
cannot read answers either.
"""

# No `from __future__ import annotations` here: Serve's class-based FastAPI ingress needs the
# route annotations as real types to see request bodies.
import asyncio
import dataclasses
import hmac
import logging
import os
import socket
import time
from typing import Any

from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from nlm.checkpoint import read_checkpoint_config
from nlm.config import Config
from nlm.errors import NLMError
from nlm.inference import Limits, serving_endpoints
from nlm.models import model_class
from nlm.serve import limits as body_limits
from nlm.serve.catalog import parse_checkpoints
from nlm.serve.deployments import (
    DEFAULT_BATCH_WAIT_TIMEOUT_S,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_STREAM_BATCHING_INTERVAL_MS,
    ModelServer,
    endpoint_method,
)
from nlm.serve.openai_api import OpenAIRoutes, add_body_schemas, openai_error, openai_paths, router
from nlm.serve.placement import check_device_args, gpus_per_replica
from nlm.serve.schemas import (
    ERROR_RESPONSES,
    ClassifyBatchResponse,
    ClassifyRequest,
    ClassifyResponse,
    EmbedRequest,
    EmbedResponse,
    FillMaskBatchResponse,
    FillMaskRequest,
    FillMaskResponse,
    GenerateBatchResponse,
    GenerateRequest,
    GenerateResponse,
    Health,
    NeighborsRequest,
    NeighborsResponse,
    ScoreBatchResponse,
    ScoreRequest,
    ScoreResponse,
    TagBatchResponse,
    TagRequest,
    TagResponse,
)
from nlm.serve.tasks import TaskServer, task_endpoints

log = logging.getLogger(__name__)

TOKEN_ENV = "NLM_API_TOKEN"
ALLOWED_HOSTS_ENV = "NLM_ALLOWED_HOSTS"  # comma-separated; set by the gateway for its middleware
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
GATEWAY_CPUS = 0.25
OPEN_PATHS = ("/", "/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")

# ---------------------------------------------------------------- the application's arguments


@dataclasses.dataclass
class AppArgs(Config):
    """`args` of serve/config.yaml (and what `nlm serve` passes)."""

    checkpoints: list[str] = dataclasses.field(default_factory=list)  # "path" or "name=path"
    limits: dict[str, Any] = dataclasses.field(default_factory=dict)  # nlm.inference.Limits fields
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE  # 1 turns batching off
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_TIMEOUT_S
    # a streamed choice's tokens go out at most this often after its first (0: every step)
    stream_batching_interval_ms: float = DEFAULT_STREAM_BATCHING_INTERVAL_MS
    num_cpus: float | None = None  # per model replica; None keeps the deployment's default
    torch_threads: int | None = None  # per model replica; None: the whole CPUs it reserved
    num_replicas: int | None = None  # per model; None: 1, or the config's autoscaling
    # GPUs (nlm.serve.placement): where models run, in what precision, and each model
    # replica's GPU share (fractional allowed; None: 1 under cuda, else 0).
    device: str = "cpu"  # cpu | cuda | auto (a replica's GPU when Ray gave it one)
    dtype: str = "float32"  # float32 | bfloat16 | float16; logits are upcast for scoring
    num_gpus: float | None = None
    # Abuse bounds: bodies over max_body_bytes get 413 before they are read; a request not
    # answered within request_timeout_s gets 504 (its work is cancelled); beyond
    # max_queued_requests waiting for a model's replicas (per gateway replica), 503 + Retry-After.
    max_body_bytes: int = body_limits.DEFAULT_MAX_BODY_BYTES
    request_timeout_s: float = 300.0
    max_queued_requests: int = 256
    # Host header values accepted ("*" any); empty: default_allowed_hosts("127.0.0.1")
    allowed_hosts: list[str] = dataclasses.field(default_factory=list)


def default_allowed_hosts(bind_host: str) -> list[str]:
    """The Host header values a server bound to `bind_host` accepts by default: that address,
    plus localhost, 127.0.0.1 and ::1 when it is loopback; for a wildcard bind (0.0.0.0, ::)
    this machine's names and addresses. Anything else needs --allowed-host / allowed_hosts."""
    if bind_host in ("127.0.0.1", "localhost", "::1") or bind_host.startswith("127."):
        return sorted({bind_host, *LOOPBACK_HOSTS})
    if bind_host in ("0.0.0.0", "::", ""):
        names = {socket.gethostname(), socket.getfqdn(), *LOOPBACK_HOSTS}
        try:
            names |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
        except OSError:
            pass
        return sorted(names)
    return [bind_host]


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application builder (`import_path: nlm.serve.app:build_app` in serve/config.yaml)."""
    spec = AppArgs.from_dict(dict(args or {}), source="application args")
    if not isinstance(spec.checkpoints, list):
        raise NLMError("application args (field 'checkpoints'): expected a list of paths")
    if not isinstance(spec.max_batch_size, int) or spec.max_batch_size < 1:
        raise NLMError(
            f"application args (field 'max_batch_size'): must be an integer >= 1, got {spec.max_batch_size!r}"
        )
    for field, value, least in [
        ("max_body_bytes", spec.max_body_bytes, 1),
        ("request_timeout_s", spec.request_timeout_s, 0.001),
        ("max_queued_requests", spec.max_queued_requests, 1),
        ("stream_batching_interval_ms", spec.stream_batching_interval_ms, 0),
    ]:
        if not isinstance(value, int | float) or isinstance(value, bool) or value < least:
            raise NLMError(f"application args (field '{field}'): must be >= {least}, got {value!r}")
    limits = Limits.from_dict(dict(spec.limits), source="application args (field 'limits')")
    check_device_args(spec.device, spec.dtype)
    num_gpus = gpus_per_replica(spec.device, spec.num_gpus)
    models = parse_checkpoints(spec.checkpoints)

    handles: dict[str, Any] = {}
    # A fine-tuned checkpoint (nlm finetune) is served by a TaskServer: /v1/classify or /v1/tag.
    tasks = {m.name: read_checkpoint_config(m.path).get("task") for m in models}
    for model in models:
        options: dict[str, Any] = {
            "name": model.name,
            "user_config": {
                "max_batch_size": spec.max_batch_size,
                "batch_wait_timeout_s": spec.batch_wait_timeout_s,
                "stream_batching_interval_ms": spec.stream_batching_interval_ms,
            },
            # Queue room for a full batch: never below max_batch_size (ray-project/ray#43288).
            "max_ongoing_requests": max(2 * spec.max_batch_size, 8),
            "max_queued_requests": int(spec.max_queued_requests),
        }
        if spec.num_cpus is not None:
            options["ray_actor_options"] = {"num_cpus": spec.num_cpus}
        if num_gpus:
            options["ray_actor_options"] = {**options.get("ray_actor_options", {})}
            options["ray_actor_options"]["num_gpus"] = num_gpus
        if spec.num_replicas is not None:
            options["num_replicas"] = spec.num_replicas
        server = TaskServer if tasks[model.name] else ModelServer
        handles[model.name] = server.options(**options).bind(
            model.name,
            str(model.path),
            limits.to_dict(),
            spec.torch_threads,
            device=spec.device,
            dtype=spec.dtype,
        )
    catalog = {
        m.name: {
            "family": m.family,
            "endpoints": task_endpoints(tasks[m.name])
            if tasks[m.name]
            else list(serving_endpoints(model_class(m.family))),
        }
        for m in models
    }
    # The token reaches the gateway replica through its runtime environment: constructor
    # arguments are pickled into Serve's deployment state (and shown by its API). If a deploy
    # config replaces ray_actor_options (and with them this runtime_env), the replica refuses
    # to start rather than serve without the token (token_required).
    token = os.environ.get(TOKEN_ENV) or ""
    actor_options: dict[str, Any] = {
        "num_cpus": GATEWAY_CPUS if spec.num_cpus is None else spec.num_cpus
    }
    if token:
        actor_options["runtime_env"] = {"env_vars": {TOKEN_ENV: token}}
    hosts = spec.allowed_hosts or default_allowed_hosts("127.0.0.1")
    bounds = {
        "max_body_bytes": int(spec.max_body_bytes),
        "request_timeout_s": float(spec.request_timeout_s),
    }
    return Gateway.options(ray_actor_options=actor_options).bind(
        handles, catalog, limits.max_items, bool(token), list(hosts), bounds
    )


# ---------------------------------------------------------------- errors as JSON


RETRY_AFTER_S = 1  # what a 503 tells clients to wait before they retry


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = "body" if all(p.isdigit() for p in loc) else ".".join(loc)
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    more = len(exc.errors()) - 3
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


api = FastAPI(
    title="nlm",
    version="1",
    description="Neural language models (fnn, rnn, lstm, gpt, bert) served with Ray Serve. "
    'Errors are {"error": {"code", "message"}}.',
)
bearer = HTTPBearer(auto_error=False, description=f"required when the server has {TOKEN_ENV} set")
SECURED = [Security(bearer)]  # declares the scheme in OpenAPI; the middleware enforces it


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, "invalid_request", describe_validation(exc))


@api.exception_handler(StarletteHTTPException)
async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}
    return error_response(
        exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail)
    )


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.headers)


@api.exception_handler(Exception)
async def _bug(request: Request, exc: Exception) -> JSONResponse:
    # Not reachable by input (that is the point of the checks above); if a bug gets here, the
    # client still gets the JSON error shape.
    log.exception("unhandled error on %s", request.url.path)
    return error_response(500, "internal", f"internal error ({type(exc).__name__})")


api.add_middleware(body_limits.BodyLimit)


def _is_json(content_type: str) -> bool:
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (
        kind.startswith("application/") and kind.endswith("+json")
    )


@api.middleware("http")
async def _authorize(request: Request, call_next: Any) -> Any:
    token = os.environ.get(TOKEN_ENV)
    if token and request.url.path not in OPEN_PATHS:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            message = f"missing or wrong bearer token ({TOKEN_ENV} is set on the server)"
            if openai_paths(request.url.path):
                return openai_error(401, message, "invalid_api_key")
            return error_response(401, "unauthorized", message)
    if request.method in ("POST", "PUT", "PATCH") and not _is_json(
        request.headers.get("content-type", "")
    ):
        # Never read a form or text/plain body as JSON: those are what a web page can send
        # cross-origin without a preflight. (curl users: -H 'Content-Type: application/json'.)
        message = (
            "the request body must be JSON (Content-Type: application/json), got "
            f"{request.headers.get('content-type') or 'no Content-Type'}"
        )
        if openai_paths(request.url.path):
            return openai_error(415, message, "unsupported_media_type")
        return error_response(415, "unsupported_media_type", message)
    return await call_next(request)


async def _result(response: Any) -> Any:
    """Await a DeploymentResponse (asyncio.wait_for wants a coroutine)."""
    return await response


class _TrustedHosts:
    """Starlette's TrustedHostMiddleware, its host list taken from the replica's environment
    (NLM_ALLOWED_HOSTS, set by Gateway.__init__): Serve freezes `api` when the ingress class is
    decorated, before any application's arguments are known. A refused Host gets nlm's JSON
    error shape (400 invalid_host) rather than Starlette's plain text."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.allowed: list[str] | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if self.allowed is None:
            hosts = [h.strip() for h in os.environ.get(ALLOWED_HOSTS_ENV, "").split(",")]
            self.allowed = [h for h in hosts if h] or list(LOOPBACK_HOSTS)
        passed = False

        async def accept(*_: Any) -> None:
            nonlocal passed
            passed = True

        async def discard(_: Any) -> None:
            pass

        # Starlette decides (its host matching, wildcards included); only its answer differs.
        checker = TrustedHostMiddleware(accept, allowed_hosts=self.allowed, www_redirect=False)
        await checker(scope, receive, discard)
        if passed:
            await self.app(scope, receive, send)
            return
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        response = error_response(
            400, "invalid_host", f"Host {host!r} is not a name of this server (--allowed-host)"
        )
        await response(scope, receive, send)


api.add_middleware(_TrustedHosts)


# ---------------------------------------------------------------- the ingress deployment
# Serve pickles the class by value when it is decorated: whatever its methods use must be
# defined above this point.


api.include_router(router)  # the OpenAI-compatible routes and the playground (openai_api.py)
add_body_schemas(api)  # their request bodies in /openapi.json


def _count(inputs: str | list[str]) -> int:
    return 1 if isinstance(inputs, str) else len(inputs)


# A replica that cannot take the call now: restarting, not yet placed, or its queue is full.
UNAVAILABLE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)
INFO_TIMEOUT_S = 10.0  # GET /v1/models waits this long for each model's replica


def _unavailable(model: str, exc: Exception) -> ApiError:
    retry = {"Retry-After": str(RETRY_AFTER_S)}
    if isinstance(exc, BackPressureError):
        return ApiError(
            503, "overloaded", f"model '{model}' has too many queued requests, retry", retry
        )
    return ApiError(
        503,
        "unavailable",
        f"model '{model}' is restarting or not yet placed, retry: {type(exc).__name__}",
        retry,
    )


@serve.deployment(ray_actor_options={"num_cpus": GATEWAY_CPUS}, max_ongoing_requests=512)
@serve.ingress(api)
class Gateway(OpenAIRoutes):
    def __init__(
        self,
        models: dict[str, DeploymentHandle],
        catalog: dict[str, dict[str, Any]],
        max_items: int,
        token_required: bool = False,
        allowed_hosts: list[str] | None = None,
        bounds: dict[str, Any] | None = None,
    ) -> None:
        # Serve freezes a copy of `api` (and this module's globals) when the class is
        # decorated, so the middleware cannot share a variable with us: the replica's own
        # environment is the one place both see. The token is already there (runtime env).
        if token_required and not os.environ.get(TOKEN_ENV):
            raise RuntimeError(
                f"{TOKEN_ENV} was set when the application was built but is not in the gateway "
                "replica's environment (a deploy config replaced its runtime_env?): refusing "
                "to serve without it"
            )
        os.environ[ALLOWED_HOSTS_ENV] = ",".join(allowed_hosts or LOOPBACK_HOSTS)
        self.models = models
        self.catalog = catalog
        self.max_items = max_items
        bounds = bounds or {}
        self.request_timeout_s = float(bounds.get("request_timeout_s", 300.0))
        body_limits.configure(int(bounds.get("max_body_bytes", body_limits.DEFAULT_MAX_BODY_BYTES)))

    def _handle(self, model: str, endpoint: str) -> DeploymentHandle:
        if model not in self.models:
            raise ApiError(
                404,
                "unknown_model",
                f"unknown model '{model}' (serving: {', '.join(sorted(self.models))})",
            )
        if endpoint not in self.catalog[model]["endpoints"]:
            family = self.catalog[model]["family"]
            serving = [m for m, c in sorted(self.catalog.items()) if endpoint in c["endpoints"]]
            raise ApiError(
                400,
                "wrong_family",
                f"/v1/{endpoint} does not apply to '{model}', a {family} model "
                f"(models that serve it: {', '.join(serving) or 'none'})",
            )
        return self.models[model]

    async def _call(
        self, model: str, endpoint: str, body: dict[str, Any], items: int = 1
    ) -> dict[str, Any]:
        handle = self._handle(model, endpoint)
        if items > self.max_items:
            raise ApiError(
                400,
                "too_many_inputs",
                f"{items} inputs in one request; the limit is {self.max_items}",
            )
        method = endpoint_method(endpoint)
        # The replica keeps the deadline too: it drops the work when it passes.
        body = {**body, "deadline": time.time() + self.request_timeout_s}
        response = getattr(handle, method).remote(body)
        try:
            # On timeout or when the client leaves (Serve cancels this handler), the model's
            # replica is told to drop the work: cancel() reaches its handler.
            answer = await asyncio.wait_for(_result(response), self.request_timeout_s)
        except TimeoutError:
            response.cancel()
            raise ApiError(
                504,
                "timeout",
                f"model '{model}' did not answer within {self.request_timeout_s:g} s",
            ) from None
        except asyncio.CancelledError:
            response.cancel()
            raise
        except (*UNAVAILABLE, BackPressureError) as exc:
            raise _unavailable(model, exc) from None
        except RayTaskError as exc:  # a bug, not bad input: say so rather than hide it
            log.exception("model %s failed on /v1/%s", model, endpoint)
            raise ApiError(
                500, "internal", f"model '{model}' failed: {type(exc.cause).__name__}"
            ) from None
        if "error" in answer:
            raise ApiError(
                answer.get("status", 400), answer["error"]["code"], answer["error"]["message"]
            )
        return answer

    @staticmethod
    def _shape(
        model: str, inputs: str | list[str], results: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """One input in, one flat object out; a list in, {"results": [...]} out."""
        if isinstance(inputs, str):
            return {"model": model, **results[0]}
        return {"model": model, "results": results}

    @api.get("/healthz", response_model=Health)
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "models": len(self.models)}

    @api.post(
        "/v1/generate",
        response_model=GenerateResponse | GenerateBatchResponse,
        responses=ERROR_RESPONSES,
        dependencies=SECURED,
    )
    async def generate(self, body: GenerateRequest) -> dict[str, Any]:
        """Continue a prompt (or a list of them): text, tokens and per-token log-probs. Causal families."""
        answer = await self._call(body.model, "generate", body.model_dump(), _count(body.prompt))
        return self._shape(body.model, body.prompt, answer["results"])

    @api.post(
        "/v1/score",
        response_model=ScoreResponse | ScoreBatchResponse,
        responses=ERROR_RESPONSES,
        dependencies=SECURED,
    )
    async def score(self, body: ScoreRequest) -> dict[str, Any]:
        """Total log-prob, per-token perplexity and bits/byte (bert: pseudo-log-likelihood)."""
        answer = await self._call(body.model, "score", body.model_dump(), _count(body.text))
        return self._shape(body.model, body.text, answer["results"])

    @api.post(
        "/v1/fill-mask",
        response_model=FillMaskResponse | FillMaskBatchResponse,
        responses=ERROR_RESPONSES,
        dependencies=SECURED,
    )
    async def fill_mask(self, body: FillMaskRequest) -> dict[str, Any]:
        """Top-k candidates for every [MASK] in the text. bert."""
        answer = await self._call(body.model, "fill-mask", body.model_dump(), _count(body.text))
        return self._shape(body.model, body.text, answer["results"])

    @api.post(
        "/v1/embed", response_model=EmbedResponse, responses=ERROR_RESPONSES, dependencies=SECURED
    )
    async def embed(self, body: EmbedRequest) -> dict[str, Any]:
        """A vector per text: the mean of the final hidden states over the text's tokens; with
        `"granularity": "token"`, each token's vector and the tokens (elmo: the layer mix)."""
        answer = await self._call(body.model, "embed", body.model_dump(), _count(body.texts))
        vectors = answer["results"]
        first = vectors[0]["embeddings"][0] if body.granularity == "token" else vectors[0]
        return {
            "model": body.model,
            "dim": len(first),
            "granularity": body.granularity,
            "embeddings": vectors,
        }

    @api.post(
        "/v1/neighbors",
        response_model=NeighborsResponse,
        responses=ERROR_RESPONSES,
        dependencies=SECURED,
    )
    async def neighbors(self, body: NeighborsRequest) -> dict[str, Any]:
        """Nearest vocabulary entries to a word by cosine of the input embeddings."""
        answer = await self._call(body.model, "neighbors", body.model_dump())
        return {"model": body.model, "word": body.word, "neighbors": answer["neighbors"]}

    @api.post(
        "/v1/classify",
        response_model=ClassifyResponse | ClassifyBatchResponse,
        responses=ERROR_RESPONSES,
        dependencies=SECURED,
    )
    async def classify(self, body: ClassifyRequest) -> dict[str, Any]:
        """Label and label probabilities of a text (or text pair). Fine-tuned classifiers."""
        answer = await self._call(body.model, "classify", body.model_dump(), _count(body.text))
        return self._shape(body.model, body.text, answer["results"])

    @api.post(
        "/v1/tag",
        response_model=TagResponse | TagBatchResponse,
        responses=ERROR_RESPONSES,
        dependencies=SECURED,
    )
    async def tag(self, body: TagRequest) -> dict[str, Any]:
        """Tags of every token; a word segmenter given raw text also returns the words."""
        items = len(body.inputs) if body.batched else 1
        answer = await self._call(body.model, "tag", body.model_dump(), items)
        if body.batched:
            return {"model": body.model, "results": answer["results"]}
        return {"model": body.model, **answer["results"][0]}
