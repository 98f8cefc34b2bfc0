"""docs/emoji.md's tables, rendered from bench JSON by bench/readme_tables.py (block ``emoji``:
bench/emoji_tasks.py's runs and bench/emoji_baselines.py's reference points)."""

from __future__ import annotations

import json
from pathlib import Path

from table_format import pct
from task_metrics import primary

RESULTS = Path(__file__).resolve().parent / "results"

EMOJI_ORDER = ["emoji-retrieval-projection", "emoji-retrieval-locked-text", "emoji-retrieval-memory",
               "emoji-retrieval", "emoji-retrieval-adapters", "emoji-caption-plain", "emoji-caption-greedy",
               "emoji-caption", "emoji-group", "emoji-group-subgroups", "emoji-group-image-text"]
RETRIEVAL_BASELINE = "emoji-retrieval-projection"   # the adapter recipes are compared with it



def _label(a: dict) -> str:
    return f"`{a['recipe']}` from `{a['chain_from']}` (init_from)" if a.get("chain_from") else f"`{a['recipe']}`"



def emoji(tasks: dict | None = None, baselines: dict | None = None) -> str:
    """Tables of whatever has been measured: recipes without runs are simply absent."""
    if tasks is None:
        path = RESULTS / "emoji_tasks.json"
        tasks = json.loads(path.read_text()) if path.exists() else {"aggregates": {}}
    if baselines is None and (RESULTS / "emoji_baselines.json").exists():
        baselines = json.loads((RESULTS / "emoji_baselines.json").read_text())
    runs = [a for a in tasks["aggregates"].values() if a["as_recipe"]]  # never runs with overrides
    runs.sort(key=lambda a: (EMOJI_ORDER.index(a["recipe"]) if a["recipe"] in EMOJI_ORDER else 99,
                             a.get("chain_from") or "", a["recipe"]))
    b = baselines or {}
    seeds = lambda a: str(len(a["seeds"]))  # noqa: E731
    recalls = [f"{d}_r{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)]
    lines = ["| retrieval, test split, recall (%) | t2i R@1 | t2i R@5 | t2i R@10 | i2t R@1 | i2t R@5 | i2t R@10 "
             "| seeds |", "|---|---|---|---|---|---|---|---|"]
    for a in (a for a in runs if a["task"] == "retrieval"):
        lines.append(f"| {_label(a)} | " + " | ".join(pct(a["metrics"], f"test_{r}") for r in recalls)
                     + f" | {seeds(a)} |")
    if "retrieval_chance" in b:
        c = b["retrieval_chance"]
        lines.append(f"| chance (K/N, N = {c['n']}) | " + " | ".join(f"{100 * c[r]:.1f}" for r in recalls) + " | – |")
    if "pair_memory_bridge" in b:
        m = b["pair_memory_bridge"]
        lines.append("| the pair-memory bridge alone, nothing trained (frozen features, "
                     f"K = {m['memory_neighbours']}) | "
                     + " | ".join(f"{100 * m[r]:.1f}" for r in recalls) + " | – |")
    base = next((a for a in runs if a["recipe"] == RETRIEVAL_BASELINE and not a.get("chain_from")), None)
    others = [a for a in runs if a["task"] == "retrieval" and a is not base]
    if base is not None and others:
        gain = lambda a, k: 100 * (a["metrics"][k]["mean"] - base["metrics"][k]["mean"])  # noqa: E731
        lines += ["", f"Difference from `{RETRIEVAL_BASELINE}` in points of the seed means (t2i R@1 / i2t R@1): "
                  + "; ".join(f"{_label(a)} {gain(a, 'test_t2i_r1'):+.1f} / {gain(a, 'test_i2t_r1'):+.1f}"
                              for a in others) + "."]
    lines += ["", "| captioning, test split | exact match (%) | BLEU-4 (0-1) | CIDEr-D (0-10) | unigram F1 (%) "
              "| seeds |", "|---|---|---|---|---|---|"]
    for a in (a for a in runs if a["task"] == "captioning"):
        m = a["metrics"]
        lines.append(f"| {_label(a)} | {pct(m, 'test_exact_match')} | {pct(m, 'test_bleu4', 1, 3)} | "
                     f"{pct(m, 'test_cider_d', 1, 3)} | {pct(m, 'test_unigram_f1')} | {seeds(a)} |")
    if "nearest_neighbour_captioning" in b:
        n = b["nearest_neighbour_captioning"]
        lines += [f"| nearest neighbour: caption of the most similar train image | {100 * n['exact_match']:.1f} | "
                  f"{n['bleu4']:.3f} | {n['cider_d']:.3f} | {100 * n['unigram_f1']:.1f} | – |",
                  f"| oracle: best train caption per test image | – | – | – | "
                  f"{100 * n['oracle_best_train_caption_unigram_f1']:.1f} | – |"]
        captioners = [a for a in runs if a["task"] == "captioning" and "test_unigram_f1" in a["metrics"]]
        if captioners:   # captioners are compared with the nearest neighbour in unigram F1
            lines += ["", "Difference from the nearest neighbour in points of unigram F1 (seed means): " + "; ".join(
                f"{_label(a)} {100 * (a['metrics']['test_unigram_f1']['mean'] - n['unigram_f1']):+.1f}"
                for a in captioners) + "."]
    instruct = [a for a in runs if a["task"] == "instruct"]
    if instruct:   # generated answers (bench/task_metrics.py): no baseline rows yet
        lines += ["", "| instruct, test split | exact match (%) | token F1 (%) | answers out of the training "
                  "vocabulary | answers generated | seeds |", "|---|---|---|---|---|---|"]
        lines += [f"| {_label(a)} | {pct(a['metrics'], 'test_exact_match')} | {pct(a['metrics'], 'test_token_f1')} | "
                  f"{pct(a['metrics'], 'test_out_of_vocabulary', 1)} | {pct(a['metrics'], 'test_answered', 1, 0)} | "
                  f"{seeds(a)} |" for a in instruct]
    groups = len(b["split"]["labels"]) if "split" in b else "the"
    lines += ["", f"| {groups} Unicode groups, test split | reads | accuracy (%) | macro-F1 (%) | seeds |",
              "|---|---|---|---|---|"]
    for a in (a for a in runs if a["task"] == "classification"):
        lines.append(f"| {_label(a)}, trained | {a.get('reads') or '–'} | {pct(a['metrics'], 'test_accuracy')} | "
                     f"{pct(a['metrics'], 'test_macro_f1')} | {seeds(a)} |")
    for a in (a for a in runs if "zero_shot_accuracy" in a["metrics"]):
        lines.append(f"| {_label(a)}, zero-shot, prompt \"{tasks['template'].replace('{}', '<group>')}\" "
                     f"| image | {pct(a['metrics'], 'zero_shot_accuracy')} | "
                     f"{pct(a['metrics'], 'zero_shot_macro_f1')} | {seeds(a)} |")
    if "majority_class" in b:
        mc, probe = b["majority_class"], b["linear_probe"]
        lines += [f"| majority class of train ({mc['label']}) | – | {100 * mc['accuracy']:.1f} | "
                  f"{100 * mc['macro_f1']:.1f} | – |",
                  f"| logistic-regression probe on frozen pooled image features (L2 {probe['l2']:g}, chosen on val) "
                  f"| image | {100 * probe['accuracy']:.1f} | {100 * probe['macro_f1']:.1f} | – |"]
        if "subgroup_probe" in b:
            sub = b["subgroup_probe"]
            lines.append(f"| the same probe fitted on the {sub['classes']} subgroups, answering the group whose "
                         f"subgroups sum highest (L2 {sub['l2']:g}) | image | {100 * sub['accuracy']:.1f} | "
                         f"{100 * sub['macro_f1']:.1f} | – |")
        if "image_text_probe" in b:
            both = b["image_text_probe"]
            lines.append(f"| the same probe on the image features beside the caption's frozen text embedding "
                         f"({both['text_features']}; L2 {both['l2']:g}) | image and text | "
                         f"{100 * both['accuracy']:.1f} | {100 * both['macro_f1']:.1f} | – |")
        if "text_probe" in b:
            name = b["text_probe"]
            lines.append(f"| the same probe on the caption's embedding alone (L2 {name['l2']:g}) | text | "
                         f"{100 * name['accuracy']:.1f} | {100 * name['macro_f1']:.1f} | – |")
        lines += ["",
                  f"The family split gives test other group shares than train: {mc['label']} is "
                  f"{100 * mc['train_share']:.1f}% of train but {100 * mc['accuracy']:.1f}% of test, whose largest "
                  f"group is {mc['test_majority_label']} ({100 * mc['test_majority_share']:.1f}%)."]
    chains = [(a, next((s for s in runs if s["recipe"] == a["recipe"] and not s.get("chain_from")), None))
              for a in runs if a.get("chain_from")]
    chains = [(a, s) for a, s in chains if s is not None]
    if chains:
        lines += ["", "| stage chain | test metric | with init_from | from scratch | seeds |", "|---|---|---|---|---|"]
        for a, s in chains:
            key = f"test_{primary(a['task'])}"
            lines.append(f"| {_label(a)} | {key[5:]} | {pct(a['metrics'], key)} | {pct(s['metrics'], key)} | "
                         f"{seeds(a)} / {seeds(s)} |")
    if runs:
        lines += ["", "| recipe | trainable params | share | bundle bytes | train loop | whole run | seeds |",
                  "|---|---|---|---|---|---|---|"]
        for a in runs:
            m = a["metrics"]
            mark = "" if a["wall_measured"] else " *"
            lines.append(f"| {_label(a)} | {m['trainable_params']['mean']:,.0f} | "
                         f"{100 * m['trainable_share']['mean']:.3f}% | {m['adapter_bytes']['mean']:,.0f} | "
                         f"{pct(m, 'train_seconds', 1, 0)} s | {pct(m, 'wall_seconds', 1, 0)} s{mark} | {seeds(a)} |")
        if not all(a["wall_measured"] for a in runs):
            lines.append("\n\\* trained outside bench/emoji_tasks.py: no whole-run time was measured, the train "
                         "loop's time stands in.")
    else:
        lines += ["", "No recipe runs collected yet: `bench/emoji_tasks.py` adds their rows."]
    return "\n".join(lines)
