"""Hub commands: push a bundle to a Hugging Face model repository (pulling is ``hf://OWNER/NAME``
wherever a bundle is taken: bundle.resolve_bundle)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import click

from . import friendly


@click.command()
@click.argument("bundle")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository private (when it does not exist yet).")
@click.option("--revision", help="Push to this branch (created from main when missing).")
@click.option("--commit-message", help="The commit's message (default: 'peftmm push NAME').")
@friendly
def push(bundle, repo_id, private, revision, commit_message):
    """Push BUNDLE (folder, run directory or name under ./adapters) to the Hub model repository
    REPO_ID (OWNER/NAME), checked first as `publish` checks it. The token is huggingface_hub's:
    `hf auth login` or HF_TOKEN; HF_ENDPOINT picks another endpoint."""
    from ..bundle import CARD, CONFIG, WEIGHTS, config_path, load_bundle, read_config, read_tensors, resolve_bundle
    from ..card import model_card, with_front_matter
    from ..hub_bundles import check_repo_id, parse_reference
    from ..hub_bundles import push as upload

    check_repo_id(repo_id)
    if revision is not None:
        parse_reference(f"{repo_id}@{revision}")
    source = resolve_bundle(bundle)
    # as publish checks a bundle: config, header, checksum, and a rebuild on its backbones
    config = read_config(source)
    tensors = read_tensors(source)
    load_bundle(source)
    card = (source / CARD).read_text(encoding="utf-8") if (source / CARD).is_file() else model_card(config, tensors)
    with tempfile.TemporaryDirectory(prefix="peftmm-push-") as stage:
        stage = Path(stage)
        shutil.copyfile(source / WEIGHTS, stage / WEIGHTS)
        shutil.copyfile(config_path(source), stage / CONFIG)   # a format-1 bundle goes up in this layout
        (stage / CARD).write_text(with_front_matter(card, config), encoding="utf-8")
        url = upload(stage, repo_id, [WEIGHTS, CONFIG, CARD], private=private, revision=revision,
                     message=commit_message or f"peftmm push {config['name']}")
    click.echo(f"pushed {source} -> {repo_id}{'@' + revision if revision else ''}: {url}")
    click.echo(f"use it as hf://{repo_id}{'@' + revision if revision else ''}")


COMMANDS = [push]
