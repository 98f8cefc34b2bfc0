"""Reading images: one clear error per unreadable file, never a bare PIL traceback."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError


def load_image(path: str | Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError("image file not found", str(path)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot decode image ({type(e).__name__}: {e})", str(path)) from None
