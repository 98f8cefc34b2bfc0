"""Full fine-tuning of a tower: the reference every parameter-efficient method is measured against."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import PeftmmError
from . import METHODS
from .base import Method


@METHODS.register("full")
class FullFineTuning(Method):
    @dataclass
    class Config:
        # Pretrained weights want a far smaller step than freshly initialised fusion and heads.
        lr: float = field(default=5e-5, metadata={"gt": 0.0, "max": 1.0})

    def learning_rate(self, parameter_name: str, lr: float) -> float:
        return self.config.lr

    def inject(self, tower) -> None:
        if tower.info.precision in ("int8", "nf4"):
            raise PeftmmError(f"{tower.name}.methods full: a {tower.info.precision} backbone cannot be "
                              "fine-tuned in full; set precision: fp32 or bf16")
        tower.model.requires_grad_(True)
        tower.peftmm_full = True  # read by Tower.train: the backbone trains like any module

    def owns(self, parameter_name: str) -> bool:
        return True
