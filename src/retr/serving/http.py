"""A small HTTP API over a :class:`Recommender` (FastAPI; OpenAPI docs at ``/docs``).

Bad input always gets a 4xx with a one-line ``detail``, never a 500 or a stack trace:
malformed JSON or wrong types -> 422, out-of-range ``k`` or an oversized batch -> 422, a body
over ``max_body_bytes`` -> 413, unknown items (``unknown="error"``) or a history with no known
item (``empty="error"``) -> 400. Handlers are plain functions, run in FastAPI's thread pool:
the model is only read, so concurrent requests are safe.

Annotations here are evaluated eagerly (no ``from __future__ import annotations``): FastAPI
and pydantic read the request models, which are built per app from its limits, at runtime.
"""

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Annotated, Any, Literal

from retr import __version__
from retr.errors import RetrError
from retr.explain.pathway import explain_history
from retr.serving.recommender import Recommender

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BATCH = 256
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_K = 1000
DEFAULT_MAX_HISTORY = 10_000


async def _json_response(send: Send, status: int, detail: str) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413 before any handler parses them.

    A declared Content-Length over the limit is refused at once; otherwise the body is read
    (at most ``max_bytes``) and replayed to the app, so chunked uploads are bounded too.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"request body over {self.max_bytes} bytes"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _json_response(send, 400, "invalid Content-Length header")
                return
            if size > self.max_bytes:
                await _json_response(send, 413, too_large)
                return
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message]), send)
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                await _json_response(send, 413, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        await self.app(scope, _replay([{"type": "http.request", "body": body,
                                        "more_body": False}], receive), send)


def _replay(messages: list[Message], then: Receive | None = None) -> Receive:
    queue = list(messages)

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive


def _item_id(value: Any) -> str:
    """Item ids are strings; integers are accepted as their decimal string, nothing else."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ValueError("item ids must be strings or integers")


def create_app(recommender: Recommender, max_batch: int = DEFAULT_MAX_BATCH,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_k: int = DEFAULT_MAX_K,
               max_history: int = DEFAULT_MAX_HISTORY,
               titles: dict[str, str] | None = None) -> Any:
    """The FastAPI app serving ``recommender``; limits bound every request's cost."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse
        from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictBool, StrictInt
    except ImportError:
        raise RetrError("the HTTP server needs fastapi and uvicorn: "
                        "pip install fastapi uvicorn") from None
    item_id = Annotated[str, PlainValidator(_item_id, json_schema_input_type=str | int)]
    history_t = Annotated[list[item_id], Field(max_length=max_history, description=(
        "external item ids, oldest first; integers are read as their decimal string"))]
    k_t = Annotated[StrictInt, Field(ge=1, le=max_k, description="how many items to return")]

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        k: k_t = 10
        exclude_seen: StrictBool = Field(True, description="never recommend history items")
        candidates: Annotated[list[item_id], Field(max_length=max_history)] | None = Field(
            None, description="rank only these items (default: the whole catalogue)")
        unknown: Literal["skip", "error"] | None = Field(
            None, description="unknown ids: skip and report them, or reject the request")
        empty: Literal["error", "popularity"] | None = Field(
            None, description="a history with no known item: reject, or fall back to popularity")

    class RecommendRequest(Options):
        history: history_t

    class BatchRequest(Options):
        histories: Annotated[list[history_t], Field(min_length=1, max_length=max_batch)]

    class ExplainRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        history: history_t
        k: k_t = 10
        exclude_seen: StrictBool = True
        unknown: Literal["skip", "error"] | None = None

    class RecommendationOut(BaseModel):
        items: list[str]
        scores: list[float]
        used_history: list[str]
        truncated: bool
        skipped: list[str]
        skipped_candidates: list[str]
        fallback: str | None

    class BatchOut(BaseModel):
        results: list[RecommendationOut]

    app = FastAPI(title="retr", version=__version__,
                  description=f"Next-item recommendations from the {recommender.model_name} "
                              f"model trained on {recommender.dataset_name}.")

    @app.exception_handler(RetrError)
    async def _retr_error(request: Request, exc: RetrError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""),
                   "type": e.get("type", "")} for e in exc.errors()]
        if any(e["type"] == "json_invalid" for e in errors):
            return JSONResponse(status_code=422, content={
                "detail": "request body is not valid JSON", "errors": errors})
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return JSONResponse(status_code=422, content={
            "detail": f"{where}: {first['msg']}" if where else str(first["msg"]),
            "errors": errors})

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(status_code=500, content={"detail": "internal error"})

    def _kwargs(req: Options) -> dict[str, Any]:
        return {"k": req.k, "exclude_seen": req.exclude_seen, "candidates": req.candidates,
                "unknown": req.unknown, "empty": req.empty}

    @app.get("/health")
    def health() -> dict[str, str]:
        """Liveness: the model is loaded and answering."""
        return {"status": "ok"}

    @app.get("/model")
    def model_info() -> dict[str, Any]:
        """The served model, its data and the metrics it reached (results.json)."""
        return recommender.info()

    @app.post("/recommend", response_model=RecommendationOut)
    def recommend(req: RecommendRequest) -> dict[str, Any]:
        """Top-k next items after one history."""
        return recommender.recommend(req.history, **_kwargs(req)).to_dict()

    @app.post("/recommend/batch", response_model=BatchOut)
    def recommend_batch(req: BatchRequest) -> dict[str, Any]:
        """Top-k next items for each history, in order (same answers as single requests)."""
        recs = recommender.recommend_batch(req.histories, **_kwargs(req))
        return {"results": [r.to_dict() for r in recs]}

    @app.post("/explain")
    def explain(req: ExplainRequest) -> dict[str, Any]:
        """Per layer: the behaviors on the pathway, keep probabilities, attention; and top-k."""
        return explain_history(recommender, req.history, k=req.k, exclude_seen=req.exclude_seen,
                               titles=titles, unknown=req.unknown)

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    return app


def serve(recommender: Recommender, host: str = "127.0.0.1", port: int = 8000,
          max_batch: int = DEFAULT_MAX_BATCH, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          titles: dict[str, str] | None = None, limit_concurrency: int = 64,
          log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted (loopback only unless ``host`` says otherwise)."""
    try:
        import uvicorn
    except ImportError:
        raise RetrError("the HTTP server needs fastapi and uvicorn: "
                        "pip install fastapi uvicorn") from None
    app = create_app(recommender, max_batch=max_batch, max_body_bytes=max_body_bytes,
                     titles=titles)
    uvicorn.run(app, host=host, port=port, limit_concurrency=limit_concurrency,
                log_level=log_level, timeout_keep_alive=5)
