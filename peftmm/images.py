"""Reading images: the one decoding path of every entry point (training data, the CLI, the
runtime, the server), with one clear error per unreadable file, never a bare PIL traceback.

Decoding is bounded before any pixel is decoded: the header gives the size, a JPEG over the
pixel limit is decoded at a smaller DCT scale (``draft``), and anything still over
:func:`pixel_limit` (40 megapixels by default, far under Pillow's own ~89 MP bomb limit) is
refused with :class:`ImageTooLarge` (the server answers 413). A backbone sees at most a few
hundred pixels a side, so a larger image only costs memory: a 10 KB one-colour PNG of
9400x9400 would otherwise take ~440 MB per decode.

Modes are normalised (:func:`normalise`) to 8-bit RGB, or RGBA where the image has
transparency: 16-bit and 32-bit integer samples are scaled (not clipped to white), float
samples taken as 0..1 (or 0..255 when any exceeds 1), palettes with a transparent index, LA
and CMYK converted. :func:`to_rgb` then composites transparency onto a background colour (the
vision tower's ``background``, white by default: what the emoji renders sit on), where
``convert("RGB")`` would turn every transparent pixel black.

A data source whose images are generated (rendered emoji) can register a *repairer* for the
folder they live in: when such a file is missing or cannot be decoded, :func:`load_image` asks
the repairer to write it again and then reads it once more. That makes rendering lazy (only the
images that are read get made) and heals a damaged cache.

An image need not be a file: :func:`load_image` also takes its bytes, or an :class:`InMemoryImage`
(a small reference that reads the bytes when asked: a row of a memory-mapped Arrow table, see
data/hf.py). Examples carry such an image as a string key, ``embedded:sha256:<hex>`` of its
bytes (:func:`content_key`), registered here with :func:`register_embedded`: every place that
keys by ``str(example["image"])`` (the feature cache, batching, grouping) then keys embedded
images by their content, and two rows with the same bytes are one image.
"""

from __future__ import annotations

import hashlib
import io
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

from .errors import DataError, ImageTooLarge

DEFAULT_MAX_PIXELS = 40_000_000
# What the decoding below does, for feature-cache keys: a change here must rebuild cached features.
NORMALISATION = "peftmm-2: 16-bit/32-bit/float scaled to 8 bits, transparency composited on the background"
WHITE = (255, 255, 255)
_max_pixels: int | None = None


def pixel_limit() -> int:
    """The most pixels an image may decode to: ``set_pixel_limit``, else the environment's
    ``PEFTMM_MAX_IMAGE_PIXELS``, else 40 megapixels."""
    if _max_pixels is not None:
        return _max_pixels
    given = os.environ.get("PEFTMM_MAX_IMAGE_PIXELS", "")
    return int(given) if given.isdigit() and int(given) > 0 else DEFAULT_MAX_PIXELS


def set_pixel_limit(pixels: int | None) -> None:
    """Set the limit for this process (None: back to the environment's or the default)."""
    global _max_pixels
    if pixels is not None and pixels < 1:
        raise ValueError("the pixel limit must be positive")
    _max_pixels = pixels


# (does this path belong to you?, write it again) pairs, tried in order.
_REPAIRERS: list[tuple[Callable[[Path], bool], Callable[[Path], None]]] = []


def register_repairer(owns: Callable[[Path], bool], repair: Callable[[Path], None]) -> None:
    _REPAIRERS.append((owns, repair))


EMBEDDED_PREFIX = "embedded:sha256:"


class InMemoryImage(ABC):
    """An image whose bytes are read on demand (never held decoded); ``where`` names it in errors."""

    where: str = "image"

    @abstractmethod
    def read(self) -> bytes:
        """The encoded image (PNG, JPEG, ...); a DataError when it cannot be read."""


# content key -> where its bytes are; one small reference per distinct embedded image
_EMBEDDED: dict[str, InMemoryImage] = {}


def content_key(data: bytes) -> str:
    """The key of an embedded image: the sha256 of its encoded bytes."""
    return EMBEDDED_PREFIX + hashlib.sha256(data).hexdigest()


def is_content_key(source) -> bool:
    """Whether ``source`` is an embedded image's key: its content, so it can never go stale."""
    return isinstance(source, str) and source.startswith(EMBEDDED_PREFIX)


def register_embedded(key: str, image: InMemoryImage) -> None:
    """Make ``key`` (:func:`content_key` of ``image``'s bytes) loadable; the first reference stays."""
    _EMBEDDED.setdefault(key, image)


