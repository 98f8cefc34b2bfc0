"""The bad-input corpus (tests/bad_inputs/cases.yaml): each bad recipe, data file, bundle,
adapter name and resume gets its exact error from the API and from the CLI (exit code 2, one
``error:`` line, no traceback), and nothing is written or registered on the way.

Recipes and data files are the files in tests/bad_inputs/; bundles and run directories are
damaged copies of a tiny run trained through the CLI (the ``cli_run`` fixture), made here.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import pickle
import random
import shutil
import struct
from pathlib import Path

import pytest
import tiny
import torch
import yaml
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

from peftmm import errors
from peftmm.bundle import CONFIG, WEIGHTS, bundle_summary, check_adapter_name, load_bundle
from peftmm.cli import main

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text())
DEFAULT_ERROR = {"recipes": "RecipeError", "data": "DataError", "bundles": "BundleError", "names": "BundleError",
                 "resume": "PeftmmError", "templates": "PeftmmError", "merges": "MergeError"}
QUESTION = "what shape is it?"


def cases(section: str):
    return [pytest.param(case, id=case["id"]) for case in CASES[section]]


def expected(case: dict, section: str, key: str = "message", **values) -> tuple[type, str]:
    """The error class and message a case expects, its {placeholders} filled in."""
    message = case.get(key, case["message"])
    for name, value in values.items():
        message = message.replace("{" + name + "}", str(value))
    return getattr(errors, case.get("error", DEFAULT_ERROR[section])), message


def check_error(error: BaseException, kind: type, message: str) -> None:
    assert type(error) is kind, f"{type(error).__name__}: {error}"
    assert message in str(error), f"\n{message!r}\nnot in\n{str(error)!r}"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def check_cli(result, message: str) -> None:
    """Exit code 2, one ``error:`` line (the last; only ``peftmm:`` log lines before it), no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and message in lines[-1], \
        f"\n{message!r}\nnot in the last line of\n{result.output}"
    assert all(line.startswith("peftmm: ") for line in lines[:-1]), result.output


def set_env(case: dict, monkeypatch) -> None:
    """A case's ``env``: settings the bad input is tried under (HF_HUB_OFFLINE, the pixel limit)."""
    for name, value in case.get("env", {}).items():
        monkeypatch.setenv(name, value)


