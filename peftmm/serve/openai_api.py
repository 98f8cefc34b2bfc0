"""An OpenAI-compatible chat API over the runtime, for any OpenAI client (docs/openai-api.md).

- ``GET /v1/models``: one model per registered adapter.
- ``POST /v1/chat/completions``: ``model`` names the adapter (as vLLM and LoRAX route requests
  to LoRA adapters); images come as ``image_url`` parts holding a ``data:`` URL, or a file
  (path or ``file://``) under the server's ``--allow-image-dir``; remote URLs are refused.
  ``max_tokens`` (or ``max_completion_tokens``), ``temperature``, ``top_p``, ``stop``,
  ``seed``, ``stream`` (server-sent ``chat.completion.chunk`` events, then ``data: [DONE]``)
  and ``stream_options.include_usage`` are understood. What each kind of bundle answers is in
  chat_kinds.py; its details (scores, similarities) are in the response's ``peftmm`` object.

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 404 for an
unknown model, 400 for anything else wrong in a request (413 for a body over the size limit),
500 for a bug. Images are checked with the server's own helpers (app.py: size limit, base64,
allowed folders, decoding) before anything is queued, so a bad request fails alone.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from urllib.parse import unquote, urlparse

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import PeftmmError, RecipeError
from ..generation import GenerationOptions, cut_at_stop, option_problems, safe_prefix
from .chat_kinds import CHAT_KINDS, Answer, Chat

MAX_MESSAGES = 64
MAX_IMAGES = 8
MAX_TEXT = 4000       # characters of text in one message
ROLES = ("system", "developer", "user", "assistant")
# Parameters understood, and those accepted only at the value that changes nothing.
KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
         "stream", "stream_options", "user"}
NEUTRAL = {"n": (1,), "logprobs": (False,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0)}
IMAGE_CODES = {403: "image_path_not_allowed", 404: "image_not_found", 413: "image_too_large", 415: "invalid_image"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def from_peftmm(error: PeftmmError) -> OpenAIError:
    if error.kind == "not_found":
        return OpenAIError(404, str(error), "model", "model_not_found")
    return OpenAIError(400, str(error))


def openai_router(runtime, batcher, read_body: Callable, image_bytes: Callable, decode_image: Callable,
                  api_error: type) -> APIRouter:
    """The routes, sharing the server's helpers: ``read_body(request)`` (the body, size-limited),
    ``image_bytes(kind, value)`` with kind ``"base64"`` (a data: URL too) or ``"path"`` (only
    under the allowed folders), ``decode_image(bytes, field)``; ``api_error`` is the exception
    type they raise (with ``status`` and ``message``)."""
    router = APIRouter(prefix="/v1")

    def guarded(handler):
        async def run(request: Request):
            try:
                return await handler(request)
            except OpenAIError as e:
                return JSONResponse(e.body(), status_code=e.status)
            except api_error as e:   # the body over the size limit
                return JSONResponse(OpenAIError(e.status, e.message).body(), status_code=e.status)
            except PeftmmError as e:
                error = from_peftmm(e)
                return JSONResponse(error.body(), status_code=error.status)
            except Exception as e:  # noqa: BLE001  (a bug: still OpenAI's shape; uvicorn logs it)
                error = OpenAIError(500, f"internal error ({type(e).__name__}: {e})", kind="server_error")
                return JSONResponse(error.body(), status_code=500)
        run.__name__, run.__doc__ = handler.__name__, handler.__doc__
        return run

    @router.get("/models")
    async def models():
        """Every registered adapter as a model, OpenAI's list shape."""
        data = []
        for name in runtime.names():
            try:
                created = int(runtime.path_of(name).stat().st_mtime)
            except (PeftmmError, OSError):  # unregistered meanwhile
                continue
            data.append({"id": name, "object": "model", "created": created, "owned_by": "peftmm"})
        return {"object": "list", "data": data}

    async def chat_completions(request: Request):
        """An OpenAI chat completion (see the module's docstring and docs/openai-api.md)."""
        body = await read_body(request)
        try:
            data = json.loads(body)
        except ValueError:
            raise OpenAIError(400, "request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise OpenAIError(400, "request body must be a JSON object")
        params = _parameters(data)
        kind = _kind(runtime, params["model"])
        chat = await run_in_threadpool(_chat, runtime, kind, params, image_bytes, decode_image, api_error)
        if params["stream"]:
            return StreamingResponse(_stream(batcher, kind, chat, params), media_type="text/event-stream")
        answer = await _answer(batcher, kind, chat, None)
        return _completion(chat, answer)

    router.add_api_route("/chat/completions", guarded(chat_completions), methods=["POST"])
    return router


# -- the request ------------------------------------------------------------------------------
def _parameters(data: dict) -> dict:
    data = {k: v for k, v in data.items() if v is not None}   # clients send null for "not given"
    unsupported = sorted(k for k in data if k not in KNOWN and data[k] not in NEUTRAL.get(k, ()))
    if unsupported:
        raise OpenAIError(400, f"unsupported parameter(s): {', '.join(unsupported)} (peftmm answers one choice, "
                               "without tools, logprobs or penalties)", unsupported[0], "unsupported_parameter")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError(400, "model: give the name of a registered adapter (GET /v1/models lists them)",
                          "model", "missing_required_parameter")
    if "max_tokens" in data and "max_completion_tokens" in data:
        raise OpenAIError(400, "give max_tokens or max_completion_tokens, not both", "max_tokens")
    stop = data.get("stop", ())
    stop = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else stop
    raw = {"max_tokens": data.get("max_tokens", data.get("max_completion_tokens")),
           "temperature": data.get("temperature"), "top_p": data.get("top_p"), "stop": stop,
           "seed": data.get("seed")}
    for name, problem in option_problems(**raw):
        name = "max_completion_tokens" if name == "max_tokens" and "max_completion_tokens" in data else name
        raise OpenAIError(400, f"{name}: {problem}", name, "invalid_value")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise OpenAIError(400, f"stream: must be true or false, not {stream!r}", "stream", "invalid_value")
    stream_options = data.get("stream_options", {})
    if stream_options and not stream:
        raise OpenAIError(400, "stream_options: only with stream: true", "stream_options", "invalid_value")
    if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"} or not isinstance(
            stream_options.get("include_usage", False), bool):
        raise OpenAIError(400, "stream_options: only {\"include_usage\": true|false} is understood",
                          "stream_options", "invalid_value")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(400, "messages: must be a non-empty list of messages", "messages", "invalid_type")
    if len(messages) > MAX_MESSAGES:
        raise OpenAIError(400, f"messages: at most {MAX_MESSAGES} messages", "messages", "invalid_value")
    return {"model": model, "messages": messages, "options": GenerationOptions(**raw), "stream": stream,
            "include_usage": stream_options.get("include_usage", False)}


