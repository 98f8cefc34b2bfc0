"""The files of a bundle as bytes: the weights file's header checked before safetensors parses
it, every member kept inside the bundle folder, tensors refused when not finite. (bundle.py
builds on these; they are here so that it stays one readable module.)"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import torch

from .errors import BundleError
from .hub_bundles import cache_blobs
from .safe_load import load_json, short_repr

WEIGHTS = "adapter_model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the cap safetensors itself applies
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1}  # what a bundle may hold: nothing exotic a reader might choke on


def member(path: Path, name: str) -> Path:
    """``path / name``, refused when it resolves outside the bundle folder: a file symlink in a
    bundle must not make peftmm read (or serve) a file from elsewhere."""
    target = (path / name).resolve()
    blobs = cache_blobs(path)   # a pulled bundle's files link into its repository's blobs: that is no escape
    if not target.is_relative_to(path.resolve()) and not (blobs is not None and target.is_relative_to(blobs)):
        raise BundleError(f"{name} leads outside the bundle folder (to {target}); a bundle's files must be "
                          "inside it", str(path))
    return target


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Refuse NaN or infinite values, naming the first tensor that holds them: a diverged
    run's bundle answers NaN scores (not valid JSON) for every input."""
    for name in sorted(tensors):
        value = tensors[name]
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise BundleError(f"tensor {name!r} holds {bad} NaN or infinite value{'s' if bad > 1 else ''} "
                              f"(of {value.numel()}): training diverged, or the file was altered", where)


def read_header(path: str | Path) -> dict:
    """Check ``adapter_model.safetensors`` before safetensors parses it; returns its header.

    The header is ``{tensor name: {dtype, shape, data_offsets}, "__metadata__": {...}}``. Every
    way a file can be cut short, padded or forged is reported with the sizes involved, so a
    truncated download reads as one rather than as a parser error.
    """
    path = Path(path)
    weights = path / WEIGHTS

    def bad(what: str) -> BundleError:
        return BundleError(f"{WEIGHTS} is corrupt or truncated: {what}", str(path))

    if not weights.is_file():
        raise BundleError(f"{WEIGHTS} is missing", str(path))
    weights = member(path, WEIGHTS)
    size = weights.stat().st_size
    if size < 8:
        raise bad(f"the file is {size} bytes, shorter than the 8-byte header length")
    with open(weights, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > MAX_HEADER_BYTES:
            raise bad(f"header of {length} bytes is larger than the {MAX_HEADER_BYTES}-byte limit "
                      f"(the file is {size} bytes)")
        if 8 + length > size:
            raise bad(f"header of {length} bytes is larger than the file ({size} bytes, "
                      f"{size - 8} after the length)")
        raw = f.read(length)
    header = load_json(raw, str(path), BundleError, f"{WEIGHTS} is corrupt or truncated: its {length}-byte header "
                       "is not JSON")
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("its __metadata__ is not a mapping of strings")
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(entry, dict) and isinstance(entry.get("shape"), list)
                and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                        for x in entry["shape"] + entry["data_offsets"])):
            raise bad(f"tensor {short_repr(name)} has a malformed header entry {short_repr(entry)}")
        dtype = entry.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise bad(f"tensor {short_repr(name)} has dtype {short_repr(dtype)}; a bundle may hold only "
                      f"{', '.join(DTYPE_BYTES)}")
        begin, stop = entry["data_offsets"]
        need = math.prod(entry["shape"]) * DTYPE_BYTES[dtype]
        if stop - begin != need:
            raise bad(f"tensor {name!r} ({dtype} {tuple(entry['shape'])}) needs {need} bytes, "
                      f"its offsets span {stop - begin}")
        data_end = max(data_end, stop)
    expected = 8 + length + data_end
    if expected > size:
        raise bad(f"the header describes {expected} bytes of file but it has {size} "
                  f"({expected - size} missing: an incomplete download or copy?)")
    if expected < size:
        raise bad(f"the header describes {expected} bytes of file but it has {size} "
                  f"({size - expected} bytes too many)")
    return header