def snapshot(folder: Path) -> dict:
    """Every file (its bytes) and folder under ``folder``: compared before and after."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.fixture
def no_unpickling(monkeypatch):
    """Bad inputs are read without any unpickling (a .bin next to a bundle is never opened)."""
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling was attempted")
    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load"), (torch.serialization, "load")):
        monkeypatch.setattr(module, name, refuse)


# -- recipes ----------------------------------------------------------------------------------

def _fill(text: str, values: dict) -> str:
    for key, value in values.items():
        text = text.replace("${" + key + "}", value)
    return text


@pytest.mark.parametrize("case", cases("recipes"))
def test_bad_recipe(case, tiny_models, tmp_path, monkeypatch, no_unpickling):
    from peftmm.recipe import load
    from peftmm.trainer import train

    bin_only = tmp_path / "bert-pickle-only"
    shutil.copytree(tiny_models["bert"], bin_only)
    torch.save({}, bin_only / "pytorch_model.bin")  # never opened: the folder is refused first
    (bin_only / "model.safetensors").unlink()
    recipe = tmp_path / case["file"]
    source = CORPUS / "recipes" / case["file"]
    if source.exists():  # latin-1 both ways: bytes kept as they are, for a case that is not UTF-8
        values = {"vision": tiny_models["mobilenet_v2"], "text": tiny_models["bert"], "text_bin_only": str(bin_only)}
        recipe.write_bytes(_fill(source.read_bytes().decode("latin-1"), values).encode("latin-1"))
    kind, message = expected(case, "recipes", recipe=recipe, dir=tmp_path)
    overrides = case.get("set", [])
    set_env(case, monkeypatch)
    monkeypatch.chdir(tmp_path)  # a default run directory would land here
    before = snapshot(tmp_path)

    with pytest.raises(errors.PeftmmError) as error:
        train(load(recipe, overrides), tmp_path / "run", progress=False, log=lambda _: None)
    check_error(error.value, kind, message)
    set_args = [arg for item in overrides for arg in ("--set", item)]
    check_cli(invoke("train", recipe, *set_args, "--output", tmp_path / "run", "--no-progress"), message)
    assert snapshot(tmp_path) == before  # no run directory, nothing else


# -- data files -------------------------------------------------------------------------------

def _images(folder: Path) -> None:
    (folder / "img").mkdir()
    for i in range(9):
        Image.new("RGB", (32, 32), ((i * 37) % 256, (i * 91) % 256, 128)).save(folder / "img" / f"{i}.png")
    (folder / "img" / "corrupt.png").write_bytes(random.Random(0).randbytes(300))
    Image.new("RGB", (100, 100), (200, 40, 40)).save(folder / "img" / "big.png")  # over a case's pixel limit


@pytest.mark.parametrize("case", cases("data"))
def test_bad_data_file(case, tiny_models, tmp_path, monkeypatch):
    from peftmm.recipe import from_dict
    from peftmm.trainer import train

    _images(tmp_path)
    data = tmp_path / case["file"]
    if (CORPUS / "data" / case["file"]).exists():
        shutil.copy(CORPUS / "data" / case["file"], data)
    settings = tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"], text_methods=[{"type": "lora", "r": 2}],
                           data={"source": "files", "path": str(data), "on_bad_sample": "stop"})
    settings["data"].pop("max_train_samples"), settings["data"].pop("max_eval_samples")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(settings))
    kind, message = expected(case, "data", file=data, dir=tmp_path)
    set_env(case, monkeypatch)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)

    with pytest.raises(errors.PeftmmError) as error:
        train(from_dict(settings), tmp_path / "run", progress=False, log=lambda _: None)
    check_error(error.value, kind, message)
    check_cli(invoke("train", recipe, "--output", tmp_path / "run", "--no-progress"), message)
    assert snapshot(tmp_path) == before


# -- bundles ----------------------------------------------------------------------------------

def _edit_config(path: Path, change, resign: bool = False) -> None:
    config = json.loads((path / CONFIG).read_text())
    change(config)
    (path / CONFIG).write_text(json.dumps(config))
    if resign:
        _resave(path, lambda tensors: None)


def _resave(path: Path, change) -> None:
    """Re-save the tensors after ``change``, signed with the config's checksum as save_bundle does."""
    tensors = load_file(path / WEIGHTS)
    change(tensors)
    digest = hashlib.sha256((path / CONFIG).read_bytes()).hexdigest()
    save_file(tensors, path / WEIGHTS, metadata={"format": "peftmm", "format_version": "1", "config_sha256": digest})


def _write_weights(path: Path, raw: bytes) -> None:
    (path / WEIGHTS).write_bytes(raw)


def _forged(path: Path, entry: dict, data: bytes, metadata=None) -> None:
    header = json.dumps({"__metadata__": metadata or {"format": "peftmm"}, "head.x": entry}).encode()
    _write_weights(path, struct.pack("<Q", len(header)) + header + data)


def _truncate(path):
    data = (path / WEIGHTS).read_bytes()
    half = len(data) // 2
    _write_weights(path, data[:half])
    return {"size": len(data), "half": half, "missing": len(data) - half}


def _dtype_swapped(path):
    """F32 -> I32 in the header: every size stays right, the float bits would load as integers."""
    data = (path / WEIGHTS).read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    first = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    raw = data[8:8 + length].replace(b'"F32"', b'"I32"', 1)
    _write_weights(path, data[:8] + raw + data[8 + length:])
    return {"tensor": first}


def _missing_tensor(path):
    name = sorted(load_file(path / WEIGHTS))[0]
    _resave(path, lambda tensors: tensors.pop(name))
    return {"tensor": name}


