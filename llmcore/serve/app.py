"""OpenAI-compatible HTTP API (FastAPI) over an `Engine`, plus the web chat page.

Routes: POST /v1/chat/completions (JSON or SSE stream ending with `data: [DONE]`),
POST /v1/completions, GET /v1/models, GET /health, GET / (web chat page).
Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}} with 400 for malformed or
invalid bodies (llmcore.serve.protocol checks every request field), unknown models and requests that
exceed the context, 401 for a missing/wrong API key (when the server has one), 404 for unknown routes,
500 (server_error, never a plain-text page) for a failure of our own. A stream that fails after its
headers were sent ends with an error event and `data: [DONE]`.
Every generation runs on the scheduler's worker thread; a client that disconnects cancels its
request (the SSE generator is closed by the server, or the disconnect poller notices).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import secrets
import time
import uuid

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmcore.serve.engine import Engine, Event, SamplingParams, Scheduler
from llmcore.serve.protocol import APIError, ParsedRequest, error_body, parse_body, parse_chat, parse_completion

STATIC = pathlib.Path(__file__).with_name("static")


def create_app(engine: Engine, api_key: str | None = None, max_active: int = 16,
               default_max_tokens: int = 256) -> FastAPI:
    """Builds the app. The scheduler thread starts here and stops on app shutdown."""
    sched = Scheduler(engine, max_active=max_active)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        sched.shutdown()

    app = FastAPI(title="llmcore OpenAI-compatible server", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine = engine
    app.state.scheduler = sched
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_req, exc: APIError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req, exc):
        return JSONResponse(error_body(str(exc), "invalid_request_error"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, exc):
        t = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), t), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(_req, exc):
        return JSONResponse(error_body(f"The server had an error while processing your request "
                                       f"({type(exc).__name__}).", "server_error"), status_code=500)

    @app.middleware("http")
    async def _auth(request: HTTPRequest, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            got = request.headers.get("authorization", "")
            token = got[7:] if got.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(token.encode(), api_key.encode()):
                return JSONResponse(error_body("Incorrect API key provided.", "invalid_request_error", None,
                                               "invalid_api_key"), status_code=401)
        return await call_next(request)

    def _check_model(model: str) -> None:
        if model != engine.model_id:
            raise APIError(400, f"The model `{model}` does not exist. Available: {engine.model_id}",
                           param="model", code="model_not_found")

    def _params(p: ParsedRequest, n_prompt: int) -> SamplingParams:
        room = engine.max_seq_len - n_prompt
        where = "messages" if p.messages is not None else "prompt"
        if room <= 0:
            raise APIError(400, f"This model's maximum context length is {engine.max_seq_len} tokens; your prompt "
                                f"has {n_prompt} tokens.", param=where, code="context_length_exceeded")
        max_tokens = p.max_tokens if p.max_tokens is not None else min(default_max_tokens, room)
        if n_prompt + max_tokens > engine.max_seq_len:
            raise APIError(400, f"This model's maximum context length is {engine.max_seq_len} tokens. However, you "
                                f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} "
                                f"for the completion).", param=p.max_tokens_param, code="context_length_exceeded")
        return SamplingParams(max_tokens=max_tokens, **p.sampling)

    async def _collect(request: HTTPRequest, req) -> tuple[str, Event]:
        """Waits for the whole answer while watching the connection: a client that goes away
        cancels its generation."""
        async def watch():
            while True:
                msg = await request.receive()
                if msg["type"] == "http.disconnect":
                    req.cancel()
                    return

        watcher = asyncio.create_task(watch())
        parts = []
        try:
            while True:
                getter = asyncio.ensure_future(req.events.get())
                done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    raise asyncio.CancelledError("client disconnected")
                ev = getter.result()
                if ev.kind == "delta":
                    parts.append(ev.text)
                elif ev.kind == "done":
                    return "".join(parts), ev
                else:
                    raise APIError(500, ev.text, type_="server_error")
        finally:
            watcher.cancel()
            if not req.finished.is_set():
                req.cancel()

    def _usage(n_prompt: int, n_out: int) -> dict[str, int]:
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

    async def _sse(request: HTTPRequest, req, make_chunk, n_prompt: int, include_usage: bool, first=None):
        """Server-sent events for one request; cancels generation if the client goes away. The
        headers are sent already, so a failure (the engine's or ours) becomes an OpenAI-shaped error
        event followed by `data: [DONE]`, which ends the stream as clients expect."""
        try:
            if first is not None:
                yield f"data: {json.dumps(first, ensure_ascii=False)}\n\n"
            while True:
                try:
                    ev = await asyncio.wait_for(req.events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if ev.kind == "delta":
                    yield f"data: {json.dumps(make_chunk(ev.text, None), ensure_ascii=False)}\n\n"
                elif ev.kind == "done":
                    last = make_chunk(None, ev.finish_reason)
                    yield f"data: {json.dumps(last, ensure_ascii=False)}\n\n"
                    if include_usage:
                        u = make_chunk(None, None, usage=_usage(n_prompt, ev.completion_tokens))
                        yield f"data: {json.dumps(u, ensure_ascii=False)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                else:
                    raise RuntimeError(ev.text)
        except Exception as e:  # noqa: BLE001 - the status line is gone: report the failure in the stream
            msg = str(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"
            yield f"data: {json.dumps(error_body(msg, 'server_error'))}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # runs on normal end, on client disconnect (generator closed/cancelled), on errors
            if not req.finished.is_set():
                req.cancel()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        p = parse_chat(parse_body(await request.body()))
        _check_model(p.model)
        model, stream, include_usage = p.model, p.stream, p.include_usage
        prompt = engine.encode_chat(p.messages)
        params = _params(p, len(prompt))
        req = sched.submit(prompt, params)
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        if stream:
            def chunk(text, finish, usage=None):
                choices = [] if usage is not None else [{
                    "index": 0, "delta": ({"content": text} if text is not None else {}),
                    "logprobs": None, "finish_reason": finish}]
                c = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model,
                     "system_fingerprint": None, "choices": choices}
                if usage is not None:
                    c["usage"] = usage
                return c
            first = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model,
                     "system_fingerprint": None, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                                "logprobs": None, "finish_reason": None}]}
            return StreamingResponse(_sse(request, req, chunk, len(prompt), include_usage, first),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, ev = await _collect(request, req)
        return {"id": cid, "object": "chat.completion", "created": now, "model": model, "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": ev.finish_reason}],
                "usage": _usage(len(prompt), ev.completion_tokens)}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        p = parse_completion(parse_body(await request.body()))
        _check_model(p.model)
        model, stream, include_usage, prompt_text, echo = p.model, p.stream, p.include_usage, p.prompt, p.echo
        prompt = engine.encode(prompt_text)
        if not prompt:
            raise APIError(400, "'prompt' must not be empty", param="prompt")
        params = _params(p, len(prompt))
        req = sched.submit(prompt, params)
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        if stream:
            def chunk(text, finish, usage=None):
                choices = [] if usage is not None else [{"index": 0, "text": text or "", "logprobs": None,
                                                         "finish_reason": finish}]
                c = {"id": cid, "object": "text_completion", "created": now, "model": model, "choices": choices}
                if usage is not None:
                    c["usage"] = usage
                return c
            first = chunk(prompt_text, None) if echo else None
            return StreamingResponse(_sse(request, req, chunk, len(prompt), include_usage, first),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, ev = await _collect(request, req)
        return {"id": cid, "object": "text_completion", "created": now, "model": model,
                "choices": [{"index": 0, "text": (prompt_text + text) if echo else text, "logprobs": None,
                             "finish_reason": ev.finish_reason}],
                "usage": _usage(len(prompt), ev.completion_tokens)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": created,
                                            "owned_by": "llmcore", "max_seq_len": engine.max_seq_len}]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id != engine.model_id:
            raise APIError(404, f"The model `{model_id}` does not exist", param="model", code="model_not_found")
        return {"id": engine.model_id, "object": "model", "created": created, "owned_by": "llmcore"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_id, "running": sched.num_running(), **sched.stats}

    @app.get("/", response_class=HTMLResponse)
    @app.get("/chat", response_class=HTMLResponse)
    async def page():
        return HTMLResponse((STATIC / "chat.html").read_text(encoding="utf-8"))

    return app
