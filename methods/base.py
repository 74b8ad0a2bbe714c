"""What a training method supplies to train.py's one loop.

A method is an ``nn.Module`` holding every network it trains or keeps (the student, an EMA teacher,
a second network), so that ``method.state_dict()`` is everything a resumed run needs and one DDP
wrapper of the method covers them all. Its ``forward(images, masks, weight)`` is one batch's
objective: ``images`` holds ``len(masks)`` labeled images first, then the unlabeled ones; ``weight``
is the unsupervised weight of this step (a device tensor, from ``consistency_weight(step)``). It
returns the named losses, ``loss`` (the total, one formula) first, UniMatch style.
"""
from __future__ import annotations

import torch
from torch import nn

from utils.losses import consistency_weight


class Method(nn.Module):
    name = ""
    uses_unlabeled = True
    reference = ""  # the reference implementation's file, for the README's table and the run summary

    def __init__(self, student: nn.Module, consistency: float = 0.0, rampup: float = 200.0, ramp_every: int = 150):
        super().__init__()
        self.student = student
        self.consistency, self.rampup, self.ramp_every = consistency, rampup, ramp_every

    @property
    def evaluated(self) -> nn.Module:
        """The network that is evaluated, selected and written as a checkpoint's ``model``."""
        return self.student

    def consistency_weight(self, step: int) -> float:
        """lambda(step) = consistency * exp(-5 (1 - t/rampup)^2), t = step // ramp_every (Laine & Aila)."""
        return consistency_weight(step, self.consistency, self.rampup, self.ramp_every)

    def leaves_parameters_unused(self) -> bool:
        """True when some trainable parameter gets no gradient (DDP's find_unused_parameters)."""
        return False

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Called after the optimizer step of iteration ``step`` (0-based): EMA updates."""

    def forward(self, images: torch.Tensor, masks: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def has_unused_decoders(network: nn.Module) -> bool:
    """MGCCNet always holds its three auxiliary decoders; methods that use its main path only leave them idle."""
    return len(getattr(network, "aux_decoders", ())) > 0
