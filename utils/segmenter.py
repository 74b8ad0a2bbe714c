"""The segmenter's training pieces that train.py and the benchmarks share (stage 2).

train.py's settings (OPTIONS: its flags, YAML keys and --help) and the method they choose
(--method / --mode, built by methods/ on --network), the official SGD optimizer, one optimisation
step of a method and the wrapping for training (channels_last, DDP under torchrun, torch.compile),
and :class:`Method`: a training method as train.py's loop (utils.training.Trainer) sees it.
"""
from __future__ import annotations

import torch

from dataloaders.datasets import NORMALIZATIONS
from dataloaders.device_data import DEVICE_DATA_BUDGET_GIB
from dataloaders.io import MASK_VALUES, MAX_IMAGE_PIXELS_OPTION
from methods import CONSISTENCY_DEFAULTS, METHODS, build_method, network_args
from networks.unet import NETWORKS
from utils import distributed
from utils.config import (NON_NEGATIVE, POSITIVE, ConfigError, Option, between, count_or, greater_than, if_number,
                          multiple_of, odd_positive, optional)
from utils.losses import poly_lr_factor
from utils.runtime import autocast_dtype
from utils.tensorboard import LOG_DIR
from utils.training import TrainingState

CHECKPOINT_KIND = "mgcc-segmenter"
OPTIONS = [
    # data
    Option("data_dir", None, "dataset folder (images/, masks/0/, <name>_train<i>.txt, <name>_val<i>.txt)", type=str),
    Option("split", 1, "split number i: uses <name>_train<i>.txt and <name>_val<i>.txt", check=POSITIVE),
    Option("split_name", None, "prefix of the split files (<name>_train<i>.txt); none: the data folder's name lower-cased, or "
           "the prefix of the only *_train<i>.txt there", type=optional(str)),
    Option("labeled_fraction", 0.5, "fraction of the training list used with labels (its first ids, in file order)",
           check=between(0, 1, above_low=True)),
    Option("labeled_list", None, "file of the labeled ids (one per line, e.g. split.py --labeled's "
           "<name>_train<i>_labeled<N>.txt), all in the training list; instead of labeled_fraction, and the default "
           "iterations scale with its share of the training list", type=optional(str)),
    Option("unlabeled_dir", [], "folder of unlabeled images (<dir>/images/* or <dir>/*), e.g. sample_ldm.py's "
           "output", type=str, repeatable=True),
    Option("unlabeled_from_train", True, "also use the training ids left unlabeled as unlabeled images"),
    Option("holdout", 0.0, "fraction of the training list (its last ids) held out for model selection; the val "
           "list is then evaluated once at the end. 0: select on the val list (official, optimistic)"),
    Option("mask_values", "binary", "mask values: binary (0/255; JPEG noise thresholded with a warning, anything "
           "else an error), threshold (foreground > 127) or nonzero (foreground > 0: label maps, 0/1 masks)",
           choices=MASK_VALUES),
    Option("image_size", 256, "images are resized to image_size x image_size",
           check=multiple_of(16, " (the network halves the image four times)")),
    Option("in_channels", 3, "network input channels: 3 (BGR, as the official code) or 1 (grayscale)", choices=(1, 3)),
    Option("normalization", "official", "input normalisation: official (ImageNet stats, /255 again) or unit "
           "([-1, 1])", choices=NORMALIZATIONS),
    Option("num_workers", 4, "data-loader worker processes (0: load in the main process); with the data on the "
           "device they only decode the images once, at the start", check=NON_NEGATIVE),
    Option("data_on_device", "auto", "keep the training and selection images on the training device, decoded and "
           "resized once (8 orientations of each training image), augmented and normalised there: on, off (a "
           f"DataLoader with num_workers processes), or auto (on when they take at most {DEVICE_DATA_BUDGET_GIB:g} GiB)",
           choices=("auto", "on", "off")),
    # model
    Option("method", None, "training method (README, Methods): " + ", ".join(METHODS) + "; none: --mode's",
           type=optional(str), choices=tuple(METHODS)),
    Option("mode", "mgcc", "the first two methods, by their earlier name: mgcc (semi-supervised MGCC) or supervised "
           "(the baseline on the labeled images alone); --method wins", choices=("mgcc", "supervised")),
    Option("network", "mgcc", "segmentation network: mgcc (MGCCNet) or unet (MGCCNet's encoder and decoder without "
           "the three ConvMixer stages: the network of the paper's compared methods)", choices=NETWORKS),
    Option("width", 64, "channels of the first encoder stage (published: 64); stages are w, 2w, 4w, 8w, 16w",
           check=POSITIVE),
    Option("mixer_depth", 3, "ConvMixer blocks in each of the three bottleneck stages", check=POSITIVE),
    Option("mixer_kernel", 7, "kernel size of the ConvMixer depthwise convolutions",
           check=odd_positive(" (a depthwise convolution padded to keep the size)")),
    # optimisation (official defaults)
    Option("iterations", None, "training iterations; none: base_iterations x labeled_fraction (official)",
           type=optional(int), check=POSITIVE),
    Option("base_iterations", 40000, "iterations at labeled_fraction 1, used when iterations is none", check=POSITIVE),
    Option("schedule_scale", 1.0, "run S x the schedule: S x the iterations, with the consistency ramp step "
           "(consistency_ramp_every), the evaluation and the checkpoint intervals scaled alike, so that lambda(t/T) "
           "and the learning rate lr(t/T) follow the published curves (every iteration count here, from the file "
           "or a flag, is at scale 1). E.g. 0.05: 1,000 of the official 20,000 iterations, a ramp step every 7.5",
           check=greater_than(0)),
    Option("batch_size", 8, "images per iteration, labeled and unlabeled together; under torchrun the global "
           "batch, split evenly over the processes", check=POSITIVE),
    Option("labeled_batch_size", 4, "labeled images per iteration (global under torchrun); in supervised mode "
           "the whole batch", check=POSITIVE),
    Option("lr", 0.01, "SGD base learning rate, decayed as (1 - it/iterations)^0.9", check=greater_than(0)),
    Option("momentum", 0.9, "SGD momentum", check=between(0, 1)),
    Option("weight_decay", 1e-4, "SGD weight decay", check=NON_NEGATIVE),
    Option("consistency", None, "final weight lambda of the unlabeled loss, which the ramp tends to; none: the "
           "method's reference value (" + ", ".join(f"{m} {w:g}" for m, w in CONSISTENCY_DEFAULTS.items()) +
           "; fixmatch and unimatch have fixed weights in their formula). The official ramp (200 steps of 150 "
           "iterations) spans 30,000 iterations, so at the end of the official 20,000 mgcc's lambda is 3.99, not 7",
           type=optional(float), check=NON_NEGATIVE),
    Option("consistency_start", None, "iterations before the unlabeled loss counts (weight 0), at scale 1 "
           "like every iteration count (x schedule_scale); none: the method's reference (mean-teacher 1000, others 0)", type=optional(int), check=NON_NEGATIVE),
    Option("consistency_rampup", 200.0, "lambda ramps up over this many ramp steps (sigmoid ramp-up)",
           check=NON_NEGATIVE),
    Option("consistency_ramp_every", 150, "iterations per ramp step (official: t = iteration // 150)", check=POSITIVE),
    Option("ema_decay", 0.99, "mean-teacher: EMA decay of the teacher (SSL4MIS)", check=between(0, 1)),
    Option("conf_thresh", 0.95, "fixmatch, unimatch: confidence threshold of the pseudo-labels (UniMatch)",
           check=between(0, 1)),
    Option("seed", 1337, "random seed of weights, data order, augmentation and perturbations",
           check=between(0, 2**32 - 1)),
    # speed options. bf16 on CUDA is the default: with the image's convolution in fp32 it trains as fp32
    # does (benchmarks/RESULTS.md); evaluation is always fp32.
    Option("precision", "auto", "autocast precision of the training step: auto (bf16 on a CUDA GPU with bf16, "
           "fp32 elsewhere), bf16 (fp32 master weights), or fp32 (the official arithmetic)",
           choices=("auto", "bf16", "fp32")),
    Option("channels_last", "auto", "channels_last memory format: on, off, or auto (on with CUDA)",
           choices=("auto", "on", "off")),
    Option("compile", False, "torch.compile the training (see compile_scope, compile_mode)"),
    Option("compile_scope", "model", "with --compile: model (the network's forward and backward) or step (the "
           "whole step: forward, loss, backward and the optimizer update)", choices=("model", "step")),
    Option("compile_mode", "default", "with --compile: the torch.compile mode; reduce-overhead replays the "
           "compiled step as CUDA graphs on a GPU", choices=("default", "reduce-overhead", "max-autotune",
                                                             "max-autotune-no-cudagraphs")),
    Option("sync_bn", False, "under torchrun: synchronise batch-norm statistics across GPUs (SyncBatchNorm)"),
    # evaluation and outputs
    Option("eval_every", 200, "evaluate on the selection set every N iterations (and at the end); epoch: after "
           "every pass over the labeled images, labeled images // labeled_batch_size iterations (the official "
           "protocol)", type=count_or("epoch"), check=if_number(POSITIVE)),
    Option("eval_batch_size", 16, "images per evaluation batch", check=POSITIVE),
    Option("nsd_tolerance", None, "tolerance of the final evaluation's normalised surface Dice, in pixels at "
           "image_size; none: 2", type=optional(float), check=NON_NEGATIVE),
    Option("checkpoint_every", None, "write checkpoint_last.pt every N iterations; none: at each evaluation",
           type=optional(int), check=POSITIVE),
    Option("log_every", 10, "read the losses back from the device every N iterations (progress bar, NaN check)",
           check=POSITIVE),
    Option("out_dir", None, "run folder; none: runs/<dataset>_split<i>_<method>[-unet]_l<fraction>",
           type=optional(str)),
    # one invocation only (not saved in config.yaml)
    Option("device", "auto", "auto (CUDA if present, else CPU), cpu, cuda or cuda:N", in_file=False),
    Option("resume", False, "continue the run in --out-dir from its checkpoint_last.pt", in_file=False),
    Option("stop_after", None, "leave after this many iterations of this invocation, with checkpoint_last.pt "
           "written (for time-limited job slots); continue with --resume", type=optional(int), in_file=False,
           check=POSITIVE),
    Option("overwrite", False, "start afresh in an --out-dir that holds an earlier run", in_file=False),
    Option("progress", True, "show progress bars", in_file=False),
    MAX_IMAGE_PIXELS_OPTION,
    Option("tensorboard", True, f"write TensorBoard logs to <out-dir>/{LOG_DIR} (losses, lambda, lr, metrics, "
           "overlays of the first selection images at each evaluation); rank 0 only", in_file=False),
]