def _kind(runtime, model: str):
    task = runtime.task_of(model)   # 404 model_not_found through from_peftmm
    try:
        return CHAT_KINDS.get(task, key="task")()
    except RecipeError:
        raise OpenAIError(400, f"model {model!r} (a {task} bundle) cannot answer chat completions", "model",
                          "model_not_supported") from None


def _chat(runtime, kind, params: dict, image_bytes, decode_image, api_error) -> Chat:
    """The messages read and checked, images decoded (in a worker thread: decoding takes time)."""
    messages, images = [], []
    for i, message in enumerate(params["messages"]):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise OpenAIError(400, f"{where}: must be an object with role and content", where, "invalid_type")
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise OpenAIError(400, f"{where}: unsupported field(s) {', '.join(extra)}", f"{where}.{extra[0]}",
                              "unsupported_parameter")
        role = message.get("role")
        if role not in ROLES:
            raise OpenAIError(400, f"{where}.role: {role!r} is not one of {', '.join(ROLES)}", f"{where}.role",
                              "invalid_value")
        texts, count = [], 0
        for j, part in enumerate(_parts(message.get("content"), f"{where}.content")):
            if part[0] == "text":
                texts.append(part[1])
                continue
            if len(images) == MAX_IMAGES:
                raise OpenAIError(400, f"at most {MAX_IMAGES} images per request", f"{where}.content[{j}]")
            images.append(_image(part[1], f"{where}.content[{j}].image_url", image_bytes, decode_image, api_error))
            count += 1
        text = "\n".join(texts)
        if len(text) > MAX_TEXT:
            raise OpenAIError(400, f"{where}.content: longer than {MAX_TEXT} characters", f"{where}.content")
        messages.append({"role": role, "text": text, "images": count})
    users = [m for m in messages if m["role"] == "user"]
    if not users:
        raise OpenAIError(400, "messages: there is no user message", "messages", "invalid_value")
    if not images:
        raise OpenAIError(400, "messages: no image; add an image_url part (a data: URL) to a user message",
                          "messages", "invalid_value")
    use = kind.question if kind.question == "ignored" else runtime.question_use(params["model"])
    question = (users[-1]["text"].strip() or None) if use == "required" else None
    if use == "required" and question is None:
        raise OpenAIError(400, f"the last user message has no text; model {params['model']!r} reads "
                               f"{kind.question_hint}", "messages", "invalid_value")
    problem = kind.problem(question)
    if problem:
        raise OpenAIError(400, f"the last user message: {problem}", "messages", "invalid_value")
    return Chat(params["model"], messages, images[-1], question, params["options"])


