"""A small HTTP API over a :class:`Recommender` (FastAPI; OpenAPI docs at ``/docs``).

Bad input always gets a 4xx with a one-line ``detail``, never a 500 or a stack trace:
malformed JSON or wrong types -> 422, out-of-range ``k`` or an oversized batch -> 422, a body
over ``max_body_bytes`` -> 413, unknown items (``unknown="error"``) or a history with no known
item (``empty="error"``) -> 400, an id that is not Unicode text (a lone surrogate such as
``"\\ud800"``, which could not be written back as JSON) -> 422. Handlers are plain functions, run
in FastAPI's thread pool: the model is only read, so concurrent requests are safe.

:func:`serve` runs uvicorn with :func:`guarded_protocol`: a request that does not arrive whole
within ``read_timeout`` seconds gets 408 and its connection is closed, and connections waiting
for a request are capped so that silent clients cannot hold every concurrency slot.

Annotations here are evaluated eagerly (no ``from __future__ import annotations``): FastAPI
and pydantic read the request models, which are built per app from its limits, at runtime.
"""

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Annotated, Any, Literal

from retr import __version__
from retr.errors import RetrError
from retr.explain.pathway import explain_history
from retr.serving.recommender import Recommender
from retr.utils import is_unicode_text

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
        if not is_unicode_text(value):
            raise ValueError(f"item id {ascii(value)} is not valid Unicode text (a lone "
                             "surrogate such as \\ud800); send ids as UTF-8 text")
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
        by: Literal["auto", "gradient_abs", "gradient", "attention", "route"] = "auto"

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
                               titles=titles, unknown=req.unknown, by=req.by)

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    return app


DEFAULT_READ_TIMEOUT = 10.0
DEFAULT_MAX_IDLE = 32
MAX_HEADER_BYTES = 16 * 1024


def guarded_protocol(read_timeout: float = DEFAULT_READ_TIMEOUT,
                     max_idle: int = DEFAULT_MAX_IDLE) -> type:
    """uvicorn's h11 protocol with a request read deadline and a cap on idle connections.

    uvicorn counts open connections against ``limit_concurrency``, and a connection that never
    sends a byte (or sends its headers one byte at a time) holds its slot until the client gives
    up. This protocol:

    * gives every request ``read_timeout`` seconds, from the connection's start or the end of the
      previous response, to arrive whole (headers and body); past it, a connection that sent
      nothing is closed, one that sent part of a request gets 408 and is closed;
    * counts the connections that are waiting for a request (silent, slow, or idle keep-alive)
      and closes the longest-waiting one when a new connection would make them more than
      ``max_idle``, or when every concurrency slot is taken: silent clients cannot hold the
      slots that clients with requests need.
    """
    if read_timeout <= 0 or max_idle < 1:
        raise ValueError("read_timeout must be > 0 and max_idle >= 1")
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    waiting_by_state: weakref.WeakKeyDictionary[Any, dict[Any, None]] = weakref.WeakKeyDictionary()

    class GuardedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _partial = False  # part of a request has arrived since the deadline was set

        def _waiting(self) -> dict[Any, None]:
            return waiting_by_state.setdefault(self.server_state, {})

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            limit = self.limit_concurrency
            waiting = self._waiting()
            while waiting and (len(waiting) >= max_idle
                               or (limit is not None and len(self.connections) >= limit)):
                oldest = next(iter(waiting))
                oldest._drop("closed to make room: idle or silent connection")
            self._start_waiting()

        def _start_waiting(self) -> None:
            self._stop_waiting()
            self._partial = False
            self._waiting()[self] = None
            self._deadline = self.loop.call_later(read_timeout, self._expire)

        def _stop_waiting(self) -> None:
            self._waiting().pop(self, None)
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _drop(self, why: str) -> None:
            self._stop_waiting()
            self.connections.discard(self)
            if self.logger.isEnabledFor(logging.DEBUG):
                self.logger.debug("%s - %s", self.client, why)
            started = self.cycle is not None and self.cycle.response_started
            if self._partial and not started and self.conn.our_state is not h11.ERROR:
                self._send_408()
            self.transport.close()

        def _expire(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self._drop(f"no whole request within {read_timeout:g} s")

        def _send_408(self) -> None:
            # written directly: h11 will not send a response before it has read a request
            body = b'{"detail": "request not received in time"}'
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json"
                                 b"\r\nconnection: close\r\ncontent-length: "
                                 + str(len(body)).encode() + b"\r\n\r\n" + body)

        def data_received(self, data: bytes) -> None:
            if data:
                self._partial = True
            super().data_received(data)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
                self._stop_waiting()  # the whole request is in: the app has it

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._start_waiting()  # keep-alive: the next request gets its own deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_waiting()
            super().connection_lost(exc)

    return GuardedH11Protocol


def server_config(recommender: Recommender, host: str = "127.0.0.1", port: int = 8000,
                  max_batch: int = DEFAULT_MAX_BATCH,
                  max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                  titles: dict[str, str] | None = None, limit_concurrency: int = 64,
                  log_level: str = "info", read_timeout: float = DEFAULT_READ_TIMEOUT,
                  max_idle: int = DEFAULT_MAX_IDLE) -> Any:
    """The ``uvicorn.Config`` that :func:`serve` runs (``port=0`` picks a free port)."""
    try:
        import uvicorn
    except ImportError:
        raise RetrError("the HTTP server needs fastapi and uvicorn: "
                        "pip install fastapi uvicorn") from None
    app = create_app(recommender, max_batch=max_batch, max_body_bytes=max_body_bytes,
                     titles=titles)
    return uvicorn.Config(app, host=host, port=port, limit_concurrency=limit_concurrency,
                          log_level=log_level, timeout_keep_alive=5,
                          http=guarded_protocol(read_timeout, max_idle),
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES)


def serve(recommender: Recommender, host: str = "127.0.0.1", port: int = 8000,
          max_batch: int = DEFAULT_MAX_BATCH, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          titles: dict[str, str] | None = None, limit_concurrency: int = 64,
          log_level: str = "info", read_timeout: float = DEFAULT_READ_TIMEOUT,
          max_idle: int = DEFAULT_MAX_IDLE) -> None:
    """Run the app with uvicorn until interrupted (loopback only unless ``host`` says otherwise).

    Slow or silent clients are bounded by :func:`guarded_protocol` (``read_timeout`` seconds per
    request, at most ``max_idle`` connections waiting for one).
    """
    import uvicorn

    config = server_config(recommender, host=host, port=port, max_batch=max_batch,
                           max_body_bytes=max_body_bytes, titles=titles,
                           limit_concurrency=limit_concurrency, log_level=log_level,
                           read_timeout=read_timeout, max_idle=max_idle)
    uvicorn.Server(config).run()