def resolve_method(cfg) -> None:
    """cfg.method from --method, else from --mode (its alias for supervised and mgcc)."""
    if {"method", "mode"} <= cfg.explicit and cfg.method != cfg.mode:
        raise ConfigError(f"--method {cfg.method} and --mode {cfg.mode} disagree: give --method alone")
    if cfg.method is None or ("mode" in cfg.explicit and "method" not in cfg.explicit):
        cfg.method = cfg.mode


def model_args(cfg) -> dict:
    """The evaluated network's constructor arguments (after its name, cfg.network), as checkpoints hold them."""
    return network_args(cfg.network, cfg.method, cfg.in_channels, cfg.width, cfg.mixer_depth, cfg.mixer_kernel)


def build_training(cfg, ramp_every=None, scale=1):
    """The method (methods/) with its networks (student, EMA teacher, second network), from the global RNG;
    ``ramp_every``: a scaled schedule's iterations per ramp step (None: the config's); ``scale``: its
    schedule_scale, which the first iteration of the unlabeled loss (consistency_start: the config's, or
    the method's reference value, mean-teacher's 1000) is multiplied by like every other iteration count."""
    method = build_method(cfg.method, cfg.network, model_args(cfg), cfg.normalization, cfg.consistency,
                          cfg.consistency_rampup, cfg.consistency_ramp_every if ramp_every is None else ramp_every,
                          cfg.ema_decay, cfg.conf_thresh, cfg.consistency_start)
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


