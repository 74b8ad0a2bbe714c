"""UniMatch (Yang et al., CVPR 2023), as ``more-scenarios/medical/unimatch.py`` of its repository.

FixMatch (methods/fixmatch.py) with two strong views, each with its own CutMix box, and a
feature-perturbation stream: the decoder also sees the encoder features of the labeled and weak
images under channel dropout (nn.Dropout2d(0.5), every level), in the same batch as the clean ones
(so BatchNorm sees both). Defaults of ``configs/acdc.yaml``: conf_thresh 0.95.

    loss = (loss_x + loss_u) / 2,   loss_u = 0.25 loss_u_s1 + 0.25 loss_u_s2 + 0.5 loss_u_w_fp

loss_u_w_fp is the Dice of the perturbed weak prediction against the weak pseudo-labels, ignoring
pixels below conf_thresh. Mapped to this binary output as methods/fixmatch.py says. On the mgcc
network the features are the main decoder's input, after the ConvMixer stages.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .fixmatch import FixMatch
from .losses import hard_label_and_confidence, reference_supervised_loss, two_class_dice_loss

FEATURE_DROPOUT = 0.5  # nn.Dropout2d(0.5) in UniMatch's medical model/unet.py


class UniMatch(FixMatch):
    name = "unimatch"
    reference = "UniMatch more-scenarios/medical/unimatch.py"
    strong_views = 2

    def clean_and_perturbed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The main decoder on the clean features and on their Dropout2d copies, in one batch."""
        features = self.student.features(images)
        both = [torch.cat([f, F.dropout2d(f, FEATURE_DROPOUT, training=True)]) for f in features]
        return self.student.main_decoder(both).float().chunk(2)

    def forward(self, images, masks, weight):
        n = len(masks)
        weak = images[n:]
        label_mix, confidence_mix = self.mix_targets(weak)
        (strong_1, box_1), (strong_2, box_2) = self.strong_views_with_boxes(weak)
        preds, preds_fp = self.clean_and_perturbed(images)
        pred_x, pred_w = preds.split([n, len(weak)])
        pred_w_fp = preds_fp[n:]
        pred_s1, pred_s2 = self.student(torch.cat([strong_1, strong_2])).float().chunk(2)
        label, confidence = hard_label_and_confidence(pred_w.detach())
        loss_x = reference_supervised_loss(pred_x, masks)
        loss_u_s1 = self.pseudo_loss(pred_s1, label, confidence, label_mix, confidence_mix, box_1)
        loss_u_s2 = self.pseudo_loss(pred_s2, label, confidence, label_mix, confidence_mix, box_2)
        loss_u_w_fp = two_class_dice_loss(torch.sigmoid(pred_w_fp), label, ignore=confidence < self.conf_thresh)
        loss_u = 0.25 * loss_u_s1 + 0.25 * loss_u_s2 + 0.5 * loss_u_w_fp
        mask_ratio = (confidence >= self.conf_thresh).float().mean()
        return {"loss": (loss_x + loss_u) / 2, "loss_x": loss_x, "loss_u": loss_u, "loss_u_s1": loss_u_s1,
                "loss_u_s2": loss_u_s2, "loss_u_w_fp": loss_u_w_fp, "mask_ratio": mask_ratio}
