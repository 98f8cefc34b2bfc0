"""``peftmm merge``: adapter arithmetic over bundles on the same backbone weights (merging.py)."""

from __future__ import annotations

import click

from . import friendly


def _weights(text: str | None) -> list[float] | None:
    from ..errors import MergeError

    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise MergeError(f"--weights {text!r}: give numbers separated by commas, one per bundle (e.g. 0.5,0.5)") \
            from None


@click.command("merge")
@click.argument("out", type=click.Path(file_okay=False))
@click.argument("bundles", nargs=-1, required=True)
@click.option("--weights", help="One weight per bundle, comma-separated (default: equal weights summing to 1).")
@click.option("--method", default="linear", show_default=True,
              help="How LoRA pairs combine, as peft's add_weighted_adapter: linear, ties, dare_linear, dare_ties, "
                   "or cat (side by side: exactly the weighted sum of the updates, at the summed rank).")
@click.option("--density", type=float, help="Share of each adapter's values kept, in (0, 1] (ties and dare only).")
@click.option("--seed", type=int, help="Seed of DARE's random pruning (default: torch's current random state).")
@click.option("--device", default="cpu", show_default=True, help="Where the backbones load for the merge.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@friendly
def merge(out, bundles, weights, method, density, seed, device, force):
    """Merge BUNDLES (folders, run directories or names under ./adapters) into a new bundle OUT.

    The bundles must share backbone weights, task, labels, methods and fusion; LoRA combines with
    peft's semantics, every other tensor is the weighted sum. OUT is an ordinary bundle whose
    config and card record the sources, weights and method."""
    from ..bundle import bundle_summary
    from ..merging import merge as run
    from .bundles import format_summary

    path = run(out, list(bundles), _weights(weights), method, density, seed, device=device, overwrite=force)
    click.echo(f"merged {len(bundles)} bundles ({method}) -> {path}")
    click.echo(format_summary(bundle_summary(path)))


COMMANDS = [merge]