def _shape_mismatch(path):
    name = sorted(k for k in load_file(path / WEIGHTS) if k.startswith("head."))[0]
    shape = tuple(load_file(path / WEIGHTS)[name].shape)
    wrong = (shape[0] + 1, *shape[1:])
    _resave(path, lambda tensors: tensors.update({name: torch.zeros(wrong)}))
    return {"tensor": name, "shape": wrong}


def _weights_as_bin(path):
    torch.save(load_file(path / WEIGHTS), path / "adapter_model.bin")
    (path / WEIGHTS).unlink()


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _config_text(path: Path, change) -> None:
    """Edit peftmm_config.json as text: what json.dumps cannot write (5,000 levels, huge integers)."""
    (path / CONFIG).write_text(change((path / CONFIG).read_text()))


def _header_text(path: Path, header: str) -> dict:
    _write_weights(path, struct.pack("<Q", len(header)) + header.encode())
    return {"length": len(header)}


def _non_finite(path: Path, values: list[float]) -> dict:
    name = sorted(k for k in load_file(path / WEIGHTS) if k.startswith("head."))[0]

    def poison(tensors):
        flat = tensors[name].view(-1)
        flat[: len(values)] = torch.tensor(values)
    _resave(path, poison)
    return {"tensor": repr(name)}


def _symlink_out(path: Path, name: str) -> dict:
    """Move a bundle file out of the folder and leave an absolute link to it in its place."""
    outside = path.parent / f"{path.name}-elsewhere" / name
    outside.parent.mkdir()
    (path / name).rename(outside)
    (path / name).symlink_to(outside)
    return {"target": outside.resolve()}


def _backbone(path: Path, source: str) -> None:
    tower = "vision" if "mobilenet" in source else "text"

    def change(config):
        config["recipe"][tower]["backbone"] = config["towers"][tower]["backbone"] = source
    _edit_config(path, change, resign=True)


def _duplicate_labels(path: Path) -> dict:
    labels = json.loads((path / CONFIG).read_text())["labels"]
    _edit_config(path, lambda c: c["labels"].__setitem__(1, labels[0]))
    return {"label": repr(labels[0])}


