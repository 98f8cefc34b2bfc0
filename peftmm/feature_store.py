"""The frozen-feature cache on disk (``train.feature_cache_dir``): what features.FeatureCache
keeps across runs.

Each tower gets a folder ``<dir>/<vision|text>-<16 hex>/`` named after a hash of everything its
outputs depend on besides the input (:func:`cache_key`): the backbone's weight fingerprint and
config, the precision, the device type, the torch and transformers versions, the preprocessing
(image size, mean/std, resize; or the tokenizer and ``max_length``) and :data:`FORMAT_VERSION`.
``key.json`` there holds those fields readably; when any of them changes, a run lands in
another folder and computes afresh. An image entry also records the file's size and
``mtime_ns``; a file changed since (other size or time) is a miss, encoded again. A file
rewritten with the same size and modification time is not noticed: the check is a stat, so a
warm start does not read every image.

The folder holds safetensors shards (never pickle) and ``manifest.json``, naming each shard's
sha256 and the entries it holds. Every file is written to a temporary name in the folder,
fsynced and renamed, the manifest last, so a crash leaves the previous state. Before a shard's
tensors are used its bytes must match the sha256 and each tensor must be float32 ``[N, width]``;
a shard that fails is reported once, deleted and its entries computed again (never used), and
a manifest that does not parse rebuilds the whole folder. Loaded values are the bytes that were
computed, so a warm run gives the same numbers as the cold one. (Entries computed anew in a
partly warm run may differ from a cold run's in the last bits: the batch an input is encoded
in can change a backbone's rounding, as in memory when another order of examples fills it.)

Writers (of every process or run sharing the folder) take an exclusive ``flock`` on
``<folder>/.lock`` while they write; readers a shared one. Under several processes of one run
only the main one writes (``write=False`` for the others): they read what is there and compute
the rest in memory, as without a disk cache, so no process ever waits for another to fill it
(an error while filling on one could otherwise leave the rest waiting forever).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import uuid
from pathlib import Path

import torch

from .errors import RecipeError
from .images import NORMALISATION
from .io import atomic_write_bytes, fsync_dir

FORMAT_VERSION = 1   # of the folder layout and of what an entry holds; a change starts new folders
SHARD_BYTES = 256 * 2**20   # a shard is written once this much is pending (and at the end of a fill)
_SHARD = re.compile(r"shard-[0-9a-f]{32}\.safetensors")
_CONFIG_NOISE = ("_name_or_path", "transformers_version", "dtype", "torch_dtype")



def feature_cache_dir(path: str | None, where: str | None = None, create: bool = True) -> Path | None:
    """``train.feature_cache_dir`` checked before a run starts: a folder (made here when
    ``create``), never a file."""
    if not path:
        return None
    root = Path(path)
    try:
        is_file = root.exists() and not root.is_dir()
    except (OSError, ValueError) as e:   # ValueError: a NUL in the path
        raise RecipeError(f"train.feature_cache_dir = {path!r} cannot be a folder ({e})", where) from None
    if is_file:
        raise RecipeError(f"train.feature_cache_dir = {path} is a file; it must be a folder for the "
                          "frozen-feature cache (or null to keep it in memory)", where)
    if create:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RecipeError(f"train.feature_cache_dir = {path}: cannot create the folder ({e.strerror})",
                              where) from None
    return root


def cache_key(tower, max_length: int | None) -> dict:
    """Everything a tower's cached outputs depend on besides the input itself."""
    import transformers

    info = tower.info
    config = {k: v for k, v in tower.model.config.to_dict().items() if k not in _CONFIG_NOISE}
    key = {
        "format": FORMAT_VERSION, "tower": tower.name, "model_type": info.model_type,
        "fingerprint": info.fingerprint, "config": _digest(config), "precision": info.precision,
        "causal_lm": bool(getattr(tower, "causal_lm", False)),
        "device": next(tower.model.parameters()).device.type,
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    if tower.name == "vision":   # preprocess.ImagePreprocessor: RGB, bicubic resize to size x size, mean/std
        key["preprocessing"] = {**tower.processor.describe(), "convert": NORMALISATION, "resize": "bicubic"}
    else:
        key["preprocessing"] = {"tokenizer": _tokenizer_identity(tower.processor), "max_length": max_length,
                                "padding": "longest", "truncation": True}
    return key


def _tokenizer_identity(tokenizer) -> str:
    """sha256 over what the tokenizer does (its vocabulary, normaliser, special tokens, sides),
    not where it was loaded from. The truncation and padding a fast tokenizer remembers from its
    last call are left out: ``max_length`` is a key of its own."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:
        spec = {"vocab": sorted(tokenizer.get_vocab().items())}
    return _digest({"class": type(tokenizer).__name__, "tokenizer": spec, "special": tokenizer.special_tokens_map,
                    "padding_side": tokenizer.padding_side, "truncation_side": tokenizer.truncation_side})


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def file_stamp(path: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of an image file, or None when it cannot be stat-ed."""
    try:
        stat = os.stat(path)
    except (OSError, ValueError):
        return None
    return stat.st_size, stat.st_mtime_ns


class DiskCache:
    """One tower's folder of a feature cache on disk (see the module docstring)."""

    def __init__(self, root, key: dict, width: int, write: bool = True, log=None, about: dict | None = None):
        self.key, self.width, self.write, self.log = key, width, write, log or stderr
        self.about = about or {}   # readable extras for key.json (not part of the key)
        self.digest = _digest(key)
        self.folder = Path(root) / f"{key['tower']}-{self.digest[:16]}"
        self.shards: dict[str, dict] | None = None   # the manifest's, read at first use
        self.index: dict[str, tuple[str, str, list | None]] = {}   # entry -> (shard, tensor, stamp)
        self.damaged: set[str] = set()               # shards reported already (never read again)
        self.pending: dict[str, tuple[torch.Tensor, tuple | None]] = {}
        self.pending_bytes = 0

    # reading

    def read(self, keys: list[str], stamped: bool = False) -> dict[str, torch.Tensor]:
        """The stored tensors of ``keys`` that are current: from verified shards only, and for
        images (``stamped``) only where the file's size and mtime are those it was encoded at."""
        self._open()
        wanted: dict[str, list[tuple[str, str]]] = {}
        for key in keys:
            entry = self.index.get(_entry_key(key, stamped))
            if entry is None:
                continue
            shard, tensor, stamp = entry
            if stamped and (stamp is None or file_stamp(key) != tuple(stamp)):
                continue   # the image file changed since (or was never stamped): encode it again
            wanted.setdefault(shard, []).append((key, tensor))
        found: dict[str, torch.Tensor] = {}
        with self._locked(exclusive=False):
            for shard, items in wanted.items():
                tensors = self._load(shard)
                if tensors is not None:
                    found.update((key, tensors[name]) for key, name in items)
        if self.write and any(s in self.damaged for s in wanted):
            self._update({})   # drop the damaged shards from the manifest and the folder
        return found

    def _load(self, shard: str) -> dict[str, torch.Tensor] | None:
        """A shard's tensors, verified; None (reported) when it is missing or damaged."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        info = self.shards[shard]
        try:
            data = (self.folder / shard).read_bytes()
        except FileNotFoundError:
            return self._damaged(shard, "is missing")
        except OSError as e:
            return self._damaged(shard, f"cannot be read ({e.strerror})")
        if hashlib.sha256(data).hexdigest() != info["sha256"]:
            return self._damaged(shard, "is corrupt (checksum mismatch)")
        try:
            tensors = load(data)
        except SafetensorError as e:
            return self._damaged(shard, f"is not a valid safetensors file ({e})")
        for entry in info["entries"]:
            t = tensors.get(entry["tensor"])
            if t is None:
                return self._damaged(shard, f"has no tensor {entry['tensor']!r}")
            if t.dtype != torch.float32 or t.dim() != 2 or t.shape[0] < 1 or t.shape[1] != self.width:
                return self._damaged(shard, f"holds tensor {entry['tensor']!r} as {str(t.dtype)[6:]} "
                                            f"{list(t.shape)}, not float32 [N, {self.width}]")
        return tensors

    def _damaged(self, shard: str, why: str) -> None:
        entries = self.shards[shard]["entries"]
        if shard not in self.damaged:
            self.damaged.add(shard)
            self.log(f"peftmm: feature cache {self.folder}: shard {shard} {why}; "
                     f"rebuilding its {len(entries):,} entries")
        self.index = {k: v for k, v in self.index.items() if v[0] != shard}
        return None

    # writing

    def add(self, key: str, tensor: torch.Tensor, stamp: tuple[int, int] | None = None) -> None:
        if not self.write:
            return
        self.pending[_entry_key(key, stamp is not None)] = (tensor, stamp)
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the pending entries as one shard and add it to the manifest."""
        pending, self.pending, self.pending_bytes = self.pending, {}, 0
        if not pending or not self.write:
            return
        from safetensors.torch import save

        self._open()
        names = list(pending)
        data = save({str(i): pending[k][0].contiguous() for i, k in enumerate(names)})
        shard = f"shard-{uuid.uuid4().hex}.safetensors"
        entries = [{"key": k, "tensor": str(i), "stamp": list(pending[k][1]) if pending[k][1] else None}
                   for i, k in enumerate(names)]
        info = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "entries": entries}
        try:
            with self._locked(exclusive=True):
                atomic_write_bytes(self.folder / shard, data)
                self._update({shard: info}, locked=True)
        except OSError as e:
            self._stop_writing(e)
            with contextlib.suppress(OSError):
                if shard not in (self.shards or {}):
                    (self.folder / shard).unlink()

    def _update(self, new: dict[str, dict], locked: bool = False) -> None:
        """Re-read the manifest (another run may have added shards), drop the damaged shards and
        the entries ``new`` supersedes (a shard left with none is deleted), add ``new``, write it."""
        if not locked:
            try:
                with self._locked(exclusive=True):
                    return self._update(new, locked=True)
            except OSError as e:
                return self._stop_writing(e)
        shards = self._read_manifest(report=False)
        if shards is None:
            shards = {}
        keys = {e["key"] for info in new.values() for e in info["entries"]}
        for shard in list(shards):
            shards[shard]["entries"] = [e for e in shards[shard]["entries"] if e["key"] not in keys]
            if shard in self.damaged or not shards[shard]["entries"]:
                del shards[shard]
                with contextlib.suppress(FileNotFoundError):
                    (self.folder / shard).unlink()
        shards.update(new)
        self._write_manifest(shards)
        self._use(shards)

    def _stop_writing(self, error: OSError) -> None:
        self.write = False
        self.log(f"peftmm: feature cache {self.folder}: cannot write there ({error.strerror or error}); "
                 "new entries stay in memory for this run")

    # the folder

    def _open(self) -> None:
        """Read the manifest (once). A writer first checks ``key.json``, rebuilds a folder whose
        manifest or key does not read back, and removes what an interrupted writer left."""
        if self.shards is not None:
            return
        if not self.write:
            with self._locked(exclusive=False):
                shards = self._read_manifest(report=True) if self._key_matches() else {}
            self._use(shards or {})
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with self._locked(exclusive=True):
                shards = self._read_manifest(report=True) if self._key_matches(report=True) else None
                if shards is None:   # unreadable, or the folder of another key: start it again
                    shards = {}
                    self._write_key()
                    self._write_manifest(shards)
                self._tidy(shards)
        except OSError as e:
            self._stop_writing(e)
            shards = {}
        self._use(shards)

    def _key_matches(self, report: bool = False) -> bool:
        path = self.folder / "key.json"
        try:
            stored = json.loads(path.read_text())
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as e:
            stored = e
        if isinstance(stored, dict) and stored.get("key") == self.key and stored.get("digest") == self.digest:
            return True
        if report:
            self.log(f"peftmm: feature cache {self.folder}: key.json does not match this cache's key; "
                     "rebuilding the whole folder")
        return False

    def _read_manifest(self, report: bool) -> dict[str, dict] | None:
        """The manifest's shards; {} when there is none yet, None when it does not read back."""
        path = self.folder / "manifest.json"
        try:
            data = json.loads(path.read_bytes())
            return _checked_manifest(data, self.digest)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            if report:
                then = "rebuilding the whole folder" if self.write else "not using it"
                self.log(f"peftmm: feature cache {self.folder}: manifest.json is unreadable "
                         f"({type(e).__name__}: {e}); {then}")
            return None

    def _write_key(self) -> None:
        about = {"digest": self.digest, "key": self.key, **self.about}
        atomic_write_bytes(self.folder / "key.json", json.dumps(about, indent=2, sort_keys=True).encode())

    def _write_manifest(self, shards: dict) -> None:
        manifest = {"format": FORMAT_VERSION, "digest": self.digest, "shards": shards}
        atomic_write_bytes(self.folder / "manifest.json", json.dumps(manifest).encode())
        fsync_dir(self.folder)

    def _tidy(self, shards: dict) -> None:
        """Under the writers' lock: files no manifest names (a writer stopped between its shard
        and the manifest) and temporary files are leftovers; remove them."""
        for path in self.folder.iterdir():
            name = path.name
            if name in ("key.json", "manifest.json", ".lock") or name in shards:
                continue
            if _SHARD.fullmatch(name) or name.startswith("."):
                with contextlib.suppress(OSError):
                    path.unlink()

    def _use(self, shards: dict) -> None:
        self.shards = shards
        self.index = {e["key"]: (shard, e["tensor"], e["stamp"]) for shard, info in shards.items()
                      if shard not in self.damaged for e in info["entries"]}

    @contextlib.contextmanager
    def _locked(self, exclusive: bool):
        """flock on ``.lock`` in the folder; nothing where there is no fcntl or the file cannot be made."""
        try:
            import fcntl
            fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        except (ImportError, OSError):
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)   # releases the lock


