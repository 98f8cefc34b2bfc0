"""User-facing errors.

Every mistake a user can make (a bad recipe value, a missing image, a bundle for another
backbone) is raised as a :class:`PeftmmError`. The CLI prints these as one line, without a
traceback unless ``--debug``; anything else is a bug in peftmm and keeps its traceback.
"""

from __future__ import annotations


class PeftmmError(Exception):
    """An error caused by input, reported as ``where: what`` on one line.

    ``kind`` says what sort of mistake it is, for callers that answer by kind (the HTTP API
    maps ``not_found`` to 404 and ``conflict`` to 409): ``invalid``, ``not_found`` or ``conflict``.
    """

    def __init__(self, message: str, where: str | None = None, kind: str = "invalid"):
        self.message = message
        self.where = where
        self.kind = kind
        super().__init__(f"{where}: {message}" if where else message)


class RecipeError(PeftmmError):
    """A recipe (file, dict or --set override) that does not validate."""


class BundleError(PeftmmError):
    """An adapter bundle that is missing, corrupt, or built for other backbones."""


class MergeError(BundleError):
    """Adapters that cannot be combined (``peftmm merge``, a runtime mix): options out of range,
    or sources that do not agree (backbones, methods, labels, fusion, tensors)."""


class DataError(PeftmmError):
    """A data set or image that cannot be read."""


class ImageTooLarge(DataError):
    """An image over the pixel limit, refused before decoding (the server answers 413)."""