DAMAGES = {
    "truncate": _truncate,
    "trailing_bytes": lambda p: _write_weights(p, (p / WEIGHTS).read_bytes() + b"\0" * 7) or {"extra": 7},
    "empty_weights": lambda p: _write_weights(p, b""),
    "header_not_json": lambda p: _write_weights(p, struct.pack("<Q", 9) + b"{garbage}"),
    "header_over_cap": lambda p: _write_weights(p, struct.pack("<Q", 2**40) + b"{}"),
    "header_longer_than_file": lambda p: _write_weights(p, struct.pack("<Q", 5000) + b"{}"),
    "metadata_not_strings": lambda p: _forged(p, {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, b"\0" * 4,
                                              metadata={"format_version": 1}),
    "exotic_dtype": lambda p: _forged(p, {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}, b"\0"),
    "offsets_disagree": lambda p: _forged(p, {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}, b"\0" * 8),
    "dtype_swapped": _dtype_swapped,
    "unknown_tensor": lambda p: _resave(p, lambda tensors: tensors.update({"head.extra": torch.zeros(1)})),
    "missing_tensor": _missing_tensor,
    "shape_mismatch": _shape_mismatch,
    "config_edited": lambda p: _edit_config(p, lambda c: c["metrics"].update(test_accuracy=1.0)),
    "config_not_json": lambda p: (p / CONFIG).write_text("{not json"),
    "config_not_peftmm": lambda p: _edit_config(p, lambda c: c.pop("format")),
    "config_lacks_towers": lambda p: _edit_config(p, lambda c: c.pop("towers")),
    "config_tower_lacks_fingerprint": lambda p: _edit_config(p, lambda c: c["towers"]["text"].pop("fingerprint")),
    "labels_not_strings": lambda p: _edit_config(p, lambda c: c["labels"].__setitem__(0, {"name": "circle"})),
    "future_format": lambda p: _edit_config(p, lambda c: c.update(format_version=99)),
    "fingerprint_mismatch": lambda p: _edit_config(
        p, lambda c: c["towers"]["text"].update(fingerprint="0" * 64), resign=True),
    "config_recipe_invalid": lambda p: _edit_config(p, lambda c: c["recipe"]["train"].update(epochs=0), resign=True),
    "weights_missing": lambda p: (p / WEIGHTS).unlink(),
    "weights_as_bin": _weights_as_bin,
    "config_missing": lambda p: (p / CONFIG).unlink(),
    "tensor_nan": lambda p: _non_finite(p, [math.nan]),
    "tensor_inf": lambda p: _non_finite(p, [math.inf, -math.inf]),
    "config_deep": lambda p: _config_text(p, lambda text: '{"deep": {"x": ' + _nested(5000) + "}, " + text[1:]),
    "config_huge_int": lambda p: _config_text(p, lambda text: '{"big": ' + "9" * 5000 + ", " + text[1:]),
    "header_deep": lambda p: _header_text(p, '{"__metadata__": {"format": "peftmm"}, "x": ' + _nested(5001) + "}"),
    "header_huge_int": lambda p: _header_text(
        p, '{"head.x": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + "9" * 5000 + "]}}"),
    "weights_symlink_out": lambda p: _symlink_out(p, WEIGHTS),
    "config_symlink_out": lambda p: _symlink_out(p, CONFIG),
    "format_negative": lambda p: _edit_config(p, lambda c: c.update(format_version=-1)),
    "format_string": lambda p: _edit_config(p, lambda c: c.update(format_version="1")),
    "format_float_newer": lambda p: _edit_config(p, lambda c: c.update(format_version=3.0)),
    "duplicate_labels": _duplicate_labels,
    "task_contradicts": lambda p: _edit_config(p, lambda c: c.update(task="captioning")),
    "backbone_misspelt": lambda p: _backbone(p, "mobilenet-v3"),
    "backbone_hub_id": lambda p: _backbone(p, "someone/not-in-the-cache"),
}


def _tower_parameters(runtime) -> int:
    return sum(p.numel() for tower in runtime._towers.values() for p in tower.parameters())


@pytest.fixture(scope="module")
def serving(cli_run, tmp_path_factory):
    """A Runtime serving the good tiny bundle as 'good': bad bundles must leave it as it is."""
    from peftmm.runtime import Runtime

    root = tmp_path_factory.mktemp("serving")
    shutil.copytree(cli_run[1] / "bundle", root / "good")
    runtime = Runtime(device="cpu", root=root)
    runtime.register("good")
    import easy_vqa

    image = easy_vqa.get_test_image_paths()[0]
    answer = runtime.predict([{"adapter": "good", "image": image, "text": QUESTION}])
    return root, runtime, image, answer


def _serving_state(runtime, image) -> tuple:
    return (runtime.names(), _tower_parameters(runtime), runtime.backbones(),
            runtime.predict([{"adapter": "good", "image": image, "text": QUESTION}]))


@pytest.mark.parametrize("case", cases("bundles"))
def test_bad_bundle(case, cli_run, serving, tmp_path, monkeypatch, no_unpickling):
    root, runtime, image, answer = serving
    path = tmp_path / case["id"]
    shutil.copytree(cli_run[1] / "bundle", path)
    values = DAMAGES[case["damage"]](path)
    values = values if isinstance(values, dict) else {}  # what the damage picked, for the message
    if case["damage"] == "fingerprint_mismatch":
        values["fingerprint"] = runtime._adapters["good"].model.towers["text"].info.fingerprint[:12]
    kind, message = expected(case, "bundles", dir=path, **values)
    set_env(case, monkeypatch)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)

    with pytest.raises(errors.PeftmmError) as error:
        load_bundle(path)
    check_error(error.value, kind, message)
    if case.get("inspect"):  # found from the config and header alone, without loading a backbone
        with pytest.raises(errors.PeftmmError) as error:
            bundle_summary(path)
        check_error(error.value, kind, message)
        check_cli(invoke("inspect", path), expected(case, "bundles", "cli_message", dir=path, **values)[1])
    else:
        assert invoke("inspect", path).exit_code == 0
    check_cli(invoke("predict", path, "--image", image, "--question", QUESTION),
              expected(case, "bundles", "cli_message", dir=path, **values)[1])
    assert snapshot(tmp_path) == before

    # a serving runtime: the bundle is refused and nothing of it stays
    state = _serving_state(runtime, image)
    assert state[3] == answer
    shutil.copytree(path, root / case["id"], symlinks=True)  # a link stays a link
    try:
        if case.get("fresh_runtime"):
            from peftmm.runtime import Runtime

            fresh = Runtime(device="cpu", root=root)
            with pytest.raises(errors.PeftmmError) as error:
                fresh.register(case["id"])
            assert fresh.names() == [] and fresh.backbones() == []
        else:
            with pytest.raises(errors.PeftmmError) as error:
                runtime.register(case["id"])
        served = expected(case, "bundles", "runtime_message", dir=root / case["id"], **values)
        check_error(error.value, *served)
        assert _serving_state(runtime, image) == state
    finally:
        shutil.rmtree(root / case["id"])


# -- adapter names and bundle paths -----------------------------------------------------------

@pytest.mark.parametrize("case", cases("names"))
def test_bad_name_or_path(case, cli_run, serving, tmp_path, monkeypatch):
    from peftmm.predict import Predictor

    root, runtime, image, _ = serving
    kind, message = expected(case, "names")
    run = cli_run[1]
    run_before = snapshot(run)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    if "publish" in case:
        with pytest.raises(errors.PeftmmError) as error:
            check_adapter_name(case["publish"])
        check_error(error.value, kind, message)
        check_cli(invoke("publish", "--to", tmp_path / "out", "--", run, case["publish"]), message)
    elif "predict" in case:
        with pytest.raises(errors.PeftmmError) as error:
            Predictor.load(case["predict"], device="cpu")
        check_error(error.value, kind, message)
        check_cli(invoke("predict", case["predict"], "--image", image, "--question", QUESTION), message)
    else:
        (root.parent / "outside").mkdir(exist_ok=True)
        state = _serving_state(runtime, image)
        with pytest.raises(errors.PeftmmError) as error:
            runtime.register(case["runtime"], name=case.get("name"))
        check_error(error.value, kind, message)
        assert _serving_state(runtime, image) == state
    assert snapshot(tmp_path) == before and snapshot(run) == run_before  # no --to folder, nothing moved


# -- resuming ---------------------------------------------------------------------------------

def _unfinished(run: Path) -> None:
    shutil.rmtree(run / "bundle")


def _each(run: Path, name: str, damage) -> None:
    for path in sorted((run / "checkpoints").glob(f"step-*/{name}")):
        damage(path)


SETUPS = {
    "empty_folder": lambda run: [shutil.rmtree(run), run.mkdir()],
    "finished": lambda run: None,
    "unfinished": _unfinished,
    "no_checkpoint": lambda run: [_unfinished(run), shutil.rmtree(run / "checkpoints")],
    "checkpoints_truncated": lambda run: [_unfinished(run), _each(
        run, "tensors.safetensors", lambda p: p.write_bytes(p.read_bytes()[:-100]))],
    "checkpoints_state_not_json": lambda run: [_unfinished(run), _each(run, "state.json", lambda p: p.write_text("{"))],
    "run_recipe_edited": lambda run: [_unfinished(run), (run / "recipe.yaml").write_text(
        (run / "recipe.yaml").read_text().replace("lr: 0.005", "lr: 0.004"))],
    "run_recipe_not_yaml": lambda run: [_unfinished(run), (run / "recipe.yaml").write_text("name: [unclosed\n")],
}


@pytest.mark.parametrize("case", cases("resume"))
def test_bad_resume(case, cli_run, tmp_path, monkeypatch):
    from peftmm.checkpoint import resume_recipe
    from peftmm.trainer import train

    recipe_file, source, _ = cli_run
    assert "lr: 0.005" in (source / "recipe.yaml").read_text() and sorted(
        p.name for p in (source / "checkpoints").glob("step-*")) == ["step-00000006", "step-00000012"]
    run = tmp_path / "run"
    shutil.copytree(source, run)
    SETUPS[case["setup"]](run)
    given = None
    if case.get("recipe") == "other":
        given = tmp_path / "other.yaml"
        data = yaml.safe_load(recipe_file.read_text())
        data["train"].update(lr=0.01, epochs=2)  # the run was started with --set train.epochs=2
        given.write_text(yaml.safe_dump(data))
    overrides = case.get("set", [])
    kind, message = expected(case, "resume", dir=run)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)

    with pytest.raises(errors.PeftmmError) as error:
        recipe = resume_recipe(run, str(given) if given else None, overrides)
        train(recipe, run, progress=False, log=lambda _: None, resume=True)
    check_error(error.value, kind, message)
    args = ([given] if given else []) + ["--resume", run] + [a for item in overrides for a in ("--set", item)]
    check_cli(invoke("train", *args, "--no-progress"), message)
    assert snapshot(tmp_path) == before  # the run directory exactly as it was


