"""User-facing errors.

Every mistake a user can make (a bad recipe value, a missing image, a bundle for another
backbone) is raised as a :class:`PeftmmError`. The CLI prints these as one line, without a
traceback unless ``--debug``; anything else is a bug in peftmm and keeps its traceback.
"""

from __future__ import annotations


class PeftmmError(Exception):
    """An error caused by input, reported as ``where: what`` on one line."""

    def __init__(self, message: str, where: str | None = None):
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class RecipeError(PeftmmError):
    """A recipe (file, dict or --set override) that does not validate."""


class BundleError(PeftmmError):
    """An adapter bundle that is missing, corrupt, or built for other backbones."""


class DataError(PeftmmError):
    """A data set or image that cannot be read."""
