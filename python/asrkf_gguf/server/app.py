"""The OpenAI-compatible HTTP API (Starlette): /v1/chat/completions, /v1/completions, /v1/models, /health.

Request parameters honoured: messages / prompt, max_tokens (max_completion_tokens), temperature (0: greedy), seed,
top_p, frequency_penalty, presence_penalty, and llama-server's top_k, min_p, repeat_penalty (llama.cpp's sampler
chain, asrkf_gguf.sampling), stop, stream, stream_options.include_usage, n (1 only). Everything else (tools,
response_format, logprobs, ...) is ignored, as llama-server ignores what it does not know; see docs/server.md.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator, Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .worker import ApiError, GenerationRequest, Job, ModelWorker

OPENAI_DEFAULT_TEMPERATURE = 1.0  # what the OpenAI API samples at when a request gives no temperature


def create_app(worker: ModelWorker, model_name: str) -> Starlette:
    created = int(time.time())

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "busy": worker.busy, "requests": worker.n_requests,
                             "generated_tokens": worker.n_generated_tokens, "last_request": worker.last,
                             **worker.pool.snapshot()})

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "asrkf-gguf"}]})

    async def chat_completions(request: Request):
        body = await _json_body(request)
        req = GenerationRequest(messages=_messages(body), prompt=None, **_sampling(body))
        return await _respond(request, worker, req, body, chat=True, model_name=model_name)

    async def completions(request: Request):
        body = await _json_body(request)
        req = GenerationRequest(messages=None, prompt=_prompt(body), **_sampling(body))
        return await _respond(request, worker, req, body, chat=False, model_name=model_name)

    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}",
                                     type=kind).body(), status_code=err.status_code)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, worker.close)  # waits for the step in progress

    return Starlette(routes=[
        Route("/health", health), Route("/v1/health", health),
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ], exception_handlers={ApiError: api_error, HTTPException: http_error}, lifespan=lifespan)


# ---- requests


async def _json_body(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


def _text(content, param: str) -> str:
    """A message's content: a string, or OpenAI's list of parts of which only text parts are understood."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise _bad(param, "only text content parts are supported")
        return "".join(p["text"] for p in content)
    raise _bad(param, "must be a string or a list of text parts")


def _messages(body: dict) -> list:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "a non-empty list of {role, content} objects is required")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise _bad(f"messages[{i}]", "must be an object with a role")
        role = "system" if m["role"] == "developer" else m["role"]  # OpenAI's newer name for the system message
        out.append({"role": role, "content": _text(m.get("content"), f"messages[{i}].content")})
    if out[-1]["role"] != "user":
        raise _bad("messages", f"the last message must be the user's (got {out[-1]['role']!r}): this server "
                               "answers a user message")
    if not out[-1]["content"].strip():
        raise _bad("messages", "the last user message is empty")
    return out


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _bad("prompt", "a non-empty string is required (one prompt per request)")
    return prompt


def _number(body: dict, key: str, kind, lo=None):
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise _bad(key, f"must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if lo is not None and value < lo:
        raise _bad(key, f"must be at least {lo}, got {value}")
    return value


def _sampling(body: dict) -> dict:
    n = _number(body, "n", int, 1)
    if n not in (None, 1):
        raise _bad("n", "only one choice per request (n=1) is supported")
    if not isinstance(body.get("stream", False), bool):
        raise _bad("stream", "must be true or false")
    max_tokens = _number(body, "max_completion_tokens", int, 1)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int, 1)
    temperature = _number(body, "temperature", (int, float), 0)
    seed = _number(body, "seed", int)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                             or not all(isinstance(x, str) and x for x in stop)):
        raise _bad("stop", "a non-empty string or a list of at most 4 of them")
    # the sampler chain's other settings, where given (the Engine checks their ranges: a bad one is a 400)
    chain = {}
    for key, kind in (("top_p", (int, float)), ("top_k", int), ("min_p", (int, float)),
                      ("frequency_penalty", (int, float)), ("presence_penalty", (int, float)),
                      ("repeat_penalty", (int, float))):
        value = _number(body, key, kind)
        if value is not None:
            chain[key] = value
    return {"max_tokens": max_tokens, "stop": tuple(stop or ()),
            "temperature": float(OPENAI_DEFAULT_TEMPERATURE if temperature is None else temperature),
            "seed": random.getrandbits(32) if seed is None else seed, "sampling": chain}


# ---- responses


async def _respond(request: Request, worker: ModelWorker, req: GenerationRequest, body: dict, *, chat: bool,
                   model_name: str):
    job = Job(req, asyncio.get_running_loop())
    worker.submit(job)
    # the first event says whether the request runs: an error before any text is an HTTP error, not a stream
    try:
        first = await _next(job, request)
    except BaseException as err:
        worker.cancel(job)
        if isinstance(err, _ClientGone):
            return Response(status_code=499)  # nobody reads it (nginx's code for a client that went away)
        raise
    if first[0] == "error":
        raise first[1]
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model_name, "system_fingerprint": None}
    if body.get("stream"):
        opts = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
        return StreamingResponse(_stream(worker, job, head, chat, bool(opts.get("include_usage"))),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    pieces = []
    try:
        while True:
            event = await _next(job, request)
            if event[0] == "piece":
                pieces.append(event[1])
            elif event[0] == "error":
                raise event[1]
            else:
                end = event[1]
                break
    except BaseException as err:
        worker.cancel(job)
        if isinstance(err, _ClientGone):
            return Response(status_code=499)
        raise
    text = "".join(pieces)
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
               "finish_reason": end["finish_reason"]} if chat else
              {"index": 0, "text": text, "logprobs": None, "finish_reason": end["finish_reason"]})
    return JSONResponse({**head, "choices": [choice], "usage": _usage(end), "conversation": end["conversation"]})


async def _next(job: Job, request: Request):
    """The job's next event, or _ClientGone when the client disconnects first."""
    get = asyncio.ensure_future(job.events.get())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if get in done:
        return get.result()
    get.cancel()
    raise _ClientGone()


class _ClientGone(Exception):
    """The client disconnected while its request waited for the model."""


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _usage(end: dict) -> dict:
    return {"prompt_tokens": end["prompt_tokens"], "completion_tokens": end["completion_tokens"],
            "total_tokens": end["prompt_tokens"] + end["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": end["cached_tokens"]}}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(worker: ModelWorker, job: Job, head: dict, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """SSE chunks: `data: {...}` for the role, each text piece and the finish reason, then `data: [DONE]`.
    Starlette cancels this generator when the client disconnects: the finally cancels the job."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(text: Optional[str], finish: Optional[str] = None, role: bool = False) -> dict:
        if chat:
            delta = {} if text is None else {"content": text}
            if role:
                delta = {"role": "assistant", "content": ""}
            c = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            c = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**head, "choices": [c]}

    done = False
    try:
        if chat:
            yield _sse(chunk(None, role=True))
        while True:
            event = await job.events.get()
            if event[0] == "piece":
                yield _sse(chunk(event[1]))
            elif event[0] == "error":
                done = True
                yield _sse(event[1].body())
                break
            else:
                done = True
                end = event[1]
                yield _sse({**chunk(None, end["finish_reason"]), "conversation": end["conversation"]})
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(end)})
                break
        yield "data: [DONE]\n\n"
    finally:
        if not done:
            worker.cancel(job)