# -- label templates --------------------------------------------------------------------------

@pytest.mark.parametrize("case", cases("templates"))
def test_bad_template(case, cli_run, serving, tmp_path, monkeypatch):
    from peftmm.predict import check_template

    _, _, image, _ = serving
    kind, message = expected(case, "templates")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.PeftmmError) as error:
        check_template(case["template"])
    check_error(error.value, kind, message)
    check_cli(invoke("predict", cli_run[1] / "bundle", "--image", image, "--labels", "circle,square",
                     "--template", case["template"]), message)
    assert snapshot(tmp_path) == {}


# -- merges -----------------------------------------------------------------------------------

def _swap_labels(config: dict) -> None:
    config["labels"][0], config["labels"][1] = config["labels"][1], config["labels"][0]


SECONDS = {
    "same": lambda p: None,
    "other_fingerprint": lambda p: _edit_config(p, lambda c: c["towers"]["text"].update(fingerprint="0" * 64),
                                                resign=True),
    "other_labels": lambda p: _edit_config(p, _swap_labels, resign=True),
    "other_method": lambda p: _edit_config(p, lambda c: c["recipe"]["text"]["methods"][0].update(type="adapter"),
                                           resign=True),
    "other_fusion": lambda p: _edit_config(p, lambda c: c["recipe"]["fusion"].update(heads=4), resign=True),
}