def load_image(path: str | Path | bytes | InMemoryImage):
    """Decode a file path, an embedded image's key, its bytes or an :class:`InMemoryImage`."""
    if isinstance(path, (bytes, bytearray, memoryview)):
        return decode_bytes(bytes(path))
    if isinstance(path, InMemoryImage):
        return decode_bytes(path.read(), path.where)
    if is_content_key(path):
        image = _EMBEDDED.get(path)
        if image is None:
            raise DataError("embedded image not known to this process (its data set was not loaded here)", path)
        return decode_bytes(image.read(), image.where)
    try:
        return _read(path)
    except ImageTooLarge:
        raise   # a file too large is no damaged cache entry: writing it again would not help
    except DataError:
        repair = next((fix for owns, fix in _REPAIRERS if owns(Path(path))), None)
        if repair is None:
            raise
    try:
        repair(Path(path))
    except OSError as e:   # a cache folder that cannot be written: still one bad image, not a crash
        raise DataError(f"cannot write the image again ({type(e).__name__}: {e})", str(path)) from None
    return _read(path)


def _read(path):
    try:
        return decode(path, str(path))
    except FileNotFoundError:
        raise DataError("image file not found", str(path)) from None


def decode_bytes(data: bytes, where: str = "image"):
    """An image sent as bytes (the server), through the same path as a file."""
    return decode(io.BytesIO(data), where)


def decode(source, where: str):
    """Open, bound, decode and normalise (RGB, or RGBA with transparency); the file is closed after."""
    return finish(open_bounded(source, where), where)


def open_bounded(source, where: str):
    """The image opened (header read, no pixel decoded) at a size within :func:`pixel_limit`, or
    :class:`ImageTooLarge`. A JPEG over the limit is drafted to the DCT scale (1/2 .. 1/8) that fits."""
    from PIL import Image

    with _decoding_errors(where):
        image = Image.open(source)
        try:
            limit = min(pixel_limit(), Image.MAX_IMAGE_PIXELS or pixel_limit())  # a lower Pillow limit holds
            width, height = image.size
            if width * height > limit and image.format == "JPEG":
                scale = next((s for s in (2, 4, 8) if (width // s) * (height // s) <= limit), 8)
                image.draft(image.mode, (width // scale, height // scale))
            if image.size[0] * image.size[1] > limit:
                raise ImageTooLarge(f"image of {width}x{height} pixels ({width * height / 1e6:.3g} MP) is over the "
                                    f"limit of {limit / 1e6:.3g} MP (PEFTMM_MAX_IMAGE_PIXELS, or serve --max-image-mp)",
                                    where)
        except BaseException:
            image.close()
            raise
        return image


def finish(image, where: str):
    """Decode an image from :func:`open_bounded` and normalise its mode. The original is closed
    (its pixels freed at once) unless it is what is returned."""
    result = None
    try:
        with _decoding_errors(where):
            image.load()
            result = normalise(image)
            return result
    finally:
        if result is not image:
            image.close()


class _decoding_errors:
    """Pillow's many ways of failing on a bad file, as one DataError naming it."""

    def __init__(self, where: str):
        self.where = where

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        from PIL import Image, UnidentifiedImageError

        if kind is None or issubclass(kind, (DataError, FileNotFoundError)):
            return False
        if issubclass(kind, Image.DecompressionBombError):
            raise ImageTooLarge(f"image over Pillow's pixel limit ({error})", self.where) from None
        if issubclass(kind, (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)):
            raise DataError(f"cannot decode image ({kind.__name__}: {error})", self.where) from None
        return False


def has_transparency(image) -> bool:
    return image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in image.info


def normalise(image):
    """8-bit RGB, or RGBA where the image has transparency; samples of other depths scaled."""
    import numpy as np
    from PIL import Image

    mode = image.mode
    if mode in ("RGB", "RGBA"):
        return image
    if mode.startswith("I") or mode == "F":
        samples = np.asarray(image)
        if mode == "F":
            samples = np.nan_to_num(samples.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
            top = 1.0 if samples.size and samples.max() <= 1.0 else 255.0   # 0..1 is the float convention
            grey = np.clip(np.rint(samples * (255.0 / top)), 0, 255)
        else:  # 16-bit samples (and 32-bit "I", which Pillow also uses for 16-bit files): 65535 is white
            grey = np.rint(np.clip(samples.astype(np.float64), 0, 65535) / 257.0)
        return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    return image.convert("RGBA" if has_transparency(image) else "RGB")


def parse_background(colour) -> tuple[int, int, int]:
    """A colour name, ``#rrggbb`` or ``rgb(...)`` to an RGB tuple (ValueError when it is none)."""
    from PIL import ImageColor

    if isinstance(colour, (tuple, list)):
        return tuple(int(c) for c in colour[:3])
    return ImageColor.getrgb(str(colour))[:3]


def to_rgb(image, background=WHITE):
    """What a backbone sees: the normalised image, transparency composited onto ``background``."""
    from PIL import Image

    image = normalise(image)
    if image.mode == "RGB":
        return image
    canvas = Image.new("RGBA", image.size, (*parse_background(background), 255))
    return Image.alpha_composite(canvas, image).convert("RGB")
