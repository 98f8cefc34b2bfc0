"""The ``peftmm`` command line: a thin layer over the Python API, one module per group of commands.

Each command module defines click commands decorated with :func:`friendly`; they are attached
to :data:`main` here, so ``peftmm --help`` lists them all.
"""

from __future__ import annotations

import os
import sys
from functools import wraps

import click

from ..errors import PeftmmError


def friendly(fn):
    """Input errors print as one line (exit 2); ``--debug`` shows the traceback."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        try:
            return fn(*args, **kwargs)
        except PeftmmError as e:
            if ctx.find_root().params.get("debug"):
                raise
            from ..distributed import hand_error_to_launcher

            if not hand_error_to_launcher(str(e)):
                click.echo(f"error: {e}", err=True)
            sys.exit(2)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.option("--offline", is_flag=True,
              help="Never contact the Hugging Face Hub (as HF_HUB_OFFLINE=1): hub ids load from the local cache only.")
@click.version_option(package_name="peftmm")
def main(debug, offline):
    """Parameter-efficient fine-tuning for multimodal (image + text) models."""
    if offline:   # read by peftmm.backbones.hub_allowed, and by huggingface_hub when it is imported later
        os.environ["HF_HUB_OFFLINE"] = "1"


from . import bundles, chat, hub, interop, merge, plan, serve, training  # noqa: E402  (each module's commands, attached below)

for _module in (training, chat, bundles, merge, hub, interop, serve, plan):
    for _command in _module.COMMANDS:
        main.add_command(_command)
