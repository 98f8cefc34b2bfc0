"""Reading images: one clear error per unreadable file, never a bare PIL traceback.

A data source whose images are generated (rendered emoji) can register a *repairer* for the
folder they live in: when such a file is missing or cannot be decoded, :func:`load_image` asks
the repairer to write it again and then reads it once more. That makes rendering lazy (only the
images that are read get made) and heals a damaged cache.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import DataError

# (does this path belong to you?, write it again) pairs, tried in order.
_REPAIRERS: list[tuple[Callable[[Path], bool], Callable[[Path], None]]] = []


def register_repairer(owns: Callable[[Path], bool], repair: Callable[[Path], None]) -> None:
    _REPAIRERS.append((owns, repair))


def load_image(path: str | Path):
    try:
        return _read(path)
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
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError("image file not found", str(path)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # DecompressionBombError: an image whose header claims far more pixels than PIL allows
        raise DataError(f"cannot decode image ({type(e).__name__}: {e})", str(path)) from None
