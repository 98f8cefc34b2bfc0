"""Interoperability commands: one tower's LoRA out to vanilla peft, and a peft LoRA into a bundle."""

from __future__ import annotations

import click

from . import friendly

_TOWER = click.option("--tower", required=True, type=click.Choice(["vision", "text"]),
                      help="Which tower's LoRA.")
_FORCE = click.option("--force", is_flag=True, help="Replace OUT if it exists.")


@click.command("export-peft")
@click.argument("bundle")
@click.argument("out", type=click.Path(file_okay=False))
@_TOWER
@_FORCE
@click.option("--allow-partial", is_flag=True,
              help="Export the LoRA part even if the tower has other methods (outputs then differ).")
@click.option("--base-path", type=click.Path(file_okay=False),
              help="Name this local folder (the backbone, saved with save_pretrained) as the base model, "
                   "instead of its Hub id.")
@friendly
def export_peft(bundle, out, tower, force, allow_partial, base_path):
    """Export one tower's LoRA of a BUNDLE as a vanilla peft adapter folder OUT.

    BUNDLE is a folder, a run directory or a name under ./adapters; peft.PeftModel.from_pretrained(
    backbone, OUT) then loads the LoRA onto that tower's backbone."""
    from ..bundle import resolve_bundle
    from ..peft_interop import export_peft as run

    path = run(resolve_bundle(bundle), tower, out, overwrite=force, allow_partial=allow_partial, base_path=base_path)
    click.echo(f"wrote peft adapter {path}")


@click.command("import-peft")
@click.argument("peft_dir", type=click.Path(file_okay=False))
@click.argument("bundle")
@click.argument("out", type=click.Path(file_okay=False))
@_TOWER
@_FORCE
@friendly
def import_peft(peft_dir, bundle, out, tower, force):
    """Import a vanilla peft LoRA adapter (PEFT_DIR) into a copy of BUNDLE, written to OUT.

    The tower's LoRA is replaced (or added); the rest of BUNDLE stays. PEFT_DIR must hold
    adapter_model.safetensors (a .bin pickle is never read) for the same backbone."""
    from ..bundle import resolve_bundle
    from ..peft_interop import import_peft as run

    path = run(peft_dir, resolve_bundle(bundle), tower, out, overwrite=force)
    click.echo(f"wrote bundle {path}")


COMMANDS = [export_peft, import_peft]
