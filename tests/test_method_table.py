"""bench/method_table.py and bench/soups.py: the spec's validation, the aggregation over seeds,
resuming (finished runs are read, not trained again), the docs blocks, and one tiny real table
trained through `peftmm train`."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import yaml

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import method_table as mt  # noqa: E402
import method_tables  # noqa: E402
import soups  # noqa: E402


@pytest.fixture(scope="module")
def spec():
    return mt.load_spec(mt.SPEC)


def test_the_shipped_spec_validates_and_its_methods_parse(spec):
    """Every run of the shipped spec whose method types peftmm registers parses as a recipe
    (the LoRA variants' options, the precisions they need), before any training."""
    from peftmm.methods import METHODS

    assert set(spec["tasks"]) == {"emoji-group", "emoji-instruct"}
    assert "prefix" not in spec["tasks"]["emoji-group"]["methods"]   # MobileNetV2 has no attention
    assert soups.validate_soups(spec, "spec")["across_tasks"][0]["method"] in ("ties", "dare_ties", "dare_linear")
    known = [(t, m) for t, m in mt.selected(spec, None, None)
             if all(x["type"] in METHODS.names() for x in spec["tasks"][t]["methods"][m]["methods"])]
    assert {"dora", "pissa", "lora-plus", "rslora", "full", "prefix"} <= {m for _, m in known}
    assert mt.check_recipes(spec, known, {"epochs": 1, "max_train_samples": 64}) == []


def test_a_method_peftmm_does_not_know_is_caught_before_training(spec):
    broken = copy.deepcopy(spec)
    broken["tasks"]["emoji-group"]["methods"]["lora"]["methods"][0]["rank"] = 4
    errors = mt.check_recipes(broken, [("emoji-group", "lora")], {})
    assert len(errors) == 1 and errors[0].startswith("emoji-group / lora: ") and "rank" in errors[0]


def _mutated(spec, path, value):
    data = copy.deepcopy(spec)
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


@pytest.mark.parametrize("path, value, message", [
    (("tasks",), {}, "tasks: must map task names"),
    (("extra",), 1, "the spec: unknown key"),
    (("tasks", "emoji-group", "recipe"), "recipes/nope.yaml", "tasks.emoji-group.recipe: no recipe file"),
    (("tasks", "emoji-group", "tower"), "audio", "tasks.emoji-group.tower: must be vision or text"),
    (("tasks", "emoji-group", "metrics"), [], "tasks.emoji-group.metrics: must be a non-empty list"),
    (("tasks", "emoji-group", "methods", "lora", "methods"), [{"r": 8}],
     "tasks.emoji-group.methods.lora.methods: must be a list of"),
    (("tasks", "emoji-group", "methods", "lora", "sets"), [], "tasks.emoji-group.methods.lora: unknown key"),
    (("tasks", "emoji-group", "methods", "lora", "set"), ["train.epochs"], "methods.lora.set: must be a list of KEY="),
    (("tasks", "emoji-group", "methods", "lora", "set"), ["vision.methods=[]"], "is what `methods:` sets"),
    (("tasks", "emoji-group", "methods", "full", "methods"), KeyError, "methods.full: missing methods"),
    (("tasks", "emoji-group", "size"), {"steps": 10}, "tasks.emoji-group.size: unknown key.*steps"),
    (("tasks", "emoji-group", "size"), {"epochs": 0}, r"tasks.emoji-group.size.epochs: must be a whole number >= 1"),
    (("tasks", "emoji-group", "size"), {"max_eval_samples": "all"}, "size.max_eval_samples: must be a whole number"),
])
def test_a_bad_spec_is_one_error_naming_the_key(spec, path, value, message):
    with pytest.raises(mt.SpecError, match="^spec.yaml: .*" + message.replace("[", r"\[")):
        mt.validate_spec(_mutated(spec, path, value), "spec.yaml")


@pytest.mark.parametrize("path, value, message", [
    (("soups", "seeds", 0, "method"), "dora2", "soups.seeds.0: no method 'dora2'"),
    (("soups", "seeds", 0, "start"), {"seed": "0"}, "soups.seeds.0.start.seed: the seed whose bundle"),
    (("soups", "seeds", 0, "start"), {"run": 0}, "soups.seeds.0.start: unknown key"),
    (("soups", "seeds", 0, "merge"), ["ties"], "soups.seeds.0.merge: a list of linear and cat"),
    (("soups", "across_tasks", 0, "density"), 0, r"density: must be in \(0, 1\]"),
    (("soups", "across_tasks", 0, "density"), 1.5, r"density: must be in \(0, 1\]"),
    (("soups", "across_tasks", 0, "method"), "average", "method: one of ties"),
    (("soups", "across_tasks", 0, "weights"), [1.0], "weights: one weight per run"),
    (("soups", "across_tasks", 0, "runs", "image-text"), KeyError, "runs: must name exactly two runs"),
    (("soups", "across_tasks", 0, "runs", "image", "tower"), "fusion",
     r"across_tasks.0: tasks.group-image\+image-text-image.tower: must be vision or text"),
    (("soups", "across_tasks", 0, "seed"), "0", "seed: the seed of both runs"),
    (("soups", "across_tasks", 0, "size"), {"epochs": -1}, r"across_tasks.0: tasks.group-image\+image-text-image.size"
     r".epochs: must be a whole number"),
])
def test_a_bad_soups_section_is_one_error_naming_the_key(spec, path, value, message):
    with pytest.raises(mt.SpecError, match=message):
        soups.validate_soups(_mutated(spec, path, value), "spec.yaml")


def test_selection_and_run_sizes(spec):
    assert mt.selected(spec, ["emoji-group"], ["lora", "full"]) == [("emoji-group", "lora"), ("emoji-group", "full")]
    with pytest.raises(mt.SpecError, match="--methods: unknown lora2"):
        mt.selected(spec, None, ["lora2"])
    assert mt.size_tag([]) == "recipe"
    task = {"size": {"epochs": 3, "max_eval_samples": 120}}
    assert mt.run_size(task, {}) == ["train.epochs=3", "data.max_eval_samples=120"]
    # the command line replaces the spec's size key by key
    size = mt.run_size(task, {"epochs": 1, "max_train_samples": 256, "max_eval_samples": None})
    assert size == ["train.epochs=1", "data.max_train_samples=256", "data.max_eval_samples=120"]
    assert mt.size_tag(size) == "epochs1-train256-eval120"
    assert mt.runs_folder(None, size) == mt.RESULTS / "runs" / "method-table" / "epochs1-train256-eval120"
    assert mt.run_size({}, {}) == [] and mt.runs_folder("elsewhere", size) == Path("elsewhere").resolve()
    task = spec["tasks"]["emoji-group"]
    assert mt.method_overrides(task, task["methods"]["full"]) == \
        ['vision.methods=[{"type": "full", "lr": 5e-05}]', "vision.precision=fp32"]
    assert mt.method_keys(task, task["methods"]["full"]) == {"vision.methods", "vision.precision"}


def _row(task, method, seed, accuracy, beyond=None):
    return {"task": task, "method": method, "seed": seed, "test": {"accuracy": accuracy, "loss": 1.0},
            "trainable_params": 100, "trainable_share": 0.01, "adapter_bytes": 400, "train_seconds": 10.0 + seed,
            "wall_seconds": 20.0, "peak_rss_bytes": 2**30, "resumed": False,
            "beyond_method": beyond if beyond is not None else {"train.epochs": 1}}


def test_aggregate_is_mean_and_std_over_seeds_in_the_spec_order(spec):
    rows = [_row("emoji-group", "full", 0, 0.8), _row("emoji-group", "lora", 1, 0.7),
            _row("emoji-group", "lora", 0, 0.5), _row("emoji-group", "lora", 2, 0.6)]
    lora, full = mt.aggregate(rows, spec)
    assert (lora["method"], full["method"]) == ("lora", "full")   # the spec lists lora first
    assert lora["seeds"] == [0, 1, 2] and full["seeds"] == [0]
    assert lora["metrics"]["accuracy"]["mean"] == pytest.approx(0.6)
    assert lora["metrics"]["accuracy"]["std"] == pytest.approx(0.1)
    assert lora["metrics"]["train_seconds"]["mean"] == pytest.approx(11.0)
    assert full["metrics"]["accuracy"]["std"] is None and full["set"] == ["vision.precision=fp32"]
    assert lora["beyond_method"] == {"train.epochs": 1}
    rows.append(_row("emoji-group", "lora", 3, 0.6, beyond={}))
    with pytest.raises(mt.SpecError, match="emoji-group / lora: the seeds' runs differ"):
        mt.aggregate(rows, spec)


def test_a_finished_run_is_read_not_trained_again(spec, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(mt, "train", lambda *args: calls.append(args))   # returns None: a failed run
    task = spec["tasks"]["emoji-group"]
    overrides = [*mt.method_overrides(task, task["methods"]["lora"]), "train.epochs=1", "train.seed=0"]
    run_dir = mt.run_path(tmp_path, "emoji-group", "lora", 0)
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps({**_row("emoji-group", "lora", 0, 0.5), "overrides": overrides}))
    assert mt.run_one(tmp_path, spec, "emoji-group", "lora", 0, ["train.epochs=1"])["test"]["accuracy"] == 0.5
    assert calls == []
    with pytest.raises(mt.SpecError, match="lora-s0/result.json: was made with .* delete .* or give another"):
        mt.run_one(tmp_path, spec, "emoji-group", "lora", 0, ["train.epochs=2"])

    # an earlier try of the same run that failed without a checkpoint is started over
    failed = mt.run_path(tmp_path, "emoji-group", "full", 0)
    failed.mkdir(parents=True)
    full = [*mt.method_overrides(task, task["methods"]["full"]), "train.seed=0"]
    (failed / "bench_request.json").write_text(json.dumps({"overrides": full}))
    (failed / "train.log").write_text("stale")
    assert mt.run_one(tmp_path, spec, "emoji-group", "full", 0, []) is None
    assert len(calls) == 1 and calls[0][3] is False and not (failed / "train.log").exists()
    # files this script did not write are never deleted
    other = mt.run_path(tmp_path, "emoji-group", "dora", 0)
    other.mkdir(parents=True)
    (other / "notes.txt").write_text("mine")
    with pytest.raises(mt.SpecError, match="dora-s0: holds files that are not a run of this script"):
        mt.run_one(tmp_path, spec, "emoji-group", "dora", 0, [])
    assert (other / "notes.txt").read_text() == "mine" and len(calls) == 1


def test_the_docs_blocks_show_the_overrides_in_the_caption(spec):
    rows = [_row("emoji-group", m, s, 0.5 + 0.1 * s) for m in ("lora", "full") for s in (0, 1)]
    data = {"tasks": {t: {k: v[k] for k in ("recipe", "tower", "metrics")} for t, v in spec["tasks"].items()},
            "aggregates": mt.aggregate(rows, spec)}
    text = method_tables.method_table(data)
    assert "every run also differs from the recipe by `train.epochs=1`" in text
    assert "| lora | lora(r=8, alpha=16) | 55.0 ± 7.1 | – | 100 | 1.000% | 400 | 10 s | 20 s | 1,024 MiB | 0, 1 |" \
        in text
    assert "| full | full(lr=5e-05); `vision.precision=fp32` |" in text and "emoji-instruct" not in text
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1 and len(table) == 4   # header, rule, two methods
    assert method_tables.method_table({"tasks": data["tasks"], "aggregates": []}) == \
        "No method-table runs collected yet."

    soup = {"task": "emoji-group", "method": "lora", "metrics": ["accuracy"], "beyond_method": {},
            "members": [{"seed": 0, "test": {"accuracy": 0.5}}, {"seed": 1, "test": {"accuracy": 0.7}}],
            "seed_mean": {"accuracy": 0.6}, "soups": {"linear": {"accuracy": 0.25}, "cat": {"accuracy": 0.55}}}
    across = {"name": "a+b", "method": "ties", "density": 0.5, "seed": 0, "tasks": ["a", "b"],
              "orders_largest_difference": 0.0, "beyond_method": {"train.epochs": 1},
              "metrics": ["exact_match"], "evaluations": {"a test": {"a": {"exact_match": 0.4},
                                                                     "merged (ties)": {"exact_match": 0.3}}}}
    started = {**soup, "start": {"seed": 0, "test": {"accuracy": 0.5}}}
    text = method_tables.soups({"seeds": [soup, started], "across_tasks": [across]})
    assert "**emoji-group / lora, from seed 0's bundle**" in text and "each trained from scratch" in text
    assert "| the start (seed 0's bundle) | 50.0 |" in text
    assert "| mean of the seeds | 60.0 |\n| **soup** (`--method linear`, equal weights) | 25.0 |\n" \
        "| **soup** (`--method cat`, equal weights) | 55.0 |" in text
    assert "`peftmm merge --method ties --density 0.5` of `a` and `b`" in text
    assert "| a test | merged (ties) | 30.0 |" in text
    assert "the two orders' tensors differ by at most 0." in text and "by `train.epochs=1`" in text


@pytest.fixture(scope="module")
def tiny_table(tiny_models, tmp_path_factory):
    """A spec over a tiny recipe (LoRA in the text tower, or nothing), its table trained through
    `peftmm train` once: (folder, the command, its JSON)."""
    root = tmp_path_factory.mktemp("method-table")
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"])))
    lora = [{"type": "lora", "r": 2}]
    (root / "spec.yaml").write_text(yaml.safe_dump({
        "tasks": {"tiny": {"recipe": str(recipe), "tower": "text", "metrics": ["accuracy"], "size": {"epochs": 2},
                           "methods": {"frozen": {"methods": []}, "lora": {"methods": lora}}}},
        "soups": {"seeds": [{"task": "tiny", "method": "lora", "merge": ["linear", "cat"]},
                            {"task": "tiny", "method": "lora", "start": {"seed": 0}}],
                  "across_tasks": [{"name": "pair", "method": "ties", "density": 0.5, "seed": 0, "size": {"epochs": 2},
                                    "metrics": ["accuracy"],
                                    "runs": {"a": {"recipe": str(recipe), "tower": "text", "methods": lora},
                                             "b": {"recipe": str(recipe), "tower": "text", "methods": lora,
                                                   "set": ["train.lr=0.02"]}}}]}}))
    cmd = [sys.executable, str(ROOT / "bench" / "method_table.py"), "--spec", str(root / "spec.yaml"),
           "--seeds", "0", "--runs-dir", str(root / "runs"), "--out", str(root / "out")]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    return root, cmd, json.loads((root / "out" / "method_table.json").read_text())


def test_a_tiny_table_trains_through_the_cli_and_resumes(tiny_table):
    root, cmd, data = tiny_table
    frozen, lora = data["runs"]
    assert (frozen["method"], lora["method"]) == ("frozen", "lora")
    assert lora["trainable_params"] > frozen["trainable_params"] and lora["adapter_bytes"] > frozen["adapter_bytes"]
    assert lora["peak_rss_bytes"] > 50 * 2**20 and lora["wall_seconds"] > 0 and 0 <= lora["test"]["accuracy"] <= 1
    assert lora["differs_from_recipe"]["text.methods"][0]["r"] == 2
    assert lora["beyond_method"] == {"train.epochs": 2} == frozen["beyond_method"]   # the spec's size
    assert data["tasks"]["tiny"]["size"] == ["train.epochs=2"]
    assert [a["method"] for a in data["aggregates"]] == ["frozen", "lora"]
    assert (root / "out" / "method_table.png").stat().st_size > 1000

    result = root / "runs" / "tiny" / "lora-s0" / "result.json"
    written = result.stat().st_mtime_ns
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training" not in again.stderr and result.stat().st_mtime_ns == written
    assert json.loads((root / "out" / "method_table.json").read_text())["runs"] == data["runs"]


def test_tiny_soups_merge_with_peftmm_merge_and_evaluate_with_peftmm_eval(tiny_table):
    root, _, table = tiny_table
    cmd = [sys.executable, str(ROOT / "bench" / "soups.py"), "--spec", str(root / "spec.yaml"), "--seeds", "0", "1",
           "--runs-dir", str(root / "runs"), "--out", str(root / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training tiny / lora / seed 0" not in done.stderr   # the table's run is reused
    assert "training tiny / lora / seed 1" in done.stderr
    data = json.loads((root / "out" / "soups.json").read_text())
    soup, shared = data["seeds"]
    assert soup["start"] is None
    assert [m["seed"] for m in soup["members"]] == [0, 1]
    # peftmm eval of the seed-0 bundle gives the test accuracy its training reported
    assert soup["members"][0]["test"]["accuracy"] == pytest.approx(table["runs"][1]["test"]["accuracy"], abs=1e-6)
    assert soup["seed_mean"]["accuracy"] == pytest.approx(sum(m["test"]["accuracy"] for m in soup["members"]) / 2)
    assert set(soup["soups"]) == {"linear", "cat"} and all(0 <= s["accuracy"] <= 1 for s in soup["soups"].values())
    for how, path in soup["merged"].items():
        recorded = json.loads((ROOT / path / "peftmm_config.json").read_text())["merge"]
        assert (recorded["method"], recorded["weights"]) == (how, [0.5, 0.5])

    # a soup of one start: seed 0's LoRA bundle, trained on at seeds 0 and 1 (init_from)
    assert shared["start"]["bundle"] == table["runs"][1]["run_dir"] + "/bundle"
    assert shared["start"]["test"]["accuracy"] == pytest.approx(table["runs"][1]["test"]["accuracy"], abs=1e-6)
    assert "training tiny / lora-from-s0 / seed 1" in done.stderr
    for member in shared["members"]:
        config = json.loads((ROOT / member["bundle"] / "peftmm_config.json").read_text())
        assert Path(config["recipe"]["init_from"]) == (ROOT / shared["start"]["bundle"]).resolve()
        assert "/lora-from-s0-s" in member["bundle"]

    pair, = data["across_tasks"]
    assert set(pair["evaluations"]) == {"a test", "b test"}
    assert set(pair["evaluations"]["b test"]) == {"b bundle", "merged (ties)"}
    assert pair["orders_largest_difference"] < 1e-6   # equal weights: the order does not matter
    for first, path in pair["merged"].items():
        recorded = json.loads((ROOT / path / "peftmm_config.json").read_text())
        assert (recorded["merge"]["method"], recorded["merge"]["density"]) == ("ties", 0.5)
        assert recorded["recipe"]["train"]["lr"] == (0.02 if first == "b" else 0.005)

    merged = ROOT / soup["merged"]["linear"] / "adapter_model.safetensors"
    written = merged.stat().st_mtime_ns
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert merged.stat().st_mtime_ns == written and "training" not in again.stderr
    assert json.loads((root / "out" / "soups.json").read_text()) == data
