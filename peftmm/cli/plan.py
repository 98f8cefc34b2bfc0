"""``peftmm plan``: will a recipe's training fit a card? Estimated without loading weights."""

from __future__ import annotations

import json

import click

from . import friendly


class _Size(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        from ..errors import PeftmmError
        from ..plan import parse_size

        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except PeftmmError as e:
            self.fail(e.message, param, ctx)


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--gpu-mem", "budget", type=_Size(), default="8GiB", show_default=True,
              help="Memory to fit in: 8GiB, 12GB, 24576MiB ... (with --device cpu: the RAM to spare).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set train.batch_size=32 (repeatable).")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="Where training would run: cuda adds the CUDA context and allocator overhead, "
                   "cpu this process's baseline.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
@friendly
def plan(recipe, budget, overrides, device, as_json):
    """Estimate the peak memory of training a RECIPE, without loading any weights: the parts, the
    total, which cards it fits, and what to turn when it does not fit --gpu-mem."""
    from ..plan import Planner
    from ..recipe import load

    planner = Planner(load(recipe, list(overrides)))
    estimate = planner.estimate(device=device)
    suggestions = [] if estimate.fits(budget) else planner.suggestions(estimate, budget)
    if as_json:
        click.echo(json.dumps({**estimate.to_dict(), "budget": budget, "fits": estimate.fits(budget),
                               "cards": {f"{gib} GiB": fits for gib, fits in estimate.cards().items()},
                               "suggestions": [{"knob": s.knob, "set": s.overrides, "total": s.estimate.total,
                                                "fits": s.estimate.fits(budget)} for s in suggestions]}, indent=2))
        return
    click.echo(render(estimate, budget, suggestions))


def render(estimate, budget: int, suggestions) -> str:
    from ..io import format_size
    from ..plan import GiB

    mixed = estimate.details.get("mixed_precision", "no")
    where = {"cuda": "a CUDA card", "cpu": "CPU"}[estimate.device] + (f" ({mixed} autocast)" if mixed != "no" else "")
    lines = [f"{estimate.recipe}: estimated peak training memory on {where}", "",
             "| part | memory | |", "|---|---:|---|"]
    lines += [f"| {p.name} | {format_size(p.bytes)} | {p.note} |" for p in estimate.parts]
    lines += [f"| **total** | **{format_size(estimate.total)}** | |", ""]
    spare = budget - estimate.total
    lines.append(f"fits {format_size(budget)}: yes, {format_size(spare)} to spare" if spare >= 0 else
                 f"does not fit {format_size(budget)}: {format_size(-spare)} over")
    lines += ["", "| card | fits | headroom |", "|---|---|---:|"]
    lines += [f"| {gib} GiB | {'yes' if fits else 'no'} | {format_size(gib * GiB - estimate.total)} |"
              for gib, fits in estimate.cards().items()]
    d = estimate.details
    lines += ["", f"assumed: training batches of up to {d['train_batch']['rows']} rows with "
                  f"{d['train_batch']['images']} distinct images and {d['train_batch']['texts']} distinct texts "
                  f"(longest {d['longest_text_tokens']} tokens); cached: {', '.join(d['cached']) or 'nothing'}; "
                  f"checkpointed: {', '.join(d['checkpointed']) or 'nothing'}"]
    if d.get("offline"):
        lines += [f"planned without the hub: configs from peftmm/hub_configs for "
                  f"{', '.join(sorted(set(d['offline'].values())))}; token counts approximated (they err long)"]
    if spare < 0:
        lines += ["", "What to turn (each alone, with the estimate after turning it):" if suggestions else
                  "No knob lowers this estimate; a larger card is needed."]
        for i, s in enumerate(suggestions, 1):
            verdict = "fits" if s.estimate.fits(budget) else "still over"
            lines.append(f"  {i}. {s.knob}: {format_size(s.estimate.total)} ({verdict})")
            lines.append(f"     {' '.join('--set ' + o for o in s.overrides)}")
        if suggestions and not any(s.estimate.fits(budget) for s in suggestions):
            lines.append("  None fits alone; combine them (the --set options add up), or use a larger card.")
    return "\n".join(lines)


COMMANDS = [plan]