@pytest.mark.parametrize("case", cases("merges"))
def test_bad_merge(case, cli_run, tmp_path, monkeypatch):
    from peftmm.merging import combination, merge_bundles
    from peftmm.safe_load import short_repr

    good, second = tmp_path / "good", tmp_path / "second"
    shutil.copytree(cli_run[1] / "bundle", good)
    shutil.copytree(cli_run[1] / "bundle", second)
    SECONDS[case["second"]](second)
    config, changed = json.loads((good / CONFIG).read_text()), json.loads((second / CONFIG).read_text())
    kind, message = expected(
        case, "merges", good=good, second=second, text=config["towers"]["text"]["backbone"],
        fingerprint=config["towers"]["text"]["fingerprint"][:12], label0=short_repr(config["labels"][0]),
        label1=short_repr(config["labels"][1]), fusion=json.dumps(changed["recipe"]["fusion"], sort_keys=True),
        good_fusion=json.dumps(config["recipe"]["fusion"], sort_keys=True))
    method, density, weights = case.get("method", "linear"), case.get("density"), case.get("weights")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)

    with pytest.raises(errors.PeftmmError) as error:
        merge_bundles(tmp_path / "out", [good, second], combination(2, weights, method, density))
    check_error(error.value, kind, message)
    options = ["--method", method] + (["--density", density] if density is not None else []) + \
        (["--weights", ",".join(map(str, weights))] if weights else [])
    check_cli(invoke("merge", tmp_path / "out", good, second, *options), message)
    assert snapshot(tmp_path) == before   # no OUT, no temporary folder, both bundles as they were


