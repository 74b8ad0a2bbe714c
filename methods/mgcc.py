"""MGCC (Tang et al., arXiv 2305.09447): multi-level perturbations of the global-context bottleneck.

Official defaults (methods/losses.py): L = L_sup + lambda(t) L_cons, lambda ramping up to 7 over
200 ramp steps of 150 iterations.
"""
from __future__ import annotations

from networks.mgcc import MGCCNet
from .losses import mgcc_losses

from .base import Method


class MGCC(Method):
    name = "mgcc"
    reference = "MGCC (official) train.py; here methods/losses.py"

    def __init__(self, student, consistency: float = 7.0, rampup: float = 200.0, ramp_every: int = 150,
                 consistency_start: int = 0):
        if not isinstance(student, MGCCNet):
            raise ValueError("method mgcc perturbs the ConvMixer stages of the mgcc network: use --network mgcc "
                             "(cct is its single-level counterpart on either network)")
        super().__init__(student, consistency, rampup, ramp_every, consistency_start)

    def forward(self, images, masks, weight):
        loss, loss_x, loss_u = mgcc_losses(self.student, images, masks, weight)  # Eq. 5-8
        return {"loss": loss, "loss_x": loss_x, "loss_u": loss_u}
