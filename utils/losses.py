"""MGCC's objective (paper Eq. 5-8; official defaults).

    L = L_sup + lambda(t) * L_cons
    L_sup  = mean over the 4 decoders of (0.5 * BCE + Dice loss) on the labeled images      (Eq. 5-6)
    L_cons = mean over the 3 aux decoders of MSE(sigmoid(main), sigmoid(aux)) on unlabeled   (Eq. 7)
    lambda(t) = weight * exp(-5 (1 - min(t, T)/T)^2),  t = iteration // ramp_every           (Eq. 8)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DICE_SMOOTH = 1e-5  # as the official BCEDiceLoss


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


def sigmoid_rampup(current: float, length: float) -> float:
    """exp(-5 (1 - t/T)^2) with t clipped to [0, T] (Laine & Aila, 2017); 1 when T = 0."""
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(current, 0.0), length) / length
    return float(math.exp(-5.0 * phase * phase))


def consistency_weight(iteration: int, weight: float = 7.0, rampup_length: float = 200.0, ramp_every: int = 150) -> float:
    """lambda(t) of Eq. 8 as the official schedule: t = iteration // 150 ramps up over 200 such steps."""
    return weight * sigmoid_rampup(iteration // ramp_every, rampup_length)


def poly_lr_factor(iteration: int, max_iterations: int, power: float = 0.9) -> float:
    """(1 - it/max)^power: the official learning-rate schedule, as a factor of the base rate."""
    return (1.0 - iteration / max_iterations) ** power