# -- HTTP requests ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_png() -> bytes:
    """A one-colour 9400x9400 PNG (~23 KB): 88 MP, under Pillow's own limit, over peftmm's 40 MP."""
    out = io.BytesIO()
    Image.new("P", (9400, 9400), 3).save(out, "PNG")
    return out.getvalue()


def _bundle_in(root: Path, source: Path, name: str, damage) -> dict:
    shutil.copytree(source, root / name)
    damage(root / name)
    return {"json": {"bundle": name}}


BODIES = {
    "deep_json": lambda ctx: {"content": _nested(100_000).encode(), "headers": {"content-type": "application/json"}},
    "huge_int_json": lambda ctx: {"content": b'{"adapter": "good", "question": "what?", "image_base64": ' + b"1" * 5000
                                  + b"}", "headers": {"content-type": "application/json"}},
    "register_deep_bundle": lambda ctx: _bundle_in(ctx["root"], ctx["source"], "deep-config", DAMAGES["config_deep"]),
    "register_nan_bundle": lambda ctx: _bundle_in(ctx["root"], ctx["source"], "nan-head", DAMAGES["tensor_nan"]),
    "big_png": lambda ctx: {"json": {"adapter": "good", "question": QUESTION,
                                     "image_base64": base64.b64encode(ctx["png"]).decode()}},
    "big_png_upload": lambda ctx: {"data": {"adapter": "good", "question": QUESTION},
                                   "files": {"image": ("big.png", ctx["png"], "image/png")}},
}


@pytest.mark.parametrize("case", cases("requests"))
def test_bad_request(case, cli_run, serving, big_png):
    """Each answered with its 4xx and message, as JSON; the server serves on as it did."""
    from fastapi.testclient import TestClient

    from peftmm.serve import create_app

    root, runtime, image, _ = serving
    state = _serving_state(runtime, image)
    before = {p.name for p in root.iterdir()}
    request = BODIES[case["body"]]({"root": root, "source": cli_run[1] / "bundle", "png": big_png})
    try:
        with TestClient(create_app(runtime), raise_server_exceptions=False) as client:
            response = client.post(case["path"], **request)
            assert response.status_code == case["status"], response.text
            assert case["message"] in response.json()["error"], response.text
            assert client.get("/api/health").json()["adapters"] == ["good"]
    finally:
        for added in {p.name for p in root.iterdir()} - before:
            shutil.rmtree(root / added)
    assert _serving_state(runtime, image) == state


# -- the corpus itself ------------------------------------------------------------------------

def test_the_corpus_has_distinct_cases_and_no_unused_files():
    ids = [case["id"] for section in CASES.values() for case in section]
    assert len(ids) == len(set(ids)), "case ids must be distinct"
    used = {case["file"] for section in ("recipes", "data") for case in CASES[section]}
    files = {p.name for folder in ("recipes", "data") for p in (CORPUS / folder).iterdir()}
    assert files <= used, f"files no case uses: {sorted(files - used)}"
    assert {case["damage"] for case in CASES["bundles"]} == set(DAMAGES)
    assert {case["setup"] for case in CASES["resume"]} <= set(SETUPS)
    assert {case["body"] for case in CASES["requests"]} == set(BODIES)
    # docs/input-safety.md states the corpus size and its parts: it must say what the corpus holds
    doc = (Path(__file__).resolve().parent.parent / "docs" / "input-safety.md").read_text()
    parts = {name: len(section) for name, section in CASES.items()}
    stated = (f"{len(ids)} bad inputs ({parts['recipes']} recipes and `--set` strings, {parts['data']} data files, "
              f"{parts['bundles']} damaged bundles, {parts['names']} adapter names or paths that escape their "
              f"folder, {parts['resume']} resumes, {parts['templates']} label templates, {parts['requests']} HTTP "
              f"requests, {parts['merges']} merges of bundles that do not agree or with bad options)")
    assert stated in " ".join(doc.split()), f"docs/input-safety.md should say: {stated}"
