"""The FastAPI app: OpenAI `/v1/models` and `/v1/chat/completions`, CASA live sessions under `/v1/sessions`, and the
live-captioning page at `/`. `casa-hf serve` runs it with uvicorn.

Why not only `transformers serve` (which serves CASA through `python -m casa_hf.serving.transformers_serve serve`):
it keeps no cache between requests, so it has no live sessions. Its 5.24 inference thread and token streamer live on
here (see `inference_thread.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from importlib import resources

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from ..streaming import CasaStream, TextBudget
from .chat import ServeLimits, parse_chat_request
from .engine import Engine, sse
from .errors import ApiError
from .images import load_image_url
from .sessions import SessionStore, new_stream

STATIC = resources.files("casa_hf.serving") / "static"
DEFAULT_QUESTION = "Describe what happens."


async def json_body(request: Request, max_bytes: int) -> dict:
    """The request's JSON object, or a 4xx naming what is wrong with it."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(415, f"expected Content-Type application/json, got {content_type or 'none'!r}")
    if int(request.headers.get("content-length") or 0) > max_bytes:
        raise ApiError(413, f"the request body is over the {max_bytes} byte limit")
    data = await request.body()
    if len(data) > max_bytes:
        raise ApiError(413, f"the request body is {len(data)} bytes, over the {max_bytes} byte limit")
    try:
        body = json.loads(data)
    except ValueError as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}") from error
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _int_field(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(400, f"{name} must be an integer in [{low}, {high}], got {value!r}", name)
    return value


def _text_field(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string, got {type(value).__name__}", name)
    return value or None


def build_app(engine: Engine, limits: ServeLimits | None = None) -> FastAPI:
    """The server around one loaded model."""
    limits = limits or ServeLimits()
    store = SessionStore(limits)
    max_body = limits.max_images * limits.max_image_bytes * 4 // 3 + 1024 * 1024  # base64 images plus the text

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async def sweep() -> None:
            while True:
                await asyncio.sleep(min(limits.session_ttl_s / 4, 5.0))
                store.expire()

        sweeper = asyncio.create_task(sweep())
        yield
        sweeper.cancel()

    app = FastAPI(title="casa-hf", lifespan=lifespan)
    app.state.engine, app.state.sessions, app.state.limits = engine, store, limits

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse(ApiError(error.status_code, str(error.detail)).body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def server_error(_request: Request, error: Exception) -> JSONResponse:
        return JSONResponse(ApiError(500, f"{type(error).__name__}: {error}").body(), status_code=500)

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": engine.model_id, **store.totals()}

    def model_card() -> dict:
        return {"id": engine.model_id, "object": "model", "created": 0, "owned_by": "casa-hf"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id != engine.model_id:
            raise ApiError(404, f"model {model_id!r} is not served here; this server serves {engine.model_id!r}")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        chat = parse_chat_request(await json_body(request, max_body), engine.model_id, limits)
        if chat.stream:
            return StreamingResponse(await engine.stream(chat), media_type="text/event-stream")
        return await engine.complete(chat)

    @app.post("/v1/sessions", status_code=201)
    async def create_session(request: Request) -> dict:
        body = await json_body(request, max_body)
        question = _text_field(body, "prompt") or DEFAULT_QUESTION
        max_tokens = _int_field(body, "max_tokens", 16, 1, limits.max_tokens)
        window = _int_field(body, "window_tokens", limits.session_window_tokens, 1, limits.session_window_tokens)
        sink = _int_field(body, "sink_tokens", 4, 0, 64)
        stream = new_stream(engine, _text_field(body, "system"), question, max_tokens, TextBudget(sink, window))
        await engine.run(_check_turn_fits, engine, stream, True, None, "prompt")  # the system prompt and a frame
        return store.create(stream, question, max_tokens).state(limits.session_ttl_s)

    @app.get("/v1/sessions")
    async def list_sessions() -> dict:
        states = [s.state(limits.session_ttl_s) for s in store.sessions.values()]
        return {"object": "list", "data": states, **store.totals()}

    @app.get("/v1/sessions/{session_id}")
    async def session_state(session_id: str) -> dict:
        return store.get(session_id).state(limits.session_ttl_s)

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str) -> dict:
        store.delete(session_id)
        return {"id": session_id, "object": "session", "deleted": True}

    @app.post("/v1/sessions/{session_id}/frames")
    async def post_frame(session_id: str, request: Request):
        arrived = time.perf_counter()
        session = store.get(session_id)
        body = await json_body(request, max_body)
        text = _text_field(body, "text")
        frame = None
        if body.get("image") is not None:
            frame = load_image_url(body["image"], "image", limits.max_image_bytes, limits.max_image_pixels)
        elif text is None:
            raise ApiError(400, "a frame needs an image (a data: URL or a local path) and/or text", "image")
        stream = session.stream  # a frame is asked the session's question or its own text; text alone is a user turn
        await engine.run(_check_turn_fits, engine, stream, frame is not None, text, "text")

        async def events():
            async with session.lock:
                done = asyncio.get_running_loop().create_future()
                queue = engine.feed_streaming(stream, frame, text, done)
                while (item := await queue.get()) is not None and not isinstance(item, Exception):
                    yield {"type": "token", "text": item}
                try:
                    step = await done
                except Exception as error:  # noqa: BLE001  (this frame fails; the session and others go on)
                    yield ApiError(500, f"the frame failed: {type(error).__name__}: {error}").body()
                    return
                session.turns += 1
                session.frames += frame is not None
                session.last_used = time.monotonic()
                yield {
                    "type": "done",
                    "frame": session.frames - 1 if frame is not None else None,
                    "text": step.text,
                    "completion_tokens": len(step.token_ids),
                    "time_to_first_token_ms": round(step.time_to_first_token_s * 1000, 3),
                    "decode_tokens_per_s": round(step.decode_tokens_per_s, 2),
                    "latency_ms": round((time.perf_counter() - arrived) * 1000, 3),
                    "cache_tokens": step.cache_tokens,
                    "cache_bytes": step.cache_bytes,
                }

        if body.get("stream", True):
            return StreamingResponse(_sse_events(events()), media_type="text/event-stream")
        result = [event async for event in events()][-1]
        return JSONResponse(result, status_code=500 if "error" in result else 200)

    return app


async def _sse_events(events):
    async for event in events:
        yield sse(event)
    yield sse("[DONE]")


def _check_turn_fits(engine: Engine, stream: CasaStream, image: bool, text: str | None, param: str) -> None:
    """A turn (the very tokens the stream would feed next) plus its answer must fit in the session's text budget (and
    so in the model's context). On the inference thread, after the turns queued before it."""
    budget = stream.text_budget
    tokens = len(stream.next_turn_ids(image, text))
    room = budget.window_tokens - stream.max_new_tokens
    if tokens > room:
        raise ApiError(
            400,
            f"{param}: the turn is {tokens} tokens; with max_tokens={stream.max_new_tokens} the session's window of "
            f"{budget.window_tokens} tokens leaves room for {room}",
            param,
            "context_length_exceeded",
        )
    if engine.context_tokens is not None and budget.sink_tokens + budget.window_tokens + 1 > engine.context_tokens:
        raise ApiError(
            400,
            f"window_tokens: sink {budget.sink_tokens} + window {budget.window_tokens} exceed the model's context of "
            f"{engine.context_tokens} tokens",
            "window_tokens",
        )


class _AnnouncingServer(uvicorn.Server):
    """uvicorn runs at warning level, so says nothing once up: this prints where the server listens, and what."""

    def __init__(self, config: uvicorn.Config, model_id: str):
        super().__init__(config)
        self.model_id = model_id

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:  # listening (a failed bind exits instead)
            host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
            port = self.servers[0].sockets[0].getsockname()[1]  # the one bound, also when asked for port 0
            url = f"http://{host}:{port}/"
            print(f"casa-hf serve: {self.model_id} on {url} (the captioning page), OpenAI API at {url}v1", flush=True)


def serve(model: str | None, host: str = "127.0.0.1", port: int = 8000, limits: ServeLimits | None = None) -> None:
    """Load `model` (a built-in name or a folder) once and serve it until interrupted."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..builtin_models import DEFAULT_MODEL, resolve_model

    model = model or DEFAULT_MODEL
    path = resolve_model(model)
    loaded = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    engine = Engine(loaded, AutoProcessor.from_pretrained(path), model_id=str(model))
    config = uvicorn.Config(build_app(engine, limits), host=host, port=port, log_level="warning")
    _AnnouncingServer(config, engine.model_id).run()
