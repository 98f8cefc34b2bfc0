"""Emoji drawn as pictures, and the cache of them that repairs itself.

Each emoji is drawn with OpenMoji's colour font (``glyf_colr0.ttf`` at 109 px, centred on a
white 160x160 canvas, resized to 224x224 with LANCZOS) and cached as a PNG under
``$PEFTMM_CACHE/data/emoji-<OpenMoji version>/<CODEPOINTS>.png``. Renders are written
atomically; a missing or damaged file is drawn again when it is next read (the repairer
registered with :mod:`peftmm.images`). Sequences (ZWJ, flags, keycaps) need Pillow's raqm
layout. The renders are CC BY-SA 4.0 like the font: the font's LICENSE is copied beside them.
"""

from __future__ import annotations

import functools
import shutil
from io import BytesIO
from pathlib import Path

from ...errors import DataError
from ...images import register_repairer
from ...io import atomic_write_bytes
from .fetch import OPENMOJI_VERSION, data_cache_dir, font_path

RENDER_DIR = f"emoji-{OPENMOJI_VERSION}"
FONT_SIZE, CANVAS, SIZE = 109, 160, 224
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def render_dir() -> Path:
    return data_cache_dir() / RENDER_DIR


def codepoints(e: str) -> str:
    """The file name of ``e``'s render: its code points in hex, joined by ``-``."""
    return "-".join(f"{ord(c):04X}" for c in e)


def check_raqm() -> None:
    from PIL import features

    if not features.check("raqm"):
        raise DataError("the emoji data set needs Pillow with raqm text layout (to draw ZWJ sequences, "
                        "flags and keycaps as one glyph); install a Pillow wheel from PyPI, which bundles it")


@functools.lru_cache(maxsize=4)
def _font(path: str):
    from PIL import ImageFont

    font = ImageFont.truetype(path, FONT_SIZE)
    return font, font.getlength("\U0001F600")   # every OpenMoji glyph has this advance


def has_glyph(e: str, font_file: str | Path) -> bool:
    """True when OpenMoji shapes ``e`` into a single emoji-wide glyph (not .notdef, not pieces)."""
    font, advance = _font(str(font_file))
    return font.getlength(e) == advance


def render(e: str, font_file: str | Path):
    """``e`` drawn in colour, 224x224 RGB; DataError when nothing is drawn."""
    from PIL import Image, ImageDraw

    font, _ = _font(str(font_file))
    canvas = Image.new("RGB", (CANVAS, CANVAS), "white")
    ImageDraw.Draw(canvas).text((CANVAS // 2, CANVAS // 2), e, font=font, embedded_color=True, anchor="mm")
    if canvas.convert("L").getextrema()[0] == 255:
        raise DataError(f"OpenMoji draws nothing for {e!r} (U+{codepoints(e)})")
    return canvas.resize((SIZE, SIZE), Image.LANCZOS)


def _write(e: str, path: Path, font_file) -> None:
    buffer = BytesIO()
    render(e, font_file).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def is_complete(path: Path) -> bool:
    """A cheap check that a cached PNG was written whole (ends with the IEND chunk)."""
    try:
        with open(path, "rb") as f:
            f.seek(-len(_PNG_END), 2)
            return f.read() == _PNG_END
    except OSError:
        return False


def ensure_rendered(rows: list[dict], progress: bool = True) -> int:
    """Draw the images of ``rows`` that are missing or incomplete; returns how many were drawn."""
    from tqdm.auto import tqdm

    missing = [r for r in rows if not is_complete(Path(r["image"]))]
    if missing:
        font_file = font_path()
        folder = Path(missing[0]["image"]).parent
        folder.mkdir(parents=True, exist_ok=True)
        for license_file in (font_file.parent / "LICENSE", font_file.parent.parent / "LICENSE"):
            if license_file.is_file() and not (folder / "LICENSE").exists():
                shutil.copy2(license_file, folder / "LICENSE")
        for r in tqdm(missing, desc="rendering OpenMoji emoji", unit="img", disable=not progress):
            _write(r["emoji"], Path(r["image"]), font_file)
    return len(missing)


def _owns(path: Path) -> bool:
    return path.parent.name == RENDER_DIR and path.suffix == ".png"


def _repair(path: Path) -> None:
    check_raqm()
    try:
        e = "".join(chr(int(c, 16)) for c in path.stem.split("-"))
    except ValueError:
        raise DataError("not an emoji render (name is not code points)", str(path)) from None
    _write(e, path, font_path())


register_repairer(_owns, _repair)
