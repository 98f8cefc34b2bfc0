"""A backbone as the planner sees it: its files, config and processor, and an empty model.

``peftmm plan`` builds each tower on the meta device (every module and shape, no memory) from
what :func:`peftmm.backbones.read_backbone` reads, or, for a hub id while the hub cannot be
reached, from peftmm/hub_configs' copy of its config (``offline``: the plan says so).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .backbones import DTYPES, BackboneFiles, read_backbone


@dataclass
class Blueprint(BackboneFiles):
    offline: bool = False   # built from peftmm/hub_configs' copy, the hub being out of reach

    def empty_model(self, precision: str = "fp32") -> nn.Module:
        """The model on the meta device: every module and shape, no memory."""
        make = getattr(self.cls, "from_config", None) or self.cls._from_config
        with torch.device("meta"):
            return make(self.tower_config, dtype=DTYPES[precision])


def blueprint(name: str, source: str, *, image_size: int | None = None, causal_lm: bool = False) -> Blueprint:
    """Resolve a backbone (zoo name, folder or hub id) and read its config and processor only."""
    files = read_backbone(name, source, image_size=image_size, causal_lm=causal_lm)
    return Blueprint(files.folder, files.cls, files.config, files.tower_config, files.layout, files.processor)
