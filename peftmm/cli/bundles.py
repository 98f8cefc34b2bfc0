"""Bundle commands: publish a run's bundle under a name, inspect one, list a folder of them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from ..io import format_size
from . import friendly


def _setting(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _method(method: dict, short: bool = False) -> str:
    settings = {k: v for k, v in method.items() if k not in ("type", "default_targets")}
    if method.get("default_targets"):
        settings["targets"] = f"{_setting(settings['targets'])} (architecture default)"
    if short:  # the settings that tell methods apart at a glance
        settings = {k: v for k, v in settings.items() if k in ("r", "bottleneck", "length", "placement")}
        return f"{method['type']}({','.join(f'{k}={v}' for k, v in settings.items())})" if settings \
            else str(method["type"])
    return " ".join([str(method["type"]), *(f"{k}={_setting(v)}" for k, v in settings.items())])


def _metric(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def primary_metric(summary: dict) -> tuple[str, object] | None:
    """The test score that ranks bundles of this task (``test_accuracy`` for vqa), if measured."""
    metrics = summary.get("metrics") or {}
    from ..tasks import TASKS

    if summary["task"] in TASKS.names():
        key = f"test_{TASKS.get(summary['task']).primary_metric}"
    else:  # a task this peftmm does not know: take the first test score
        key = next((k for k in metrics if k.startswith("test_") and not k.endswith("_loss")), None)
    return (key, metrics[key]) if key in metrics else None


def format_summary(summary: dict) -> str:
    """``bundle_summary`` as text: what a person checks before using or sharing a bundle."""
    lines = [f"{summary['name']}  ({summary['task']}, {summary['labels']} labels; bundle format "
             f"{summary['format_version']}, peftmm {summary['peftmm_version']})",
             f"  path: {summary['path']}"]
    for tower, info in summary["towers"].items():
        lines.append(f"  {tower}: {info['backbone']}  ({info['model_type']}, {info['precision']})")
        lines.append(f"    fingerprint: {info['fingerprint']}")
        methods = info["methods"] or [{"type": "frozen"}]
        lines += [f"    method: {_method(m)}" for m in methods]
        lines.append(f"    trainable parameters: {info['trainable_params']:,}")
    fusion = {k: v for k, v in summary["fusion"].items() if k != "trainable_params"}
    lines.append(f"  fusion: {_method(fusion)}  ({summary['fusion']['trainable_params']:,} parameters)")
    head = " ".join(f"{k}={v}" for k, v in summary["head"].items() if k != "trainable_params")
    lines.append(f"  head: {head}  ({summary['head']['trainable_params']:,} parameters)")
    lines.append(f"  trainable parameters: {summary['trainable_params']:,} in {summary['tensors']} tensors")
    files = ", ".join(f"{name} {size:,} B" for name, size in summary["files"].items())
    lines.append(f"  files: {files}")
    lines.append(f"  total size: {summary['total_bytes']:,} B ({format_size(summary['total_bytes'])})")
    metrics = {k: v for k, v in summary["metrics"].items() if not isinstance(v, (dict, list))}
    if metrics:
        lines.append("  metrics: " + ", ".join(f"{k} {_metric(v)}" for k, v in metrics.items()))
    return "\n".join(lines)


def _run_records(run_dir: Path) -> list[dict]:
    from ..errors import PeftmmError
    from ..safe_load import load_json

    records = []
    for line in (run_dir / "metrics.jsonl").read_text(errors="replace").splitlines():
        try:
            records.append(load_json(line))
        except PeftmmError:
            continue  # a run killed mid-line: the complete lines still tell the curve
    return records


@click.command()
@click.argument("run_dir")
@click.argument("name")
@click.option("--to", "to", default="adapters", show_default=True, type=click.Path(file_okay=False),
              help="Folder to publish into; the bundle is written to TO/NAME.")
@click.option("--force", is_flag=True, help="Replace an existing TO/NAME.")
@friendly
def publish(run_dir, name, to, force):
    """Publish the bundle of RUN_DIR (a run directory or a bundle) as TO/NAME, checked and renamed."""
    from ..bundle import (
        CARD,
        CONFIG,
        check_adapter_name,
        load_bundle,
        read_config,
        read_tensors,
        resolve_bundle,
        save_bundle,
    )
    from ..card import curve_summary, model_card
    from ..errors import BundleError
    from ..io import atomic_directory
    from ..recipe import from_dict

    root = Path(to)
    check_adapter_name(name)
    target = root / name
    if target.resolve().parent != root.resolve():
        raise BundleError(f"bundle name {name!r} resolves outside {root}", str(target))
    source = resolve_bundle(run_dir)
    if target.exists() and target.resolve() == source.resolve():
        raise BundleError("this is the bundle being published; publish under another name or folder",
                          str(target))
    if (target.exists() or target.is_symlink()) and not force:
        raise BundleError("already exists; use --force to replace it", str(target))

    # Validate the source completely: config, header, checksum, and a rebuild on its backbones.
    read_config(source)
    tensors = read_tensors(source)
    model, _, config = load_bundle(source)
    data = json.loads(json.dumps(config["recipe"]))
    data["name"] = name
    recipe = from_dict(data, source=str(source / CONFIG))
    training = None
    parent = source.parent
    if source.name == "bundle" and (parent / "metrics.jsonl").is_file():
        training = curve_summary(_run_records(parent), model.task.primary_metric)

    with atomic_directory(target, overwrite=force) as tmp:
        # Re-saved through the library, not copied: the new name changes the config, and its
        # sha256 is stored in the weights' header.
        stage = save_bundle(model, recipe, tmp / "stage", metrics=config.get("metrics", {}),
                            precision=config.get("precision"))
        for item in stage.iterdir():
            os.replace(item, tmp / item.name)
        stage.rmdir()
        published = read_config(tmp)
        written = read_tensors(tmp)
        changed = sorted(k for k in set(tensors) | set(written)
                         if k not in tensors or k not in written or tensors[k].shape != written[k].shape
                         or not written[k].to(tensors[k].dtype).equal(tensors[k]))
        if changed or published["name"] != name:
            raise BundleError(f"re-saving changed the adapter ({', '.join(changed[:3]) or 'name'}); "
                              "nothing was published", str(source))
        load_bundle(tmp)  # the published copy rebuilds on its backbones
        if training:
            (tmp / CARD).write_text(model_card(published, written, training=training))

    from ..bundle import bundle_summary

    click.echo(f"published {source} -> {target}")
    click.echo(format_summary(bundle_summary(target)))


@click.command()
@click.argument("bundle")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@friendly
def inspect(bundle, as_json):
    """Summarise a BUNDLE (folder, run directory or name under ./adapters) without loading backbones."""
    from ..bundle import bundle_summary, resolve_bundle

    summary = bundle_summary(resolve_bundle(bundle))
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


def _foreign(config: Path) -> bool:
    """A readable JSON config that is not peftmm's: a peft adapter folder, say."""
    from ..errors import PeftmmError
    from ..safe_load import load_json

    try:
        data = load_json(config.read_bytes(), str(config))
    except (OSError, PeftmmError):
        return False  # missing or broken: listed with its error
    return isinstance(data, dict) and "format" not in data


