"""Bidirectional Copy-Paste (BCP; Bai et al., CVPR 2023), as DeepMed-Lab-ECNU/BCP ``code/ACDC_BCP_train.py``.

The reference's 2-D ACDC script trains in two phases; here both are one train.py run, the first
``pretrain_share`` of its iterations (the reference's 10,000 pre-training of 10,000 + 30,000: 0.25)
pre-training, the rest self-training. One box per batch (``generate_mask``): int(2H/3) x int(2W/3),
its top-left corner uniform in [0, H - int(2H/3)) x [0, W - int(2W/3)) (numpy's ``randint``, whose
upper bound is excluded: the box never reaches the last row or column). The labeled half of the
batch is split into a and b, the unlabeled half into u_a and u_b (12 = 6 + 6 each there).

Pre-training (labeled images only; the unlabeled ones of the batch go unused, as there):
    input a outside the box, b inside; targets their masks there; loss = part(out, a, outside)
    + part(out, b, inside), with part = (Dice + CE) / 2 on the region's pixels alone (``mix_loss``).
Self-training, the teacher (an EMA of the student) giving pseudo-labels on u_a and u_b (argmax, then
the largest connected component of each image's foreground, ``get_ACDC_2DLargestCC``):
    into_unlabeled = u_a outside, a inside (labeled patch into the unlabeled image)
    into_labeled   = b outside, u_b inside  (unlabeled patch into the labeled image)
    loss_x = part(into_unlabeled, mask a, inside) + part(into_labeled, mask b, outside)
    loss_u = part(into_unlabeled, pseudo u_a, outside) + part(into_labeled, pseudo u_b, inside)
    loss   = loss_x + 0.5 loss_u       (``u_weight`` 0.5: ``--consistency``; no ramp-up: the
                                        reference computes its ramped weight but never uses it)
The student's two mixed batches and the teacher's two unlabeled ones are separate forward passes,
as there (BatchNorm statistics per pass). The teacher starts self-training as the student's copy
(the reference loads the pre-trained weights into both), runs in train mode (batch statistics),
and after every self-training step becomes 0.99 teacher + 0.01 student over its whole state dict,
BatchNorm running statistics included (``update_model_ema``; fixed decay, ``--ema-decay``). The
student is evaluated, as there.

Mapped to this binary output as methods/losses.py says (``region_loss``: BCP's masked Dice with its
1e-10 smoothing, its masked CE over the region's pixel count + 1e-16). Differences: the
pseudo-labels' connected components are 8-connected, as skimage's ``label`` default there, but come
from scipy.ndimage on the CPU (a read-back of the teacher's labels each step, as the reference's);
the box's corner is drawn from torch's CPU generator (saved in checkpoints: resume stays exact);
integer buffers (BatchNorm's batch counter) are not averaged (the reference casts the average back
to an integer); self-training continues from the last pre-training state (the reference reloads
the pre-training's best checkpoint on its validation set, student and optimizer) and checkpoint_best
is selected over both phases; the loop's batch (4 + 4), poly learning-rate decay over the whole run
(the reference keeps 0.01 constant in both phases), iterations, network and weak augmentation.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from scipy import ndimage

from .base import Method, has_unused_decoders
from .losses import hard_label_and_confidence, region_loss

PRETRAIN_SHARE = 0.25  # --pre_iterations 10000 of 10000 + --max_iterations 30000
U_WEIGHT = 0.5  # --u_weight: the pseudo-labelled parts' weight
EMA_DECAY = 0.99  # update_model_ema(model, ema_model, 0.99)
EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)  # skimage.measure.label's default connectivity in 2-D


def pretrain_iterations(share: float, iterations: int) -> int:
    """The iterations of the pre-training phase: the run's (scaled) iterations x ``share``, rounded."""
    return round(share * iterations)