def _entry_key(key: str, stamped: bool) -> str:
    """Images are stored under their absolute path (a relative one depends on the working folder)."""
    return os.path.abspath(key) if stamped else key


def _checked_manifest(data, digest: str) -> dict[str, dict]:
    """The shards of a parsed manifest; ValueError / TypeError / KeyError when it is not one of ours."""
    if not isinstance(data, dict):
        raise TypeError(f"a manifest is a mapping, not {type(data).__name__}")
    if data.get("format") != FORMAT_VERSION or data.get("digest") != digest:
        raise ValueError("written for another format or key")
    shards = data["shards"]
    if not isinstance(shards, dict):
        raise TypeError("shards is not a mapping")
    for name, info in shards.items():
        if not _SHARD.fullmatch(name):   # a name like ../x would let a damaged manifest delete other files
            raise ValueError(f"unexpected shard name {name!r}")
        if not isinstance(info["sha256"], str) or not isinstance(info["entries"], list):
            raise TypeError(f"shard {name} is not described by sha256 and entries")
        for entry in info["entries"]:
            stamp = entry["stamp"]
            if not isinstance(entry["key"], str) or not isinstance(entry["tensor"], str) or not (
                    stamp is None or isinstance(stamp, list) and len(stamp) == 2
                    and all(isinstance(x, int) for x in stamp)):
                raise TypeError(f"an entry of shard {name} is not key, tensor and stamp")
    return shards


def stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