@click.command("list")
@click.argument("folder", default="adapters", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per bundle, as a list.")
@friendly
def list_bundles(folder, as_json):
    """List the bundles in FOLDER (default ./adapters), one line each; broken ones show their error."""
    from ..bundle import CONFIG, WEIGHTS, bundle_summary
    from ..errors import BundleError, PeftmmError

    root = Path(folder)
    if not root.is_dir():
        raise BundleError("no such folder", str(root))
    entries = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue  # hidden: an atomic write in progress, or not ours
        if not ((path / CONFIG).exists() or (path / WEIGHTS).exists()) or _foreign(path / CONFIG):
            continue  # not a bundle (or another library's adapter, such as a peft export)
        try:
            entries.append(bundle_summary(path))
        except (PeftmmError, OSError, ValueError, RecursionError) as e:  # one broken bundle: its line, then on
            entries.append({"path": str(path), "name": path.name, "error": str(getattr(e, "message", e))})
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    if not entries:
        click.echo(f"no bundles in {root}")
        return
    rows = []
    for entry in entries:
        if "error" in entry:
            rows.append([entry["name"], "error: " + entry["error"]])
            continue
        methods = " ".join(f"{tower}=" + ("+".join(_method(m, short=True) for m in info["methods"]) or "frozen")
                           for tower, info in entry["towers"].items())
        metric = primary_metric(entry)
        rows.append([entry["name"], entry["task"], methods, f"{entry['trainable_params']:,} params",
                     format_size(entry["total_bytes"]), f"{metric[0]} {_metric(metric[1])}" if metric else "-"])
    widths = [max(len(r[i]) for r in rows if len(r) > 2 and i < len(r)) if any(len(r) > 2 for r in rows) else 0
              for i in range(6)]
    widths[0] = max(len(r[0]) for r in rows)
    for row in rows:
        click.echo("  ".join(cell.ljust(widths[i]) if i < len(row) - 1 else cell for i, cell in enumerate(row)))


COMMANDS = [publish, inspect, list_bundles]
