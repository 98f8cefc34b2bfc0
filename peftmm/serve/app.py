"""The HTTP JSON API and the web page over a :class:`~peftmm.runtime.Runtime`.

Every answer is JSON; every error is ``{"error": message}`` with a 4xx status (5xx only for a
bug). Images are checked in the request's own handler (size, base64, allowed folder, decodable)
before they are queued, so a bad request fails alone; predictions go through one
:class:`~peftmm.serve.batching.MicroBatcher`, which batches concurrent requests together.

A prediction answers with whatever the adapter's task decodes (VQA: ``answer`` and ``scores``;
captioning: ``caption``; retrieval: ``similarity``). Whether a request needs a ``question``
depends on the adapter (``question`` in its description, see Runtime.question_use): a
captioning adapter takes none.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ctypes
import io
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..bundle import is_bundle
from ..errors import DataError, PeftmmError
from ..images import ImageTooLarge, decode_bytes, finish, open_bounded, pixel_limit
from ..safe_load import load_json
from .batching import MicroBatcher
from .openai_api import openai_router

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
FORM_SLACK = 64 * 1024  # room in a request body for the other fields and the multipart framing
MAX_QUESTION = 1000      # characters


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class ApiBodyError(PeftmmError):
    """A request body that is not JSON peftmm reads (answered 400)."""


class RegisterBody(BaseModel):
    """A bundle from the adapters folder, or (``mix``) a weighted mix of registered adapters."""
    model_config = ConfigDict(extra="forbid")
    bundle: str | None = None
    name: str | None = None
    mix: dict[str, float] | None = None   # adapter name -> weight (Runtime.register_mix)
    method: str = "linear"
    density: float | None = None
    seed: int | None = None


class PredictBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str
    question: str | None = None  # required or not by the adapter: checked in prepare()
    image_base64: str | None = None
    image_path: str | None = None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _fields(errors) -> str:
    """Pydantic's errors as one line that names each field: ``question: Field required``."""
    parts = []
    for error in errors:
        if error.get("type") == "json_invalid":
            parts.append("request body is not valid JSON")
            continue
        where = ".".join(str(x) for x in error.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def status_of(error: PeftmmError) -> int:
    return {"not_found": 404, "conflict": 409}.get(error.kind, 400)


def decode_image(data: bytes, field: str = "image"):
    """Bytes to a normalised PIL image (peftmm/images.py: the path every entry point takes), or an
    ApiError: 415 for non-images, 413 over the pixel limit."""
    with _image_errors(field):
        return decode_bytes(data, field)


class _image_errors:
    def __init__(self, field: str):
        self.field = field

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if kind is not None and issubclass(kind, ImageTooLarge):
            raise ApiError(413, f"{self.field}: {error.message}") from None
        if kind is not None and issubclass(kind, DataError):
            raise ApiError(415, f"{self.field}: not an image that can be read ({error.message})") from None
        return False


TRIM_AFTER_PIXELS = 4_000_000   # a decode this large leaves tens of MB in the allocator's free lists


def release_freed_memory() -> None:
    """Hand memory freed by decoded images back to the system (glibc's malloc_trim): glibc keeps
    large freed blocks in its arenas, so a burst of big images would otherwise stay in the
    server's RSS long after they were answered. A no-op on other C libraries."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PixelBudget:
    """How many decoded pixels the server holds at once, across requests: a request waits for
    its image's share (known from the header, before decoding) and gives it back when answered.
    Small images pass freely, so batching still gathers them; large ones queue instead of
    stacking up hundreds of MB each."""

    def __init__(self, total: int):
        self.total, self.used = total, 0
        self._free: asyncio.Condition | None = None   # made in the server's event loop

    @asynccontextmanager
    async def hold(self, pixels: int):
        pixels = min(pixels, self.total)   # one image over the budget still runs, alone
        if self._free is None:
            self._free = asyncio.Condition()
        async with self._free:
            await self._free.wait_for(lambda: self.used + pixels <= self.total)
            self.used += pixels
        try:
            yield
        finally:
            async with self._free:
                self.used -= pixels
                self._free.notify_all()
                idle = self.used == 0
            if idle and pixels >= TRIM_AFTER_PIXELS:
                release_freed_memory()


def register_all(runtime, report: Callable[[str], None] = log.warning) -> list[str]:
    """Register every bundle folder directly inside the runtime's root; others are skipped, and
    one that fails to load is reported and skipped."""
    loaded = []
    for path in sorted(p for p in runtime.root.iterdir() if p.is_dir() and is_bundle(p)):
        try:
            loaded.append(runtime.register(path.name)["name"])
        except Exception as e:  # noqa: BLE001  (a broken bundle must not stop the others)
            report(f"skipped {path.name}: {e if isinstance(e, PeftmmError) else f'{type(e).__name__}: {e}'}")
    return loaded


def create_app(runtime, allowed_image_dirs=(), max_image_bytes: int = 10 * 2**20, max_batch: int = 16,
               batch_wait_ms: float = 5, decode_budget_pixels: int | None = None) -> FastAPI:
    """``decode_budget_pixels``: decoded pixels held at once across requests (PixelBudget);
    default twice the pixel limit (images.py), ~320 MB of RGBA at the default 40 MP."""
    allowed = [Path(d).resolve() for d in allowed_image_dirs]
    budget = PixelBudget(decode_budget_pixels or 2 * pixel_limit())
    batcher = MicroBatcher(runtime.predict, max_batch=max_batch, wait_ms=batch_wait_ms)
    body_limit = max_image_bytes * 4 // 3 + FORM_SLACK  # base64 makes 4 bytes of 3

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="peftmm", summary="Answer questions about images, or caption them, with peftmm adapter bundles",
                  lifespan=lifespan, docs_url=None, redoc_url=None)  # their pages load scripts from a CDN
    app.state.runtime, app.state.batcher = runtime, batcher

    @app.exception_handler(ApiError)
    async def _api_error(request, error: ApiError):
        return _error(error.status, error.message)

    @app.exception_handler(PeftmmError)
    async def _peftmm_error(request, error: PeftmmError):
        return _error(status_of(error), str(error))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, error: RequestValidationError):
        return _error(422, _fields(error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, error: StarletteHTTPException):
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def _bug(request, error: Exception):  # a bug in peftmm: still JSON; uvicorn logs the traceback
        return _error(500, f"internal error ({type(error).__name__}: {error})")

    # -- page and status -------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/health")
    def health():
        return {"status": "ok", "device": str(runtime.device), "adapters": runtime.names(), **batcher.stats}

    # -- adapters --------------------------------------------------------------------------
    @app.get("/api/adapters")
    def list_adapters():
        described = []
        for name in runtime.names():
            try:
                described.append(runtime.describe(name))
            except PeftmmError:  # unregistered meanwhile
                pass
        return {"adapters": described, "backbones": runtime.backbones()}

    @app.post("/api/adapters", status_code=201,
              openapi_extra={"requestBody": {"content": {"application/json": {
                  "schema": RegisterBody.model_json_schema()}}, "required": True}})
    async def register(request: Request):
        """JSON ``{bundle, name?}``: load a bundle from the adapters folder; or ``{name, mix:
        {adapter: weight, ...}, method?, density?, seed?}``: a weighted mix of registered adapters."""
        body = parse_body(RegisterBody, await read_body(request))
        if body.bundle is None and body.mix is None:
            raise ApiError(422, "bundle: Field required (a folder in the adapters folder; or mix: registered "
                                "adapters and their weights)")
        if body.bundle is not None and body.mix is not None:
            raise ApiError(422, "give either bundle or mix, not both")
        if body.mix is None:
            if body.method != "linear" or body.density is not None or body.seed is not None:
                raise ApiError(422, "method, density and seed apply to a mix only")
            return await run_in_threadpool(runtime.register, body.bundle, name=body.name)
        if body.name is None:
            raise ApiError(422, "a mix needs a name")
        return await run_in_threadpool(runtime.register_mix, body.name, body.mix, method=body.method,
                                       density=body.density, seed=body.seed)

    @app.delete("/api/adapters/{name}", status_code=204)
    def unregister(name: str):
        runtime.unregister(name)
        return Response(status_code=204)

    # -- prediction ------------------------------------------------------------------------
    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length", "")
        if length and not length.isdigit():
            raise ApiError(400, "bad Content-Length header")
        if length and int(length) > body_limit:
            raise ApiError(413, f"request body of {length} bytes is over the limit of {body_limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > body_limit:
                raise ApiError(413, f"request body is over the limit of {body_limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def parse_body(model, body: bytes):
        """A JSON body through the bounded loader (safe_load.py: depth and number size), then the model."""
        data = load_json(body, None, ApiBodyError, "request body is not valid JSON")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise ApiError(422, _fields(e.errors())) from None

    async def read_inputs(request: Request) -> tuple[str, str | None, tuple[str, object]]:
        """(adapter, question or None, (kind, value)) from a JSON or a multipart body."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in ("application/json", "multipart/form-data"):
            raise ApiError(415, "send the request as application/json or multipart/form-data")
        body = await read_body(request)
        if kind == "application/json":
            parsed = parse_body(PredictBody, body)
            if (parsed.image_base64 is None) == (parsed.image_path is None):
                raise ApiError(422, "image_base64, image_path: give exactly one of them")
            source = ("base64", parsed.image_base64) if parsed.image_path is None else ("path", parsed.image_path)
            return parsed.adapter, parsed.question, source

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
        try:
            missing = [f for f in ("adapter", "image") if form.get(f) in (None, "")]
            if missing:
                raise ApiError(422, "; ".join(f"{f}: Field required" for f in missing))
            # an empty field is what a form sends for a question left out
            adapter, question, upload = form["adapter"], form.get("question") or None, form["image"]
            if not isinstance(upload, UploadFile):
                raise ApiError(422, "image: expected an uploaded file")
            if not isinstance(adapter, str) or not isinstance(question, (str, type(None))):
                raise ApiError(422, "adapter, question: expected text fields")
            return adapter, question, ("bytes", await upload.read())
        finally:
            await form.close()

    def image_bytes(kind: str, value) -> bytes:
        if kind == "bytes":
            data = value
        elif kind == "base64":
            text = value.split(",", 1)[1] if value.startswith("data:") else value  # a data: URL too
            if len(text) * 3 // 4 > max_image_bytes + 3:
                raise ApiError(413, f"image_base64: the image is over the limit of {max_image_bytes} bytes")
            try:
                data = base64.b64decode("".join(text.split()), validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, "image_base64: not valid base64") from None
        else:
            data = read_allowed(value)
        if len(data) > max_image_bytes:
            raise ApiError(413, f"image: {len(data)} bytes is over the limit of {max_image_bytes}")
        return data

    def read_allowed(value: str) -> bytes:
        if not allowed:
            raise ApiError(403, "image_path: reading images from the server's disk is not enabled "
                                "(start it with --allow-image-dir)")
        try:
            given = Path(value)
            candidates = [given] if given.is_absolute() else [d / given for d in allowed]
            path = next((p for p in candidates if p.exists()), candidates[0]).resolve()  # follows links
        except (ValueError, OSError) as e:
            raise ApiError(400, f"image_path: {e}") from None
        if not any(path.is_relative_to(d) for d in allowed):
            raise ApiError(403, f"image_path: {value!r} is outside the folders images may be read from")
        if not path.is_file():
            raise ApiError(404, f"image_path: no image file {value!r}")
        if path.stat().st_size > max_image_bytes:
            raise ApiError(413, f"image_path: the file is over the limit of {max_image_bytes} bytes")
        return path.read_bytes()

    def prepare(adapter: str, question: str | None, source: tuple[str, object]):
        """The question to send (None: the adapter reads none) and the image opened within the pixel
        limit (header read, nothing decoded yet), or an ApiError."""
        runtime.require(adapter)
        if question is not None and len(question) > MAX_QUESTION:
            raise ApiError(422, f"question: longer than {MAX_QUESTION} characters")
        if question is None or not question.strip():
            if runtime.question_use(adapter) == "required":
                raise ApiError(422, "question: Field required" if question is None else "question: must not be empty")
            question = None
        # A question sent to an adapter that refuses one (captioning) is the runtime's to refuse:
        # its DataError becomes a 400 for this request alone (the micro-batcher retries the rest).
        data = image_bytes(*source)
        with _image_errors("image"):
            return question, open_bounded(io.BytesIO(data), "image")

    def decode(image):
        with _image_errors("image"):
            return finish(image, "image")

    @app.post("/api/predict")
    async def predict(request: Request):
        """JSON ``{adapter, question?, image_base64 | image_path}`` or a multipart form with the
        fields ``adapter`` and ``question`` (where the adapter reads one) and the file ``image``.

        Answers ``{adapter, question, ...}`` plus what the adapter's task decodes: ``answer`` and
        ``scores`` (VQA), ``caption`` (captioning), ``similarity`` (retrieval)."""
        adapter, question, source = await read_inputs(request)
        question, opened = await run_in_threadpool(prepare, adapter, question, source)
        async with budget.hold(opened.width * opened.height):
            image = await run_in_threadpool(decode, opened)
            del opened
            result = await batcher.predict({"adapter": adapter, "image": image, "text": question})
            del image
        return {"adapter": result["adapter"], "question": question,
                **{k: v for k, v in result.items() if k != "adapter"}}

    # OpenAI-compatible routes under /v1 (openai_api.py), on this server's body and image checks
    app.include_router(openai_router(runtime, batcher, read_body, image_bytes, decode_image, ApiError))
    return app
