"""The OpenAI-compatible HTTP layer (FastAPI): requests in, engine jobs out, JSON or server-sent events back.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /v1/precision (the policy's state
and every change), GET /metrics (Prometheus), GET /health. Errors are OpenAI-shaped JSON
({"error": {"message", "type", "param", "code"}}) with a 4xx status for anything the client got wrong.
"""
from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException

from ..errors import BitnestError
from .engine import Engine, Job
from .precision import Precision, parse

Num = StrictInt | StrictFloat


class _Params(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Num, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Num, Field(gt=0, le=1)] = 1.0
    seed: StrictInt | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    stream: StrictBool = False
    n: Annotated[StrictInt, Field(ge=1, le=1)] = 1
    precision: StrictInt | StrictStr | None = None


class CompletionRequest(_Params):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=1)] | Annotated[list[StrictInt], Field(min_length=1)]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: StrictStr
    content: StrictStr | list[dict[str, Any]]


class ChatRequest(_Params):
    messages: Annotated[list[Message], Field(min_length=1)]


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status)


class Server:
    """Everything one `bitnest serve` process holds: the model, its engine, the metrics, the settings."""

    def __init__(self, engine: Engine, name: str, *, api_key: str | None = None, budgets: tuple[float, ...] = (),
                 default_max_tokens: int = 16):
        self.engine, self.name, self.api_key, self.budgets = engine, name, api_key, budgets
        self.tok = engine.tok
        self.default_max_tokens = default_max_tokens
        cfg = engine.model.config
        self.context = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        self.created = int(time.time())

    # -------------------------------------------------------------- request → job
    def precision_of(self, req: _Params) -> Precision | None:
        from_model = None
        if req.model is not None and req.model != self.name:
            base, at, label = req.model.partition("@")
            if base != self.name or not at:
                raise ApiError(404, f"the model {req.model!r} does not exist here; this server serves {self.name!r} "
                                    f"(and {self.name}@<precision>, see /v1/models)", code="model_not_found", param="model")
            from_model = self._parse(label, "model")
        from_field = self._parse(req.precision, "precision") if req.precision is not None else None
        if from_model and from_field and from_model != from_field:
            raise ApiError(400, f"model asks for {from_model.label} but precision asks for {from_field.label}", param="precision")
        p = from_field or from_model
        if p is None:
            return None
        try:
            return self.engine.caps.check(p)
        except BitnestError as e:
            raise ApiError(400, str(e), param="precision") from None

    @staticmethod
    def _parse(value, param: str) -> Precision:
        try:
            return parse(value)
        except ValueError as e:
            raise ApiError(400, str(e), param=param) from None

    def encode(self, text: str, chat: bool = False) -> list[int]:
        from ..generate import encode_prompt
        if chat and getattr(self.tok, "chat_template", None):
            return list(self.tok(text, add_special_tokens=False)["input_ids"])
        try:
            return encode_prompt(self.tok, text)
        except BitnestError as e:
            raise ApiError(400, str(e), param="prompt") from None

    def chat_prompt(self, messages: list[Message]) -> list[int]:
        msgs = []
        for m in messages:
            content = m.content if isinstance(m.content, str) else "".join(
                p.get("text", "") for p in m.content if p.get("type") == "text")
            msgs.append({"role": m.role, "content": content})
        if getattr(self.tok, "chat_template", None):
            try:
                text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # noqa: BLE001 — a template that rejects the roles is the client's input
                raise ApiError(400, f"the chat template rejected these messages: {e}", param="messages") from None
            return self.encode(text, chat=True)
        # no template (a base model): a plain transcript the model continues as the assistant
        text = "\n".join(f"{m['role']}: {m['content']}" for m in msgs) + "\nassistant:"
        return self.encode(text)

    def job(self, req: _Params, ids: list[int], emit, default_max: int) -> Job:
        if len(ids) >= self.context:
            raise ApiError(400, f"this model's maximum context length is {self.context} tokens; the prompt has "
                                f"{len(ids)}", param="prompt", code="context_length_exceeded")
        max_tokens = req.max_tokens or req.max_completion_tokens or min(default_max, self.context - len(ids))
        if len(ids) + max_tokens > self.context:
            raise ApiError(400, f"this model's maximum context length is {self.context} tokens; you requested "
                                f"{len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} for the completion)",
                           param="max_tokens", code="context_length_exceeded")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(s for s in (req.stop or ()) if s)
        return Job(ids, max_tokens, emit, temperature=float(req.temperature), top_p=float(req.top_p), seed=req.seed,
                   stop=stop, precision=self.precision_of(req))

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        if auth != f"Bearer {self.api_key}":
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", type_="authentication_error",
                           code="invalid_api_key")


