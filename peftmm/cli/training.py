"""Training and evaluation commands: train, eval, predict."""

from __future__ import annotations

import json
import os

import click

from . import friendly


def generation_options(fn):
    """The generation settings ``predict --prompt`` and ``chat`` may override (default: the bundle's)."""
    options = [
        click.option("--max-new-tokens", type=click.IntRange(1, 1024), help="Most tokens to write."),
        click.option("--num-beams", type=click.IntRange(1, 16), help="Beam search with N beams (1: greedy)."),
        click.option("--sample/--no-sample", "do_sample", default=None, help="Sample instead of the likeliest tokens."),
        click.option("--temperature", type=click.FloatRange(0, 10, min_open=True), help="Sampling temperature."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), help="Nucleus sampling mass."),
        click.option("--seed", type=int, help="Seed for sampling (repeatable answers)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False), required=False)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set train.epochs=1 (repeatable).")
@click.option("--output", type=click.Path(file_okay=False), help="Run directory (default runs/NAME-TIME).")
@click.option("--resume", "resume", type=click.Path(file_okay=False), metavar="RUN_DIR",
              help="Continue an interrupted run from its latest checkpoint, with the recipe saved in RUN_DIR.")
@click.option("--num-processes", type=click.IntRange(1), default=1, show_default=True,
              help="Train in N processes (one per GPU; gloo on CPU), as `accelerate launch` would.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@friendly
def train(recipe, overrides, output, resume, num_processes, no_progress):
    """Train the adapters a RECIPE (YAML) describes; writes a run directory with the bundle.

    With --resume RUN_DIR, RECIPE may be left out: an interrupted run continues from its latest
    checkpoint and ends as it would have without the interruption.

    Several processes: --num-processes N, or `accelerate launch [--config_file F] -m peftmm train
    RECIPE` (DDP; FSDP and DeepSpeed configs are refused: see the README). The global batch
    stays train.batch_size."""
    from ..distributed import launched, relaunch
    from ..recipe import load
    from ..trainer import default_run_dir
    from ..trainer import train as run_training

    if resume:
        from ..checkpoint import resume_recipe

        if output and os.path.abspath(output) != os.path.abspath(resume):
            raise click.UsageError("--resume continues the run in RUN_DIR; leave out --output")
        loaded, output = resume_recipe(resume, recipe, list(overrides)), resume
    elif recipe is None:
        raise click.UsageError("missing RECIPE (or --resume RUN_DIR to continue a run)")
    else:
        loaded = load(recipe, list(overrides))
    if num_processes > 1 and not launched():   # checked here, then every process trains
        debug = ["--debug"] if click.get_current_context().find_root().params.get("debug") else []
        args = [*debug, "train", *([recipe] if recipe else []), *(x for o in overrides for x in ("--set", o)),
                *(["--resume", resume] if resume else ["--output", str(output or default_run_dir(loaded))]),
                *(["--no-progress"] if no_progress else [])]
        raise SystemExit(relaunch(num_processes, args))
    result = run_training(loaded, output, progress=not no_progress, resume=bool(resume))
    if result.main:
        click.echo(json.dumps({"run_dir": str(result.run_dir), "bundle": str(result.bundle_dir),
                               **result.metrics}, indent=2))


@click.command("eval")
@click.argument("adapter")
@click.option("--split", type=click.Choice(["val", "test"]), default="test", show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True)
@click.option("--max-samples", type=click.IntRange(1), help="Evaluate on the first N examples only.")
@click.option("--full-split", is_flag=True,
              help="The whole split, even where the recipe capped evaluation (data.max_eval_samples).")
@friendly
def evaluate(adapter, split, batch_size, max_samples, full_split):
    """Evaluate an ADAPTER bundle (folder, run directory or name under ./adapters) on a split."""
    from ..predict import evaluate_bundle

    click.echo(json.dumps(evaluate_bundle(adapter, split, batch_size, max_samples=max_samples,
                                               full_split=full_split), indent=2))


@click.command()
@click.argument("adapter")
@click.option("--image", required=True, type=click.Path(), help="Image file.")
@click.option("--question", help="Question about the image (VQA bundles).")
@click.option("--text", help="Text read with the image (image-text classification bundles; the same input as "
                             "--question).")
@click.option("--labels", help="Comma-separated class names: zero-shot classification (retrieval bundles).")
@click.option("--template", default="{}", show_default=True, help="Text made from each label ({} = the label).")
@click.option("--prompt", help="Question or instruction to answer in words (instruct bundles).")
@generation_options
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
@friendly
def predict(adapter, image, question, text, labels, template, prompt, as_json, **generation):
    """Predict for an IMAGE with an ADAPTER bundle: answer a --question, classify it with its
    --text, pick one of --labels, or answer a --prompt in words (instruct bundles)."""
    from ..predict import Predictor, check_template

    if sum(x is not None for x in (question, text, prompt)) > 1:
        raise click.UsageError("--question, --text and --prompt are the same input: give one")
    if prompt is not None and labels is not None:
        raise click.UsageError("--labels ranks labels; --prompt asks for a written answer: give one")
    given = "text" if text is not None else "prompt" if prompt is not None else "question"   # echoed back as given
    question = next((x for x in (question, text, prompt) if x is not None), None)
    if labels is not None:
        check_template(template)   # before any backbone loads
    predictor = Predictor.load(adapter)
    if labels is not None:
        result = predictor.classify(image, labels.split(","), template)
    elif prompt is not None:
        reply = predictor.generate([{"role": "user", "content": prompt}], image, **generation)
        result = {"answer": reply.pop("text"), "generation": reply}   # token counts, finish reason: --json
    else:
        result = predictor.predict(image, question)
    if as_json:
        click.echo(json.dumps({"image": image, given: question, **result}, indent=2))
        return
    click.echo(f"image: {image}")
    if question:
        click.echo(f"{given}: {question}")
    for key, value in result.items():
        if key not in ("scores", "generation"):
            click.echo(f"{key}: {value}")
    for item in result.get("scores", []):
        click.echo(f"  {item['score']:.4f}  {item['answer']}")


COMMANDS = [train, evaluate, predict]
