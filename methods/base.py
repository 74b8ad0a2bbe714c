"""What a training method supplies to train.py's one loop.

A method is an ``nn.Module`` holding every network it trains or keeps (the student, an EMA teacher,
a second network), so that ``method.state_dict()`` is everything a resumed run needs and one DDP
wrapper of the method covers them all. Its ``forward(images, masks, weight)`` is one batch's
objective: ``images`` holds ``len(masks)`` labeled images first, then the unlabeled ones; ``weight``
is the unsupervised weight of this step (a device tensor, from ``consistency_weight(step)``). It
returns the named losses, UniMatch style: ``loss`` (the total, one formula) first, then ``loss_x``
(the labeled images' part) and ``loss_u`` (the unlabeled images' part, before its weight), which the
loop logs as train_sup and train_cons, then any finer parts.
"""
from __future__ import annotations

import torch
from torch import nn

from utils.schedule import consistency_weight


class Method(nn.Module):
    name = ""
    uses_unlabeled = True
    reference = ""  # the reference implementation's file, for docs/methods.md's table and the run summary

    def __init__(self, student: nn.Module, consistency: float = 0.0, rampup: float = 200.0, ramp_every: int = 150,
                 consistency_start: int = 0):
        super().__init__()
        self.student = student
        self.consistency, self.rampup, self.ramp_every = consistency, rampup, ramp_every
        self.consistency_start = consistency_start

    @property
    def evaluated(self) -> nn.Module:
        """The network that is evaluated, selected and written as a checkpoint's ``model``."""
        return self.student

    def consistency_weight(self, step: int) -> float:
        """lambda(step) = consistency * exp(-5 (1 - t/rampup)^2), t = step // ramp_every (Laine & Aila);
        0 before consistency_start."""
        if step < self.consistency_start:
            return 0.0
        return consistency_weight(step, self.consistency, self.rampup, self.ramp_every)

    def kept_networks(self) -> nn.ModuleDict | None:
        """The networks it keeps besides the student (mean-teacher's teacher, cps's second network), for
        checkpoints (keys ``teacher.*``, ``second.*``); None when there are none."""
        kept = {name: m for name, m in self.named_children() if name != "student" and m.state_dict()}
        return nn.ModuleDict(kept) if kept else None

    def leaves_parameters_unused(self) -> bool:
        """True when some trainable parameter gets no gradient (DDP's find_unused_parameters)."""
        return False

    def before_step(self, step: int) -> None:
        """Called before iteration ``step`` (0-based), outside the (compiled, DDP-wrapped) forward: a phase switch."""

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Called after the optimizer step of iteration ``step`` (0-based): EMA updates."""

    def forward(self, images: torch.Tensor, masks: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def has_unused_decoders(network: nn.Module) -> bool:
    """MGCCNet always holds its three auxiliary decoders; methods that use its main path only leave them idle."""
    return len(getattr(network, "aux_decoders", ())) > 0
