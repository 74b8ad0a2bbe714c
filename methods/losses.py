"""Every method's losses, for this code base's binary output (one logit per pixel, sigmoid).

MGCC and the supervised baseline (paper Eq. 5-8; official defaults):

    L = L_sup + lambda(t) * L_cons
    L_sup  = mean over the 4 decoders of (0.5 * BCE + Dice loss) on the labeled images      (Eq. 5-6)
    L_cons = mean over the 3 aux decoders of MSE(sigmoid(main), sigmoid(aux)) on unlabeled   (Eq. 7)
    lambda(t): the ramp-up of utils/schedule.py                                              (Eq. 8)

The comparison methods' references (SSL4MIS, UniMatch's medical scenario, BCP) have a multi-class softmax
output. With two classes a softmax over logits (0, z) is exactly sigmoid(z), so:

- cross-entropy is binary cross-entropy with logits;
- their Dice loss (SSL4MIS ``code/utils/losses.py`` and UniMatch ``more-scenarios/medical/util/utils.py``,
  ``DiceLoss``) is the mean over the classes, background included, of one Dice computed over the
  whole batch with squared sums in the denominator; here the two classes are p and 1 - p. BCP's
  (``code/utils/losses.py``) is the same with smoothing 1e-10 and an optional pixel mask that restricts
  every sum to a region;
- the MSE of the class probabilities is MSE(sigmoid(a), sigmoid(b)): the two channels' squared
  differences are equal, (p - q)^2 = ((1 - p) - (1 - q))^2;
- argmax is p > 0.5 (a tie goes to class 0, background), the confidence max(p, 1 - p).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DICE_SMOOTH = 1e-5  # the official BCEDiceLoss and SSL4MIS's and UniMatch's DiceLoss
BCP_DICE_SMOOTH = 1e-10  # BCP's code/utils/losses.py DiceLoss
BCP_CE_EPS = 1e-16  # BCP's mix_loss: the masked CE's denominator, mask.sum() + 1e-16


# --- MGCC and the supervised baseline -------------------------------------------------------------

def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """1 - soft Dice of sigmoid(logits) and target, computed per sample and averaged over the batch."""
    probs = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    dice = (2 * (probs * target).sum(1) + smooth) / (probs.sum(1) + target.sum(1) + smooth)
    return 1 - dice.mean()


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0.5 * BCE-with-logits (mean over pixels) + soft Dice loss: CMU-Net's and MGCC's supervised loss."""
    return 0.5 * F.binary_cross_entropy_with_logits(logits, target) + soft_dice_loss(logits, target)


def supervised_loss(outputs: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Mean of the BCE + Dice loss over the decoders' outputs (main and auxiliary)."""
    return torch.stack([bce_dice_loss(o, target) for o in outputs]).mean()


def consistency_loss(main_logits: torch.Tensor, aux_logits: list[torch.Tensor]) -> torch.Tensor:
    """Mean over aux decoders of MSE between the main and aux probabilities; gradients reach both."""
    main_probs = torch.sigmoid(main_logits)
    return torch.stack([F.mse_loss(torch.sigmoid(a), main_probs) for a in aux_logits]).mean()


def mgcc_losses(forward, images: torch.Tensor, masks: torch.Tensor, consistency: float | torch.Tensor):
    """The MGCC objective of one batch whose first len(masks) images are labeled: (loss, sup, cons)."""
    n = len(masks)
    main_logits, aux_logits = forward(images, with_aux=True)
    main_logits, aux_logits = main_logits.float(), [a.float() for a in aux_logits]
    sup = supervised_loss([main_logits[:n]] + [a[:n] for a in aux_logits], masks)  # Eq. 5-6
    cons = consistency_loss(main_logits[n:], [a[n:] for a in aux_logits])  # Eq. 7
    return sup + consistency * cons, sup, cons  # Eq. 8


def supervised_losses(forward, images: torch.Tensor, masks: torch.Tensor):
    """The baseline's objective: BCE + Dice of the main decoder; (loss, sup, cons = 0)."""
    sup = bce_dice_loss(forward(images).float(), masks)
    return sup, sup, torch.zeros((), device=sup.device)


# --- the comparison methods (SSL4MIS, UniMatch, BCP) ---------------------------------------------

def two_class_dice_loss(probs: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor | None = None,
                        smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """The references' DiceLoss(n_classes=2) on the foreground probability ``probs`` and a 0/1 ``target``.

    Per class: 1 - (2 sum(s t) + smooth) / (sum(s^2) + sum(t^2) + smooth) over every pixel of the batch
    not ignored (``ignore`` True: UniMatch's low-confidence pixels, BCP's pixels outside a region); the
    loss is the mean of the two.
    """
    keep = torch.ones_like(probs) if ignore is None else (~ignore.bool()).to(probs.dtype)
    losses = []
    for score, truth in ((1 - probs, 1 - target), (probs, target)):  # background, foreground
        intersect = (score * truth * keep).sum()
        denominator = (score * score * keep).sum() + (truth * truth * keep).sum()
        losses.append(1 - (2 * intersect + smooth) / (denominator + smooth))
    return (losses[0] + losses[1]) / 2


def region_loss(logits: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """(Dice + CE) / 2 on the pixels of ``region`` (True inside) alone: one of the two parts of BCP's
    ``mix_loss`` (code/ACDC_BCP_train.py). Its masked DiceLoss(n_classes=2) with BCP's smoothing, and its CE
    summed over the region and divided by the region's pixel count + 1e-16 (0 for an empty region)."""
    region = region.expand_as(logits).to(logits.dtype)
    dice = two_class_dice_loss(torch.sigmoid(logits), target, ignore=region == 0, smooth=BCP_DICE_SMOOTH)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (dice + (ce * region).sum() / (region.sum() + BCP_CE_EPS)) / 2


def reference_supervised_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0.5 (CE + Dice) of SSL4MIS's 2-D scripts and UniMatch's medical loss_x: 0.5 (BCE + 2-class Dice)."""
    return 0.5 * (F.binary_cross_entropy_with_logits(logits, target) + two_class_dice_loss(torch.sigmoid(logits), target))


def hard_label_and_confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax as 0/1 float, max class probability) of a binary logit: (p > 0.5, max(p, 1 - p))."""
    probs = torch.sigmoid(logits)
    return (probs > 0.5).to(logits.dtype), torch.maximum(probs, 1 - probs)
