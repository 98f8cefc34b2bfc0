"""Image augmentation for training a vision tower that has injected modules.

With a few thousand images, adapters or LoRA in the vision tower memorise the training pictures
within a few epochs (on emoji, training loss 0.1 against validation loss 3.4). A random zoom,
shift and small rotation of every training image shows the modules a slightly different picture
each epoch. It runs on the batch of normalised pixels, one affine warp per image on the device
the batch lives on, so there is no per-image Python image code and nothing to install.

Recipe: ``vision: {augment: {crop_scale: 0.6, rotate: 10}}``. There is deliberately no colour
jitter and no flip: colours and directions are part of what captions name ("red heart",
"left arrow"). Augmentation acts only in training and only where pixels pass through the tower:
a frozen tower's cached features (``cache_features``) are computed once and never augmented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F


@dataclass
class AugmentSpec:
    # Smallest share of the image area a random crop keeps (1.0: no zoom).
    crop_scale: float = field(default=1.0, metadata={"gt": 0.0, "max": 1.0})
    # Largest rotation either way, in degrees (0: none).
    rotate: float = field(default=0.0, metadata={"min": 0.0, "max": 180.0})

    @property
    def active(self) -> bool:
        return self.crop_scale < 1.0 or self.rotate > 0.0


def augment_pixels(pixels: torch.Tensor, spec: AugmentSpec, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """A random crop (area share in [crop_scale, 1], aspect kept) at a random position inside
    the image, rotated by up to ``rotate`` degrees, resampled back to the input size."""
    if not spec.active:
        return pixels
    n = pixels.shape[0]
    rand = torch.rand(n, 3, generator=generator).to(pixels.device, torch.float32)
    side = torch.sqrt(spec.crop_scale + (1.0 - spec.crop_scale) * rand[:, 0])   # crop side / image side
    # A crop of side s can move by up to 1 - s (in grid units, where the image spans [-1, 1]).
    shift = (1.0 - side).unsqueeze(1) * (2.0 * rand[:, 1:3] - 1.0)
    angle = math.radians(spec.rotate) * (2.0 * torch.rand(n, generator=generator) - 1.0).to(pixels.device)
    cos, sin = torch.cos(angle) * side, torch.sin(angle) * side
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    # "border" repeats the edge pixels into corners a rotation uncovers: for drawn images on a
    # plain background that is the background colour, not black.
    warped = F.grid_sample(pixels.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return warped.to(pixels.dtype)
