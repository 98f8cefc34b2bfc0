"""``peftmm serve``: an HTTP JSON API and a small web page over the multi-adapter runtime.

Needs FastAPI and uvicorn (core dependencies); importing :mod:`peftmm` itself does not load them.
"""

from .app import create_app, register_all
from .batching import MicroBatcher

__all__ = ["create_app", "register_all", "MicroBatcher"]