def build_app(server: Server) -> FastAPI:
    eng = server.engine

    @asynccontextmanager
    async def lifespan(_app):
        eng.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, eng.stop)

    app = FastAPI(title="bitnest serve", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(_req, e: ApiError):
        if eng.metrics is not None:
            eng.metrics.rejected.labels(str(e.status)).inc()
        return _error(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(HTTPException)
    async def _http(_req, e: HTTPException):
        return _error(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(_req, e: Exception):
        return _error(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "queue": eng.queue_depth}

    @app.get("/metrics")
    async def metrics():
        return Response(eng.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_key(request)
        base = {"object": "model", "created": server.created, "owned_by": "bitnest"}
        data = [{"id": server.name, **base, "precision": eng.policy.current.label, "policy": eng.policy.name}]
        data += [{"id": f"{server.name}@{p.label}", **base, "precision": p.label, "root": server.name}
                 for p in eng.caps.listed(server.budgets)]
        return {"object": "list", "data": data}

    @app.get("/v1/precision")
    async def precision(request: Request):
        server.check_key(request)
        pol = eng.policy
        return {"policy": pol.name, "current": pol.current.label, "serving": eng.serving.label,
                "ladder": [p.label for p in getattr(pol, "ladder", [pol.current])],
                "step_ms": getattr(pol, "step_ms", {}), "changes": pol.changes[-200:],
                "switches": eng.switches[-200:], "queue": eng.queue_depth}

    @app.post("/v1/completions")
    async def completions(request: Request):
        server.check_key(request)
        req = await _body(request, CompletionRequest)
        prompt = req.prompt[0] if isinstance(req.prompt, list) and isinstance(req.prompt[0], str) else req.prompt
        if isinstance(prompt, list):
            vocab = server.engine.model.config.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            ids = list(prompt)
        else:
            ids = server.encode(prompt)
        return await _run(server, req, ids, chat=False, default_max=server.default_max_tokens)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        server.check_key(request)
        req = await _body(request, ChatRequest)
        ids = server.chat_prompt(req.messages)
        return await _run(server, req, ids, chat=True, default_max=server.context)

    return app


async def _body(request: Request, model: type[BaseModel]):
    """The JSON body as `model`, whatever the Content-Type says (curl -d sends form-encoded headers)."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first.get("loc", ())) or "body"
        raise ApiError(400, f"{loc}: {first.get('msg', 'invalid value')} (got {first.get('input')!r:.80})", param=loc) from None


async def _run(server: Server, req: _Params, ids: list[int], *, chat: bool, default_max: int):
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()

    def emit(ev):  # called from the engine thread
        try:
            loop.call_soon_threadsafe(q.put_nowait, ev)
        except RuntimeError:  # the event loop has closed (shutdown): nobody is listening any more
            pass

    job = server.job(req, ids, emit, default_max)
    rid = ("chatcmpl-" if chat else "cmpl-") + job.id
    created = int(time.time())
    obj = "chat.completion" if chat else "text_completion"
    server.engine.submit(job)

    def model_id() -> str:
        return f"{server.name}@{job.served.label}" if job.served else server.name

    def usage(info: dict) -> dict:
        return {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"],
                "total_tokens": info["prompt_tokens"] + info["completion_tokens"]}

    if not req.stream:
        parts = []
        try:
            while True:
                kind, val = await q.get()
                if kind == "delta":
                    parts.append(val)
                elif kind == "error":
                    return _error(500, f"generation failed: {val}", "server_error")
                else:
                    info = val
                    break
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        text = "".join(parts)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": info["finish_reason"],
                   "logprobs": None} if chat else
                  {"index": 0, "text": text, "finish_reason": info["finish_reason"], "logprobs": None})
        return {"id": rid, "object": obj, "created": created, "model": model_id(), "choices": [choice],
                "usage": usage(info), "precision": info["precision"]}

    async def events():
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"
        first = True
        try:
            while True:
                kind, val = await q.get()
                if kind == "error":
                    yield f"data: {json.dumps({'error': {'message': f'generation failed: {val}', 'type': 'server_error'}})}\n\n"
                    break
                if kind == "delta":
                    if chat:
                        delta = {"role": "assistant", "content": val} if first else {"content": val}
                        choice = {"index": 0, "delta": delta, "finish_reason": None}
                    else:
                        choice = {"index": 0, "text": val, "finish_reason": None}
                    first = False
                    body = {"id": rid, "object": chunk_obj, "created": created, "model": model_id(), "choices": [choice],
                            "precision": job.served.label if job.served else None}
                else:
                    choice = ({"index": 0, "delta": {}, "finish_reason": val["finish_reason"]} if chat else
                              {"index": 0, "text": "", "finish_reason": val["finish_reason"]})
                    body = {"id": rid, "object": chunk_obj, "created": created, "model": model_id(), "choices": [choice],
                            "usage": usage(val), "precision": val["precision"]}
                yield f"data: {json.dumps(body)}\n\n"
                if kind == "done":
                    break
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we finished): stop generating for it
            job.cancelled = True

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
