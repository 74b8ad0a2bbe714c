"""MGCC (Tang et al., arXiv 2305.09447): multi-level perturbations of the global-context bottleneck.

Official defaults (utils/losses.py): L = L_sup + lambda(t) L_cons, lambda ramping up to 7 over
200 ramp steps of 150 iterations.
"""
from __future__ import annotations

from networks.mgcc import MGCCNet
from utils.losses import consistency_loss, supervised_loss

from .base import Method


class MGCC(Method):
    name = "mgcc"
    reference = "MGCC (official) train.py; here utils/losses.py"

    def __init__(self, student, consistency: float = 7.0, rampup: float = 200.0, ramp_every: int = 150):
        if not isinstance(student, MGCCNet):
            raise ValueError("method mgcc perturbs the ConvMixer stages of the mgcc network: use --network mgcc "
                             "(cct is its single-level counterpart on either network)")
        super().__init__(student, consistency, rampup, ramp_every)

    def forward(self, images, masks, weight):
        n = len(masks)
        main, aux = self.student(images, with_aux=True)
        main, aux = main.float(), [a.float() for a in aux]
        loss_x = supervised_loss([main[:n]] + [a[:n] for a in aux], masks)  # Eq. 5-6
        loss_u = consistency_loss(main[n:], [a[n:] for a in aux])  # Eq. 7
        return {"loss": loss_x + weight * loss_u, "loss_x": loss_x, "loss_u": loss_u}  # Eq. 8
