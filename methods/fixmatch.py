"""FixMatch (Sohn et al., 2020) as UniMatch's code runs it for medical images.

UniMatch's medical scenario (``more-scenarios/medical``) ships unimatch.py and supervised.py but no
fixmatch.py; this is its unimatch.py without the feature-perturbation stream and with one strong
view, with the loss formula of UniMatch's ``fixmatch.py`` (loss = (loss_x + loss_u_s) / 2). Defaults
of ``configs/acdc.yaml``: conf_thresh 0.95 (lr 0.01, SGD momentum 0.9, weight decay 1e-4, poly 0.9
are this code base's too). Per step:

    mix predictions = the model in eval mode, without gradients, on the weak mix images
    strong view     = colour jitter + blur (methods/augment.py) of the weak view, CutMix-ed with the
                      mix image's strong view inside a box drawn with p 0.5
    pseudo-labels   = argmax of the weak prediction (train mode, detached), the mix prediction in the box
    loss_x          = (CE + Dice) / 2 on the labeled images
    loss_u_s        = Dice of the strong prediction against the pseudo-labels, ignoring pixels whose
                      confidence is below conf_thresh

Mapped here: argmax is p > 0.5, confidence max(p, 1 - p), CE the BCE, Dice the 2-class Dice (the
ignored pixels are left out of both classes' sums). The mix image of each unlabeled image is the next
one of the same unlabeled batch (the reference draws a second unlabeled batch; with one unlabeled image
per process, under torchrun, that is the image itself and CutMix changes nothing); the CutMix box takes
that image's strong view and its eval-mode prediction, as the reference's mix batch does.
"""
from __future__ import annotations

import torch

from .augment import Intensity, StrongAugmentation, cutmix_boxes, mix_partner
from .base import Method, has_unused_decoders
from .losses import hard_label_and_confidence, reference_supervised_loss, two_class_dice_loss


class FixMatch(Method):
    name = "fixmatch"
    reference = "UniMatch more-scenarios/medical/unimatch.py (one strong view, no feature stream) and fixmatch.py"
    strong_views = 1

    def __init__(self, student, intensity: Intensity, conf_thresh: float = 0.95):
        super().__init__(student)
        self.strong = StrongAugmentation(intensity)
        self.conf_thresh = conf_thresh

    def consistency_weight(self, step: int) -> float:
        return 1.0  # the references weigh the unlabeled losses by fixed factors, inside the formula

    def leaves_parameters_unused(self) -> bool:
        return has_unused_decoders(self.student)

    @torch.no_grad()
    def mix_targets(self, weak: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pseudo-label, confidence) of each image's mix partner, predicted in eval mode (the reference)."""
        was_training = self.student.training
        self.student.eval()
        label, confidence = hard_label_and_confidence(self.student(weak).float())
        self.student.train(was_training)
        return mix_partner(label), mix_partner(confidence)

    def strong_views_with_boxes(self, weak: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Strong views, each CutMix-ed with its partner's view of the same draw: [(view, box), ...]."""
        views = []
        for _ in range(self.strong_views):
            strong = self.strong(weak)
            box = cutmix_boxes(len(weak), weak.shape[-1], weak.device)
            views.append((torch.where(box, mix_partner(strong), strong), box))
        return views

    def pseudo_loss(self, logits, label, confidence, label_mix, confidence_mix, box):
        """Dice of the strong prediction against the CutMix-ed pseudo-labels, low-confidence pixels ignored."""
        label, confidence = torch.where(box, label_mix, label), torch.where(box, confidence_mix, confidence)
        return two_class_dice_loss(torch.sigmoid(logits), label, ignore=confidence < self.conf_thresh)

    def forward(self, images, masks, weight):
        n = len(masks)
        weak = images[n:]
        label_mix, confidence_mix = self.mix_targets(weak)
        (strong, box), = self.strong_views_with_boxes(weak)
        pred_x, pred_w = self.student(images).float().split([n, len(weak)])
        pred_s = self.student(strong).float()
        label, confidence = hard_label_and_confidence(pred_w.detach())
        loss_x = reference_supervised_loss(pred_x, masks)
        loss_u_s = self.pseudo_loss(pred_s, label, confidence, label_mix, confidence_mix, box)
        mask_ratio = (confidence >= self.conf_thresh).float().mean()
        loss_u = loss_u_s
        return {"loss": (loss_x + loss_u) / 2, "loss_x": loss_x, "loss_u": loss_u, "loss_u_s": loss_u_s,
                "mask_ratio": mask_ratio}
