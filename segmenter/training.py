"""The segmenter's training pieces that train.py and the benchmarks share (stage 2).

The method train.py's options choose (methods/, built on --network), the official SGD optimizer, one
optimisation step of a method and the wrapping for training (channels_last, DDP under torchrun,
torch.compile), and :class:`MethodTraining`: a training method as train.py's loop
(utils.training.Trainer) sees it. The options themselves are in segmenter/options.py.
"""
from __future__ import annotations

import torch

from methods import build_method
from utils import distributed
from utils.runtime import autocast_dtype
from utils.schedule import poly_lr_factor
from utils.training import TrainingState

from .options import model_args

def build_training(cfg, ramp_every=None, scale=1, iterations=0):
    """The method (methods/) with its networks (student, EMA teacher, second network), from the global RNG;
    ``ramp_every``: a scaled schedule's iterations per ramp step (None: the config's); ``scale``: its
    schedule_scale, which the first iteration of the unlabeled loss (consistency_start: the config's, or
    the method's reference value, mean-teacher's 1000) is multiplied by like every other iteration count;
    ``iterations``: the run's (scaled) iterations, of which bcp pre-trains for pretrain_share."""
    method = build_method(cfg.method, cfg.network, model_args(cfg), cfg.normalization, cfg.consistency,
                          cfg.consistency_rampup, cfg.consistency_ramp_every if ramp_every is None else ramp_every,
                          cfg.ema_decay, cfg.conf_thresh, cfg.consistency_start, iterations, cfg.pretrain_share)
    if getattr(method, "consistency_start", 0):
        method.consistency_start = round(method.consistency_start * scale)
    return method


def make_optimizer(model, cfg, device) -> torch.optim.SGD:
    """SGD over the trainable parameters (an EMA teacher's are not: it follows the student)."""
    # the fused CUDA kernel computes the same update in one launch instead of one per tensor
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                fused=device.type == "cuda" or None)
    lr_on_device(optimizer, cfg, device)
    return optimizer


def lr_on_device(optimizer, cfg, device) -> None:
    """The learning rate as a device tensor where the step must not read it from the host: on CUDA (the
    scheduler then fills it in place, no wait) and in a compiled step (a changing float would recompile it).
    The CPU's eager step keeps the float: its foreach update would read a tensor back."""
    if device.type == "cuda" or (cfg.compile and cfg.compile_scope == "step"):
        for group in optimizer.param_groups:
            group["lr"] = torch.as_tensor(group["lr"], dtype=torch.float32).to(device)


def make_train_step(forward, optimizer, amp_dtype, device):
    """One optimisation step of a method (methods/: ``forward`` is the method, or its DDP / compiled wrapper)
    on a batch whose first len(masks) images are labeled; returns the detached (loss, sup, cons): its
    "loss", "loss_x" and "loss_u". ``consistency`` is a device tensor: the step never waits for the host."""
    def train_step(images: torch.Tensor, masks: torch.Tensor, consistency: torch.Tensor):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            parts = forward(images, masks, consistency)
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        optimizer.step()
        return parts["loss"].detach(), parts["loss_x"].detach(), parts["loss_u"].detach()
    return train_step


def use_channels_last(cfg, device) -> bool:
    return cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cuda")


def wrap_for_training(method, cfg, ctx, device):
    """The callable the loop trains through: channels_last, DDP under torchrun, torch.compile."""
    if use_channels_last(cfg, device):
        method = method.to(memory_format=torch.channels_last)
    # e.g. the baseline never runs MGCCNet's auxiliary decoders: DDP must not wait for their gradients
    forward = distributed.wrap_ddp(method, ctx, device, find_unused_parameters=method.leaves_parameters_unused())
    return torch.compile(forward, mode=cfg.compile_mode) if cfg.compile and cfg.compile_scope == "model" else forward


class MethodTraining:
    """A training method (methods/: supervised, mgcc, mean-teacher, cct, cps, fixmatch, unimatch, bcp) as
    train.py's loop sees it.

    A method supplies its networks and what a checkpoint holds (``state``: name -> module,
    optimizer, scheduler; saved and restored in one call), the network that is evaluated and kept as
    checkpoint_best's "model" (``evaluated``), and ``train_step(images, masks, it)``: one update on a
    batch whose first len(masks) images are labeled, returning its named losses ("loss" their
    total), detached and on the device (the step never waits for the host). A method with a
    per-step update of its own (an EMA teacher, a phase switch) does it there too. ``module`` is the method itself
    (methods.base.Method): its networks, its losses, its schedule of the unlabeled weight, its EMA.
    """
    loss_names = ("loss", "sup", "cons")

    def __init__(self, cfg, ctx, device, iterations: int, ramp_every=None, scale=1):
        self.cfg, self.ctx, self.device = cfg, ctx, device
        # iterations per step of the consistency ramp: the config's, or a scaled schedule's (a fraction)
        self.ramp_every = cfg.consistency_ramp_every if ramp_every is None else ramp_every
        self.module = build_training(cfg, self.ramp_every, scale, iterations).to(device)
        self.semi = self.module.uses_unlabeled  # the supervised baseline: the labeled images alone, no unlabeled batch
        if ctx.enabled and cfg.sync_bn:  # same parameter and buffer names: checkpoints stay plain
            self.module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.module)
        self.model = self.evaluated = self.module.evaluated
        self.optimizer = make_optimizer(self.module, cfg, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda it: poly_lr_factor(it, iterations))
        # "model": the evaluated network; "method_state": the EMA teacher or the second network (None: none)
        self.state = TrainingState(model=self.model, method_state=self.module.kept_networks(),
                                   optimizer=self.optimizer, scheduler=self.scheduler)

    def unlabeled_batch_size(self) -> int:
        # the baseline sees the labeled images only: the same number per step as MGCC
        return self.cfg.batch_size - self.cfg.labeled_batch_size if self.semi else 0

    def begin(self) -> None:
        """Ready to train, after the state was restored: the step, wrapped for DDP and compiled as asked."""
        cfg, device = self.cfg, self.device
        lr_on_device(self.optimizer, cfg, device)  # a restored checkpoint was read onto the CPU
        forward = wrap_for_training(self.module, cfg, self.ctx, device)
        self.step = make_train_step(forward, self.optimizer, autocast_dtype(cfg.precision, device), device)
        if cfg.compile and cfg.compile_scope == "step":
            self.step = torch.compile(self.step, mode=cfg.compile_mode)
        self.consistency = torch.zeros((), device=device)  # lambda(it), filled in place: no recompile, no wait
        self.module.train()

    def train_step(self, images: torch.Tensor, masks: torch.Tensor, it: int) -> dict[str, torch.Tensor]:
        self.module.before_step(it)  # bcp's phase switch
        self.consistency.fill_(self.module.consistency_weight(it))
        losses = self.step(images, masks, self.consistency)
        self.module.after_step(it)  # the EMA teacher's update
        self.scheduler.step()
        return dict(zip(self.loss_names, losses))

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])
