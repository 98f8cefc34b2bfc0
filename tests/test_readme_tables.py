"""The documentation's result tables are the benchmark JSON rendered (bench/readme_tables.py), not
typed; they may sit in the README or any page under docs/, and every relative link there resolves."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "bench" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_page_with_tables_matches_the_benchmark_results(tables):
    pages = tables.documents()
    assert ROOT / "README.md" in pages and ROOT / "docs" / "results.md" in pages
    shown = {}
    for page in pages:
        text = page.read_text()
        for name in re.findall(r"^<!-- bench:([\w-]+) -->$", text, re.M):
            assert f"<!-- /bench:{name} -->" in text, f"{page.name}: block {name} is never closed"
            shown.setdefault(name, []).append(page.relative_to(ROOT).as_posix())
        assert tables.render(text, page) == text, (
            f"{page.relative_to(ROOT)}: tables are stale: run .venv/bin/python bench/readme_tables.py")
    assert set(shown) == set(tables.TABLES), f"tables shown nowhere: {sorted(set(tables.TABLES) - set(shown))}"
    assert tables.stale() == []


def test_a_stale_table_is_caught_and_rendering_twice_changes_nothing(tables, tmp_path):
    page = ROOT / "docs" / "results.md"
    text = page.read_text()
    block = text[text.index("<!-- bench:methods -->"):text.index("<!-- /bench:methods -->")]
    assert "| easy-vqa-lora |" in block
    edited = text.replace(block, block.replace("| easy-vqa-lora |", "| easy-vqa-lora-typed-by-hand |"))
    assert tables.render(edited, page) == text
    assert tables.render(tables.render(edited, page), page) == text
    with pytest.raises(ValueError, match="unknown table block"):
        tables.render("<!-- bench:nonsense -->\n<!-- /bench:nonsense -->\n", page)


def test_chart_links_are_rebased_onto_the_page(tables):
    """A block's chart is written relative to the repository root; on a page under docs/ it points
    one folder up, and it exists."""
    block = tables.peft()
    assert "](bench/results/compare_peft.png)" in block
    page = ROOT / "docs" / "results.md"
    rebased = tables.render("<!-- bench:peft -->\n<!-- /bench:peft -->\n", page)
    assert "](../bench/results/compare_peft.png)" in rebased
    assert (page.parent / "../bench/results/compare_peft.png").resolve().is_file()
    assert "](bench/results/compare_peft.png)" in tables.render("<!-- bench:peft -->\n<!-- /bench:peft -->\n")


def test_the_default_recipes_table_is_the_shipped_bundle(tables):
    """bench/results/default_bundle.json (bench/bundle_report.py) holds the numbers of the bundle
    that ships: republishing it without rerunning the report fails here."""
    data = json.loads((ROOT / "bench/results/default_bundle.json").read_text())
    bundle = ROOT / "adapters" / data["bundle"]
    config = json.loads((bundle / "peftmm_config.json").read_text())
    assert data["metrics"] == {k: config["metrics"][k] for k in data["metrics"]}
    assert data["adapter_bytes"] == (bundle / "adapter_model.safetensors").stat().st_size
    assert {name: b["source"] for name, b in data["backbones"].items()} == \
        {name: t["backbone"] for name, t in config["towers"].items()}
    assert f"| adapter file | {data['adapter_bytes']:,} bytes |" in tables.bundle_table(data)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_relative_links_in_the_docs_resolve(tables):
    """Every link between the README and docs/ (and to files of the repository) points at a file,
    and at a heading of it where it names one."""
    broken = []
    for page in tables.documents():
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue   # a URL
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def _aggregate(label, task, metrics, chain_from=None, as_recipe=True, seeds=(0,)):
    stats = {k: {"mean": v, "std": 0.01 if len(seeds) > 1 else None, "n": len(seeds)} for k, v in metrics.items()}
    for k, v in (("trainable_params", 1000), ("trainable_share", 0.01), ("adapter_bytes", 4000),
                 ("train_seconds", 10.0), ("wall_seconds", 20.0)):
        stats[k] = {"mean": v, "std": None, "n": len(seeds)}
    return {"label": label, "recipe": label.split(" <- ")[0], "task": task, "chain_from": chain_from,
            "as_recipe": as_recipe, "seeds": list(seeds), "wall_measured": True, "metrics": stats}


def test_emoji_block_renders_partial_data(tables):
    """Rows exist only for what was measured; runs with overrides never reach the README."""
    baselines = json.loads((ROOT / "bench/results/emoji_baselines.json").read_text())
    empty = tables.emoji_tables.emoji({"aggregates": {}, "template": "an emoji of {}"}, baselines)
    assert "| chance (K/N, N = 183) |" in empty and "nearest neighbour" in empty and "probe" in empty
    assert "| the pair-memory bridge alone, nothing trained (frozen features, K = 5) |" in empty
    assert "No recipe runs collected yet" in empty and "`emoji-" not in empty

    recall = {f"test_{d}_r{k}": 0.1 * k for d in ("t2i", "i2t") for k in (1, 5, 10)} | {"test_mean_recall": 0.4}
    zero_shot = {"zero_shot_accuracy": 0.3, "zero_shot_macro_f1": 0.2}
    aggregates = {
        "emoji-retrieval": _aggregate("emoji-retrieval", "retrieval", recall | zero_shot, seeds=(0, 1, 2)),
        "emoji-retrieval <- emoji-retrieval-projection": _aggregate(
            "emoji-retrieval <- emoji-retrieval-projection", "retrieval", recall,
            chain_from="emoji-retrieval-projection"),
        "emoji-group (modified)": _aggregate("emoji-group", "classification", {"test_accuracy": 0.9}, as_recipe=False),
    }
    text = tables.emoji_tables.emoji({"aggregates": aggregates, "template": "an emoji of {}"}, baselines)
    assert "| `emoji-retrieval` | 10.0 ± 1.0 | 50.0 ± 1.0 | 100.0 ± 1.0 |" in text
    assert "`emoji-retrieval` from `emoji-retrieval-projection` (init_from) | 10.0 | 50.0 |" in text
    assert "zero-shot, prompt \"an emoji of <group>\" | image | 30.0 ± 1.0 | 20.0 ± 1.0 | 3 |" in text
    assert "| stage chain |" in text and "| mean_recall | 40.0 | 40.0 ± 1.0 | 1 / 3 |" in text
    assert "emoji-group" not in text and "emoji-caption" not in text   # modified and absent runs
    assert "| `emoji-retrieval` | 1,000 | 1.000% | 4,000 | 10 s | 20 s | 3 |" in text
    assert "Difference from the nearest neighbour" not in text   # no captioning run collected


def test_classifiers_say_what_they_read(tables):
    """A classifier with a fixed prompt reads the image alone; without one, image and text."""
    image = _aggregate("emoji-group", "classification", {"test_accuracy": 0.75, "test_macro_f1": 0.7})
    both = _aggregate("emoji-group-image-text", "classification", {"test_accuracy": 0.85, "test_macro_f1": 0.8})
    image["reads"], both["reads"] = "image", "image and text"
    text = tables.emoji_tables.emoji({"aggregates": {"emoji-group": image, "emoji-group-image-text": both},
                         "template": "an emoji of {}"}, {})
    assert "| `emoji-group`, trained | image | 75.0 | 70.0 | 1 |" in text
    assert "| `emoji-group-image-text`, trained | image and text | 85.0 | 80.0 | 1 |" in text


def test_captioners_are_compared_with_the_nearest_neighbour(tables):
    baselines = {"nearest_neighbour_captioning": {"exact_match": 0.0, "bleu4": 0.05, "cider_d": 0.4,
                                                  "unigram_f1": 0.2, "oracle_best_train_caption_unigram_f1": 0.4}}
    captioner = _aggregate("emoji-caption", "captioning", {"test_unigram_f1": 0.245, "test_cider_d": 0.5})
    text = tables.emoji_tables.emoji({"aggregates": {"emoji-caption": captioner}, "template": "an emoji of {}"},
                                     baselines)
    assert "Difference from the nearest neighbour in points of unigram F1 (seed means): `emoji-caption` +4.5." in text


def test_retrieval_recipes_are_compared_with_the_projection_only_baseline(tables):
    recall = {"test_t2i_r1": 0.2, "test_i2t_r1": 0.1}
    aggregates = {"emoji-retrieval-projection": _aggregate("emoji-retrieval-projection", "retrieval", recall),
                  "emoji-retrieval-adapters": _aggregate("emoji-retrieval-adapters", "retrieval",
                                                         {"test_t2i_r1": 0.26, "test_i2t_r1": 0.08})}
    text = tables.emoji_tables.emoji({"aggregates": aggregates, "template": "an emoji of {}"}, {})
    assert ("Difference from `emoji-retrieval-projection` in points of the seed means (t2i R@1 / i2t R@1): "
            "`emoji-retrieval-adapters` +6.0 / -2.0.") in text
    adapters_only = {"emoji-retrieval-adapters": aggregates["emoji-retrieval-adapters"]}
    alone = tables.emoji_tables.emoji({"aggregates": adapters_only, "template": "an emoji of {}"}, {})
    assert "Difference from" not in alone


def _handwired_result(side: str, peak: int, above: int, step: float, **extra) -> dict:
    return {"side": side, "trainable_params": 1234, "train_peak_rss": peak, "train_above_baseline": above,
            "median_step_s": step, "median_step_cpu_s": 2 * step, "samples_per_s": 32 / step, "device": "cpu",
            "torch_threads": 2, **extra}


def test_instruct_handwired_block_compares_the_two_sides(tables):
    """bench/instruct_handwired.py's JSON: both sides' memory and step, the ratios, what each side does."""
    mib = 2**20
    data = {"recipe": "easy-vqa-instruct", "settings": {"steps": 15, "batch_size": 32, "warmup": 3},
            "lora": {"r": 16, "alpha": 32.0, "targets": ["q_proj", "v_proj"]},
            "precision": {"vision": "int8", "text": "int8"}, "image_tokens": 4,
            "same_sequences": {"compared": 480, "identical": 480, "mean_tokens": 24.3, "max_tokens": 28},
            "results": [_handwired_result("hand-wired", 3000 * mib, 2000 * mib, 8.0, median_vision_s=1.5),
                        _handwired_result("peftmm", 1500 * mib, 1000 * mib, 4.0, cache_fill_seconds=12.5)],
            "ratios": {"memory_above_baseline": 0.5, "memory_raw": 0.5, "step": 0.5, "step_cpu": 0.25}}
    text = tables.instruct_tables.handwired(data)
    assert "| peak RSS up to the last step | 3,000 MiB | 1,500 MiB |" in text
    assert "| median step, batch 32 | 8.00 s | 4.00 s |" in text
    assert "| CPU time of a step (median, all threads) | 16.00 s | 8.00 s |" in text and "(0.25x its CPU time)" in text
    assert "(median 1.50 s of the step)" in text and "before training: 12.5 s" in text
    assert "**0.50x** the memory above the baseline" in text and "**0.50x** the step time" in text
    assert "LoRA r 16 (alpha 32) on q_proj, v_proj" in text and "480 of 480 training questions" in text
    assert "](bench/results/instruct_handwired.png)" in text


def test_instruct_generation_block_gives_tokens_per_second_and_agreement(tables):
    def run(rate):
        return {"tokens_per_s": rate, "median_call_s": 1.0, "seconds": [1.0], "tokens": [rate], "answers": []}

    names = ("peftmm-int8", "peftmm-fp32", "peftmm-fp32-merged", "transformers-merged")
    data = {"bundle": "trained here", "train_steps": 4, "bundle_precision": "int8", "device": "cpu", "torch_threads": 2,
            "recipe": "easy-vqa-instruct", "lora": {"r": 16, "alpha": 32, "targets": ["q_proj", "v_proj"]},
            "settings": {"prompt": "Describe the image.", "max_new_tokens": 32, "repeats": 5, "batches": [1, 16]},
            "results": {"1": {n: run(r) for n, r in zip(names, (10.0, 20.0, 30.0, 30.0))},
                        "16": {n: run(r) for n, r in zip(names, (100.0, 200.0, 300.0, 400.0))}},
            "ratios": {"1": dict(zip(names, (1 / 3, 2 / 3, 1.0, 1.0))), "16": dict(zip(names, (0.25, 0.5, 0.75, 1.0)))},
            "agreement": {size: {n: {"same": 16 - (n == "peftmm-int8"), "of": 16} for n in names[:3]}
                          for size in ("1", "16")},
            "reached_max_new_tokens": {size: {n: 9 for n in names} for size in ("1", "16")}}
    text = tables.instruct_tables.generation(data)
    lines = text.splitlines()
    assert lines[0].startswith("| variant | batch 1: tokens/s | vs transformers | batch 16: tokens/s |")
    assert "| peftmm `Predictor`, LoRA unmerged, int8 LM (as the recipe trains) | 10.0 | 0.33x | 100.0 | 0.25x | " \
           "15 of 16, 15 of 16 |" in lines
    assert "| transformers `generate`, LoRA merged (`merge_and_unload`), fp32 | 30.0 | 1.00x | 400.0 | 1.00x | " \
           "(the reference) |" in lines
    assert "a bundle trained 4 steps from `easy-vqa-instruct` (LoRA r 16 on q_proj, v_proj), int8 LM;" in text
    assert "9 of 16 at batch 1" in text
