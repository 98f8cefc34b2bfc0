"""Chat command: a multi-turn conversation about an image with an instruct bundle, in the terminal."""

from __future__ import annotations

import click

from . import friendly
from .training import generation_options

HELP = "commands: /image PATH (attach an image), /reset (start over), /help; end with EOF (Ctrl-D)"


@click.command()
@click.argument("adapter")
@click.option("--image", type=click.Path(), help="Image to talk about (or attach one later with /image PATH).")
@click.option("--system", help="System prompt for the conversation (default: the bundle's).")
@generation_options
@friendly
def chat(adapter, image, system, **generation):
    """Talk with an instruct ADAPTER bundle about an image: one line per turn from stdin.

    /image PATH attaches an image at any turn (it goes into that turn; a conversation holds one
    image, so a second one starts a new conversation), /reset starts over, EOF ends."""
    from ..errors import PeftmmError
    from ..images import load_image
    from ..predict import Predictor

    predictor = Predictor.load(adapter)
    predictor.generate_batch([], **generation)   # refuses a bundle that does not converse, before any input
    conversation = _Conversation(system)
    if image is not None:
        conversation.attach(image, load_image(image))
    click.echo(HELP, err=True)
    stdin = click.get_text_stream("stdin")
    for line in stdin:
        line = line.strip()
        if not line:
            continue
        if line in ("/reset", "/help") or line.startswith("/image"):
            conversation.command(line, load_image)
            continue
        if conversation.image is None:
            click.echo("no image yet: attach one with /image PATH", err=True)
            continue
        conversation.ask(line)
        try:
            reply = predictor.generate(conversation.messages, conversation.image, **generation)
        except PeftmmError as e:   # one bad turn (too long, say) is taken back; the conversation goes on
            conversation.messages.pop()
            click.echo(f"error: {e}", err=True)
            continue
        conversation.messages.append({"role": "assistant", "content": reply["text"]})
        click.echo(f"assistant: {reply['text']}")


class _Conversation:
    """The messages so far and the image they are about."""

    def __init__(self, system: str | None):
        self.system, self.image, self.path, self.pending = system, None, None, False
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def attach(self, path: str, image) -> None:
        if self.image is not None:   # one image per conversation
            self.reset()
        self.image, self.path, self.pending = image, path, True

    def ask(self, text: str) -> None:
        """The user's turn; the image just attached goes at its start."""
        self.messages.append({"role": "user", "content": ("<image>\n" if self.pending else "") + text})
        self.pending = False

    def command(self, line: str, load_image) -> None:
        from ..errors import PeftmmError

        if line == "/help":
            click.echo(HELP, err=True)
        elif line == "/reset":
            self.reset()
            if self.image is not None:
                self.pending = True
            click.echo("(conversation reset)", err=True)
        else:
            path = line[len("/image"):].strip()
            if not path:
                click.echo("usage: /image PATH", err=True)
                return
            try:
                image = load_image(path)
            except PeftmmError as e:
                click.echo(f"error: {e}", err=True)
                return
            started = self.image is not None
            self.attach(path, image)
            click.echo(f"(image {path} attached" + ("; new conversation)" if started else ")"), err=True)


COMMANDS = [chat]
