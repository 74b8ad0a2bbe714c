"""Cross-Consistency Training (Ouali et al., 2020), as SSL4MIS ``code/train_cross_consistency_training_2D.py``.

Reference (networks/unet.py, UNet_CCT): three auxiliary decoders, each on the encoder's features
perturbed at the encoder output only, every level alike: aux 1 uniform feature noise (+-0.3,
multiplicative), aux 2 dropout 0.3, aux 3 feature dropout (channel-mean attention >= U(0.7, 0.9) x
max dropped). Supervised: mean over the four decoders of 0.5 (CE + Dice); consistency: mean over the
auxiliary decoders of MSE(main probabilities, aux probabilities), gradients into both; weight 0.1
ramped up (sigmoid) over 200 ramp steps of 150 iterations.

On the mgcc network "the encoder output" is the main decoder's input, after the three ConvMixer
stages, so mgcc versus cct on that network is MGCC's multi-level ablation. The perturbations are
networks/perturbations.py's, the same as the reference's.
"""
from __future__ import annotations

from networks.perturbations import AlwaysOnDropout, FeatureDropout, FeatureNoise
from torch import nn
import torch

from .losses import consistency_loss

from .base import Method
from .losses import reference_supervised_loss

AUX_DECODERS = 3


class CrossConsistency(Method):
    name = "cct"
    reference = "SSL4MIS code/train_cross_consistency_training_2D.py"

    def __init__(self, student, consistency: float = 0.1, rampup: float = 200.0, ramp_every: int = 150,
                 consistency_start: int = 0):
        if len(getattr(student, "aux_decoders", ())) != AUX_DECODERS:
            raise ValueError(f"cct needs a network with {AUX_DECODERS} auxiliary decoders")
        super().__init__(student, consistency, rampup, ramp_every, consistency_start)
        self.perturbations = nn.ModuleList([FeatureNoise(0.3), AlwaysOnDropout(0.3), FeatureDropout(0.7, 0.9)])

    def forward(self, images, masks, weight):
        n = len(masks)
        features = self.student.features(images)
        main = self.student.main_decoder(features).float()
        aux = [decoder([perturb(f) for f in features]).float()
               for decoder, perturb in zip(self.student.aux_decoders, self.perturbations)]
        loss_x = torch.stack([reference_supervised_loss(d[:n], masks) for d in [main, *aux]]).mean()
        loss_u = consistency_loss(main[n:], [a[n:] for a in aux])
        return {"loss": loss_x + weight * loss_u, "loss_x": loss_x, "loss_u": loss_u}