class Method:
    """A training method (methods/: supervised, mgcc, mean-teacher, cct, cps, fixmatch, unimatch) as
    train.py's loop sees it.

    A method supplies its networks and what a checkpoint holds (``state``: name -> module,
    optimizer, scheduler; saved and restored in one call), the network that is evaluated and kept as
    checkpoint_best's "model" (``evaluated``), and ``train_step(images, masks, it)``: one update on a
    batch whose first len(masks) images are labeled, returning its named losses ("loss" their
    total), detached and on the device (the step never waits for the host). A method with a
    per-step update of its own (an EMA teacher) does it there too. ``module`` is the method itself
    (methods.base.Method): its networks, its losses, its schedule of the unlabeled weight, its EMA.
    """
    loss_names = ("loss", "sup", "cons")

    def __init__(self, cfg, ctx, device, iterations: int, ramp_every=None, scale=1):
        self.cfg, self.ctx, self.device = cfg, ctx, device
        # iterations per step of the consistency ramp: the config's, or a scaled schedule's (a fraction)
        self.ramp_every = cfg.consistency_ramp_every if ramp_every is None else ramp_every
        self.module = build_training(cfg, self.ramp_every, scale).to(device)
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
        self.consistency.fill_(self.module.consistency_weight(it))
        losses = self.step(images, masks, self.consistency)
        self.module.after_step(it)  # the EMA teacher's update
        self.scheduler.step()
        return dict(zip(self.loss_names, losses))

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])