def copy_paste_box(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The reference's ``generate_mask`` box for a batch: a bool (1, 1, height, width), True inside one box
    of int(2 height / 3) x int(2 width / 3) whose corner is uniform over the positions that leave the last
    row and column outside it (numpy's exclusive bound); drawn on torch's CPU generator."""
    box_h, box_w = int(height * 2 / 3), int(width * 2 / 3)
    top = int(torch.randint(0, height - box_h, ()))
    left = int(torch.randint(0, width - box_w, ()))
    inside = torch.zeros(1, 1, height, width, dtype=torch.bool, device=device)
    inside[..., top:top + box_h, left:left + box_w] = True
    return inside


def largest_component(labels: torch.Tensor) -> torch.Tensor:
    """Each image's largest 8-connected foreground component of 0/1 ``labels`` (N, 1, H, W), the rest 0; an
    image without foreground stays empty. A tie goes to the component met first in raster order."""
    foreground = labels.detach().cpu().numpy() > 0.5
    kept = np.zeros_like(foreground)
    for i, image in enumerate(foreground[:, 0]):
        components, count = ndimage.label(image, structure=EIGHT_NEIGHBOURS)
        if count:
            kept[i, 0] = components == np.bincount(components.ravel())[1:].argmax() + 1
    return torch.from_numpy(kept).to(device=labels.device, dtype=labels.dtype)


def pretrain_mix(labeled: torch.Tensor, masks: torch.Tensor, inside: torch.Tensor):
    """Pre-training's input and target: the first half's images and masks outside the box, the second's inside."""
    (a, b), (mask_a, mask_b) = labeled.chunk(2), masks.chunk(2)
    return torch.where(inside, b, a), torch.where(inside, mask_b, mask_a)


def bidirectional_mix(labeled: torch.Tensor, unlabeled: torch.Tensor, inside: torch.Tensor):
    """(into_unlabeled, into_labeled): the labeled half a pasted into u_a inside the box, and u_b's box pasted
    into the labeled half b (the reference's net_input_unl and net_input_l)."""
    (a, b), (u_a, u_b) = labeled.chunk(2), unlabeled.chunk(2)
    return torch.where(inside, a, u_a), torch.where(inside, u_b, b)


@torch.no_grad()
def ema_state_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """teacher <- decay teacher + (1 - decay) student over every floating-point tensor of the state dict:
    parameters and BatchNorm running statistics (the reference's update_model_ema)."""
    student_state = student.state_dict()
    for name, value in teacher.state_dict().items():
        if value.is_floating_point():
            value.mul_(decay).add_(student_state[name].detach(), alpha=1 - decay)


class BCP(Method):
    name = "bcp"
    reference = "BCP code/ACDC_BCP_train.py"

    def __init__(self, student, pretrain_iterations: int, u_weight: float = U_WEIGHT, ema_decay: float = EMA_DECAY,
                 keep_largest_component: bool = True):
        super().__init__(student, consistency=u_weight)
        self.teacher = copy.deepcopy(student).requires_grad_(False)
        self.pretrain_iterations, self.ema_decay = pretrain_iterations, ema_decay
        self.keep_largest_component = keep_largest_component
        self.pretraining = pretrain_iterations > 0  # the phase of the next step (before_step sets it)

    def leaves_parameters_unused(self) -> bool:
        return has_unused_decoders(self.student)

    def consistency_weight(self, step: int) -> float:
        """u_weight from the first self-training step on (no ramp), 0 while pre-training."""
        return 0.0 if step < self.pretrain_iterations else self.consistency

    def before_step(self, step: int) -> None:
        self.pretraining = step < self.pretrain_iterations
        if step == self.pretrain_iterations:  # the self-training's teacher starts from the pre-trained student
            self.teacher.load_state_dict(self.student.state_dict())

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if step >= self.pretrain_iterations:
            ema_state_update(self.teacher, self.student, self.ema_decay)

    @torch.no_grad()
    def pseudo_labels(self, images: torch.Tensor) -> torch.Tensor:
        labels, _ = hard_label_and_confidence(self.teacher(images).float())
        return largest_component(labels) if self.keep_largest_component else labels

    def forward(self, images, masks, weight):
        n = len(masks)
        if n % 2 or len(images) != 2 * n:
            raise ValueError(f"bcp pairs halves of the labeled images and of the unlabeled ones: an even labeled "
                             f"batch and as many unlabeled images needed, got {n} and {len(images) - n}")
        inside = copy_paste_box(*images.shape[-2:], device=images.device)
        labeled, (mask_a, mask_b) = images[:n], masks.chunk(2)
        if self.pretraining:
            mixed, _ = pretrain_mix(labeled, masks, inside)
            logits = self.student(mixed).float()
            loss_x = region_loss(logits, mask_a, ~inside) + region_loss(logits, mask_b, inside)
            zero = loss_x.detach() * 0
            return {"loss": loss_x, "loss_x": loss_x, "loss_u": zero}
        u_a, u_b = images[n:].chunk(2)
        pseudo_a, pseudo_b = self.pseudo_labels(u_a), self.pseudo_labels(u_b)
        into_unlabeled, into_labeled = bidirectional_mix(labeled, images[n:], inside)
        out_unlabeled = self.student(into_unlabeled).float()
        out_labeled = self.student(into_labeled).float()
        loss_x = region_loss(out_unlabeled, mask_a, inside) + region_loss(out_labeled, mask_b, ~inside)
        loss_u = region_loss(out_unlabeled, pseudo_a, ~inside) + region_loss(out_labeled, pseudo_b, inside)
        return {"loss": loss_x + weight * loss_u, "loss_x": loss_x, "loss_u": loss_u,
                "pseudo_foreground": (pseudo_a.mean() + pseudo_b.mean()) / 2}