def _parts(content, where: str) -> list[tuple[str, object]]:
    """("text", str) and ("image", url) of a message's content, a string or a list of parts."""
    if content is None or isinstance(content, str):
        return [("text", content or "")]
    if not isinstance(content, list):
        raise OpenAIError(400, f"{where}: must be a string or a list of parts", where, "invalid_type")
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append(("text", part["text"]))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise OpenAIError(400, f"{where}[{j}].image_url: give {{\"url\": ...}}", f"{where}[{j}].image_url",
                                  "invalid_value")
            out.append(("image", url))
        else:
            raise OpenAIError(400, f"{where}[{j}]: parts of type text (with text) and image_url are understood, "
                                   f"not {kind!r}", f"{where}[{j}]", "unsupported_content")
    return out


def _image(url: str, where: str, image_bytes, decode_image, api_error):
    scheme = urlparse(url).scheme.lower() if ":" in url[:12] else ""
    try:
        if scheme == "data":
            if ";base64," not in url[:200]:
                raise OpenAIError(400, f"{where}: a data: URL must be base64 (data:image/png;base64,...)", where,
                                  "invalid_image")
            data = image_bytes("base64", url)
        elif scheme in ("http", "https"):
            raise OpenAIError(400, f"{where}: remote image URLs are not fetched; send the image as a data: URL "
                                   "(base64), or as a file under the server's --allow-image-dir", where,
                              "remote_image_url")
        elif scheme == "file":
            data = image_bytes("path", unquote(urlparse(url).path))
        elif scheme in ("", "c", "d"):    # a plain path (a Windows drive letter parses as a scheme)
            data = image_bytes("path", url)
        else:
            raise OpenAIError(400, f"{where}: {scheme}: URLs are not understood; send a data: URL", where,
                              "invalid_image")
        return decode_image(data, where)
    except api_error as e:
        raise OpenAIError(400, e.message.replace("image_base64", where).replace("image_path", where), where,
                          IMAGE_CODES.get(e.status, "invalid_image")) from None


# -- the answer -------------------------------------------------------------------------------
async def _answer(batcher, kind, chat: Chat, stream) -> Answer:
    futures = [asyncio.wrap_future(batcher.submit(r)) for r in kind.requests(chat, stream)]
    answer = kind.answer(chat, await asyncio.gather(*futures))
    text, stopped = cut_at_stop(answer.text, chat.options.stop)
    if stopped:
        answer.text, answer.finish_reason = text, "stop"
    return answer


def _usage(answer: Answer) -> dict:
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens}


def _completion(chat: Chat, answer: Answer) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": chat.adapter,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "logprobs": None, "finish_reason": answer.finish_reason}],
            "usage": _usage(answer), "peftmm": answer.extra}


async def _stream(batcher, kind, chat: Chat, params: dict):
    """Server-sent events: the role, the text as it is written (never past a stop string), the
    finish reason with the ``peftmm`` object, the usage if asked, ``[DONE]``."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": chat.adapter}

    def event(delta: dict | None, finish: str | None = None, **more) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        return f"data: {json.dumps({**head, 'choices': choices, **more})}\n\n"

    def written(text: str) -> None:   # the text so far, from the batcher's thread
        loop.call_soon_threadsafe(pieces.put_nowait, text)

    answering = asyncio.ensure_future(_answer(batcher, kind, chat, written))
    answering.add_done_callback(lambda done: done.cancelled() or done.exception())  # a client gone: no warning
    yield event({"role": "assistant", "content": ""})
    sent = ""
    while True:
        getter = asyncio.ensure_future(pieces.get())
        await asyncio.wait({getter, answering}, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
            break
        ready = safe_prefix(getter.result(), chat.options.stop)
        if len(ready) > len(sent) and ready.startswith(sent):
            yield event({"content": ready[len(sent):]})
            sent = ready
    try:
        answer = answering.result()
    except Exception as e:  # noqa: BLE001  (the headers are sent: the error goes in the stream)
        error = from_peftmm(e) if isinstance(e, PeftmmError) else OpenAIError(
            500, f"internal error ({type(e).__name__}: {e})", kind="server_error")
        yield f"data: {json.dumps(error.body())}\n\n"
        yield "data: [DONE]\n\n"
        return
    if answer.text.startswith(sent) and len(answer.text) > len(sent):
        yield event({"content": answer.text[len(sent):]})
    yield event({}, answer.finish_reason, peftmm=answer.extra)
    if params["include_usage"]:
        yield event(None, usage=_usage(answer))
    yield "data: [DONE]\n\n"
