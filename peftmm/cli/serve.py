"""Serving command: serve (an HTTP JSON API and a web page over the multi-adapter runtime)."""

from __future__ import annotations

import click

from . import friendly


@click.command()
@click.option("--adapters", "adapters_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of adapter bundles: each bundle folder in it is served under its folder name; "
                   "more can be loaded at run time (POST /api/adapters), only from inside it.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--allow-image-dir", "image_dirs", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Let requests name image files (image_path) under this folder (repeatable; none by default).")
@click.option("--max-image-mb", type=click.FloatRange(0, min_open=True), default=10, show_default=True,
              help="Largest image a request may send.")
@click.option("--max-image-mp", type=click.FloatRange(0, min_open=True), default=None,
              help="Most megapixels an image may decode to; larger ones get 413 before decoding "
                   "[default: PEFTMM_MAX_IMAGE_PIXELS, else 40].")
@click.option("--decode-budget-mp", type=click.FloatRange(0, min_open=True), default=None,
              help="Decoded megapixels held at once across requests; more wait their turn [default: twice "
                   "--max-image-mp].")
@click.option("--max-batch", type=click.IntRange(1), default=16, show_default=True,
              help="Most requests answered in one batch.")
@click.option("--batch-wait-ms", type=click.FloatRange(0), default=5, show_default=True,
              help="How long a batch waits for more requests to join it.")
@click.option("--device", help="Device to run on (default: cuda when available, else cpu).")
@friendly
def serve(adapters_dir, host, port, image_dirs, max_image_mb, max_image_mp, decode_budget_mp, max_batch,
          batch_wait_ms, device):
    """Serve the adapter bundles in a folder over HTTP: a JSON API under /api and a web page at /."""
    import uvicorn

    from ..images import set_pixel_limit
    from ..runtime import Runtime
    from ..serve import create_app, register_all

    if max_image_mp is not None:
        set_pixel_limit(int(max_image_mp * 1e6))
    runtime = Runtime(device=device, root=adapters_dir)
    loaded = register_all(runtime, report=lambda message: click.echo(message, err=True))
    app = create_app(runtime, allowed_image_dirs=image_dirs, max_image_bytes=int(max_image_mb * 2**20),
                     max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                     decode_budget_pixels=int(decode_budget_mp * 1e6) if decode_budget_mp else None)
    click.echo(f"serving {len(loaded)} adapter(s) from {runtime.root} on {runtime.device}: "
               f"{', '.join(loaded) or 'none yet'}")
    for backbone in runtime.backbones():
        click.echo(f"  {backbone['tower']} backbone {backbone['source']} ({backbone['precision']}): "
                   f"{', '.join(backbone['adapters'])}")
    if image_dirs:
        click.echo("image files readable from: " + ", ".join(image_dirs))
    click.echo(f"page: http://{host}:{port}/   API: http://{host}:{port}/api/adapters")
    uvicorn.run(app, host=host, port=port, log_level="info")


COMMANDS = [serve]
