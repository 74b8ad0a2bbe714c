"""Train the MGCC segmenter (stage 2), or the supervised baseline on the same network and loop.

    python train.py --config configs/busi.yaml --data-dir inputs/BUSI --split 1 \\
        --unlabeled-dir inputs/BUSI_synth_1

Each iteration (paper Sec. 3.2-3.3, official schedule):
    batch      = labeled_batch_size labeled images + the rest unlabeled (official 4 + 4)
    main, aux  = model(batch)                      aux_k sees features perturbed before ConvMixer k
    L_sup      = mean_d (0.5 BCE + Dice)(d[labeled], mask)        d in main, aux1..3   (Eq. 5-6)
    L_cons     = mean_k MSE(sigmoid(main[unl]), sigmoid(aux_k[unl]))                     (Eq. 7)
    L          = L_sup + lambda(it) * L_cons                                             (Eq. 8)
                 lambda = 7 exp(-5 (1 - t/200)^2), t = it // 150: the ramp spans 30,000 iterations, so at
                 the end of the official 20,000 lambda is 3.99, not 7 (0.74 at 10,000: a quarter of the labels)
    SGD step, poly learning rate (1 - it/max)^0.9.
--schedule-scale S: S x every iteration count (the iterations, the ramp step, the evaluation and checkpoint
intervals), so that lambda(t/T) and lr(t/T) are the published curves (utils/schedule.py).
--mode supervised: labeled images only, main decoder only, L = (0.5 BCE + Dice)(main, mask).
--method mean-teacher | cct | cps | fixmatch | unimatch: the comparison methods (methods/, README
"Methods"), on --network mgcc or unet (MGCCNet without its ConvMixer stages), in this same loop.

Writes to the run folder: config.yaml (resolved), metrics.jsonl (one line per evaluation),
metrics.json (final), curves.png, checkpoint_last.pt (for --resume), checkpoint_best.pt and
tensorboard/ (losses, lambda, learning rate, metrics and overlays; --no-tensorboard: none).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dataloaders.datasets import NORMALIZATIONS, SegmentationDataset
from dataloaders.device_data import DEVICE_DATA_BUDGET_GIB
from dataloaders.io import MASK_VALUES, MAX_IMAGE_PIXELS_OPTION, DataError, dataset_name, set_max_image_pixels
from dataloaders.samplers import batches_per_epoch
from dataloaders.splits import load_run_data
from dataloaders.training_batches import TrainingBatches
from methods import CONSISTENCY_DEFAULTS, METHODS, build_method, network_args
from networks.mgcc import count_parameters
from networks.unet import NETWORKS, build_network
from utils import distributed
from utils.checkpoint import CheckpointError, check_finite, load_checkpoint, require_fields, weights_misfit
from utils.cli import run_cli
from utils.files import atomic_write_text, check_writable
from utils.locks import hold, release_held
from utils.config import (NON_NEGATIVE, POSITIVE, ConfigError, Option, between, count_or, file_values, greater_than,
                          if_number, multiple_of, odd_positive, optional, parse_config, save_yaml)
from utils.evaluation import evaluate, overlay_grid
from utils.losses import consistency_weight, mgcc_losses, poly_lr_factor, supervised_losses  # noqa: F401 (benchmarks)
from utils.run import RunRecord, claim_run_folder
from utils.schedule import final_consistency_weight, scaled_schedule
from utils.runtime import StopRequest, autocast_dtype, resolve_device, seed_everything
from utils.tensorboard import LOG_DIR
from utils.training import Trainer, TrainingState, restore

CHECKPOINT_KIND = "mgcc-segmenter"
# what checkpoint_last.pt holds for --resume (a crafted or foreign file lacking one is one error)
RESUME_FIELDS = {"config": dict, "model_args": dict, "model": dict, "iteration": int, "optimizer": dict,
                 "scheduler": dict, "history": list, "best": dict, "rng": (list, dict)}
OVERLAY_IMAGES = 4  # selection images shown in TensorBoard at each evaluation
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
    Option("consistency_start", None, "iterations before the unlabeled loss counts (weight 0); none: the method's "
           "reference (mean-teacher 1000, others 0)", type=optional(int), check=NON_NEGATIVE),
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
           "image_size; none: 2", type=optional(float)),
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
OPTIMISTIC_NOTE = ("checkpoint_best was selected on the val list that is also reported (the official protocol): "
                   "these val metrics are optimistic. Use --holdout to select on ids carved from the training list.")


def resolve_method(cfg) -> None:
    """cfg.method from --method, else from --mode (its alias for supervised and mgcc)."""
    if {"method", "mode"} <= cfg.explicit and cfg.method != cfg.mode:
        raise ConfigError(f"--method {cfg.method} and --mode {cfg.mode} disagree: give --method alone")
    if cfg.method is None or ("mode" in cfg.explicit and "method" not in cfg.explicit):
        cfg.method = cfg.mode


def model_args(cfg) -> dict:
    """The evaluated network's constructor arguments (after its name, cfg.network), as checkpoints hold them."""
    return network_args(cfg.network, cfg.method, cfg.in_channels, cfg.width, cfg.mixer_depth, cfg.mixer_kernel)


def build_training(cfg, ramp_every=None):
    """The method (methods/) with its networks (student, EMA teacher, second network), from the global RNG;
    ``ramp_every``: a scaled schedule's iterations per ramp step (None: the config's)."""
    return build_method(cfg.method, cfg.network, model_args(cfg), cfg.normalization, cfg.consistency,
                        cfg.consistency_rampup, cfg.consistency_ramp_every if ramp_every is None else ramp_every,
                        cfg.ema_decay, cfg.conf_thresh, cfg.consistency_start)


def run_name(cfg) -> str:
    return cfg.method + ("-unet" if cfg.network == "unet" else "")


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


def prepare_run(cfg, ctx) -> tuple[object, Path, dict | None]:
    """Resolve the run folder; on --resume, load the checkpoint and the run's own config."""
    if {"labeled_fraction", "labeled_list"} <= cfg.explicit:
        raise ConfigError("give --labeled-fraction or --labeled-list, not both")
    if cfg.out_dir is None and cfg.data_dir is not None:
        labels = Path(cfg.labeled_list).stem if cfg.labeled_list else f"l{cfg.labeled_fraction:g}"
        cfg.out_dir = f"runs/{dataset_name(cfg.data_dir)}_split{cfg.split}_{run_name(cfg)}_{labels}"
    if cfg.out_dir is None:
        raise ConfigError("give --data-dir (and --out-dir, or it is derived from the data folder)")
    out_dir = Path(cfg.out_dir)
    if ctx.is_main:  # a file or a read-only file system in the way: before the data checks
        check_writable(out_dir)
        hold(out_dir, "run folder")  # one writer: a second train.py into this folder is refused here
    if not cfg.resume:
        if cfg.data_dir is None:
            raise ConfigError("--data-dir is required")
        claim_run_folder(out_dir, cfg.overwrite, writer=ctx.is_main)
        return cfg, out_dir, None
    path = out_dir / "checkpoint_last.pt"
    checkpoint = load_checkpoint(path, CHECKPOINT_KIND)
    require_fields(checkpoint, path, RESUME_FIELDS)
    check_finite(checkpoint["model"], path)  # else the run would diverge again and call this file the last good one
    saved = checkpoint["config"]
    for name in sorted(cfg.explicit & set(saved) - {"out_dir"}):
        if getattr(cfg, name) != saved[name]:
            raise ConfigError(f"--resume: {name} = {getattr(cfg, name)!r} differs from the run's "
                              f"{saved[name]!r} (see {out_dir / 'config.yaml'})")
    for name, value in saved.items():
        setattr(cfg, name, value)
    cfg.out_dir = str(out_dir)
    resolve_method(cfg)  # a run saved before --method existed has --mode only
    with torch.device("meta"):  # the shapes only, nothing allocated
        misfit = weights_misfit(build_network(cfg.network, **model_args(cfg)).state_dict(), checkpoint["model"])
    if misfit:
        raise CheckpointError(f"{path}: its weights do not fit the network its config describes ({model_args(cfg)}): "
                              f"{len(misfit)} tensor(s), e.g. {'; '.join(misfit[:2])}; the file was written by "
                              "another run or edited")
    return cfg, out_dir, checkpoint


def run_schedule(cfg, run_data):
    """The run's schedule: iterations, ramp step, evaluation and checkpoint intervals, x schedule_scale. The
    official iterations: base_iterations x the labeled fraction (a labeled list's share of the training list)."""
    share = run_data.labeled_share if cfg.labeled_list else cfg.labeled_fraction
    iterations = cfg.iterations or round(cfg.base_iterations * share)
    eval_every = (batches_per_epoch(len(run_data.labeled), cfg.labeled_batch_size) if cfg.eval_every == "epoch"
                  else cfg.eval_every)
    return scaled_schedule(cfg.schedule_scale, iterations, cfg.consistency_ramp_every, eval_every, cfg.checkpoint_every)


def describe_schedule(cfg, schedule) -> str:
    """' | schedule x 0.05: ramp step every 7.5 iterations, lambda 3.99 at the end' (MGCC; '' for the baseline
    at scale 1)."""
    parts = [f"schedule x {float(schedule.scale):g}"] if schedule.scale != 1 else []
    if cfg.method in CONSISTENCY_DEFAULTS:  # a ramped unlabeled weight
        weight = CONSISTENCY_DEFAULTS[cfg.method] if cfg.consistency is None else cfg.consistency
        end = final_consistency_weight(weight, cfg.consistency_rampup, schedule.ramp_every, schedule.iterations)
        parts.append(f"ramp step every {float(schedule.ramp_every):g} iterations, lambda {end:.2f} at the end")
    return " | " + ": ".join(parts) if parts else ""


def check_config(cfg, run_data, world_size: int, device: torch.device) -> None:
    semi = METHODS[cfg.method].uses_unlabeled
    if cfg.method == "mgcc" and cfg.network != "mgcc":
        raise ConfigError("method mgcc perturbs the ConvMixer stages of the mgcc network: use --network mgcc "
                          "(--method cct is its single-level counterpart on either network)")
    if cfg.sync_bn and world_size > 1 and device.type != "cuda":
        raise ConfigError("sync_bn needs CUDA devices (PyTorch's SyncBatchNorm runs on GPUs only)")
    if semi and not 0 < cfg.labeled_batch_size < cfg.batch_size:
        raise ConfigError(f"labeled_batch_size must be in [1, batch_size - 1] for {cfg.method}, got "
                          f"{cfg.labeled_batch_size} of batch_size {cfg.batch_size}")
    if len(run_data.labeled) < cfg.labeled_batch_size:
        raise DataError(f"labeled_batch_size {cfg.labeled_batch_size} is larger than the labeled set "
                        f"({len(run_data.labeled)} images)")
    unlabeled_batch = cfg.batch_size - cfg.labeled_batch_size
    if semi and len(run_data.unlabeled) < unlabeled_batch:
        raise DataError(f"an unlabeled batch of {unlabeled_batch} needs that many unlabeled images, "
                        f"found {len(run_data.unlabeled)}")
    if cfg.labeled_batch_size % world_size or (semi and unlabeled_batch % world_size):
        raise ConfigError(f"under torchrun the labeled ({cfg.labeled_batch_size}) and unlabeled "
                          f"({unlabeled_batch if semi else 0}) batches must split evenly over {world_size} processes")
    if cfg.iterations is not None and cfg.iterations < 1:
        raise ConfigError(f"iterations must be positive, got {cfg.iterations}")


def main(argv=None) -> int:
    cfg = parse_config(OPTIONS, __doc__, argv)
    set_max_image_pixels(cfg.max_image_pixels)
    resolve_method(cfg)
    ctx, device = distributed.setup(resolve_device(cfg.device))
    try:
        return train(cfg, ctx, device)
    finally:
        release_held()
        distributed.teardown()


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

    def __init__(self, cfg, ctx, device, iterations: int, ramp_every=None):
        self.cfg, self.ctx, self.device = cfg, ctx, device
        # iterations per step of the consistency ramp: the config's, or a scaled schedule's (a fraction)
        self.ramp_every = cfg.consistency_ramp_every if ramp_every is None else ramp_every
        self.module = build_training(cfg, self.ramp_every).to(device)
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


class SegmenterTraining(Trainer):
    """train.py's loop (utils.training.Trainer's hooks): batches from TrainingBatches, the method's
    step, periodic evaluation on the selection set with checkpoint_best, checkpoint_last for --resume."""
    unit = "iteration"
    agree_every_step = False  # the step never waits for the device: under torchrun the ranks agree at readings

    def __init__(self, cfg, method: Method, data: TrainingBatches, record: RunRecord, iterations: int,
                 eval_every: int, start: int, ctx, device, stop, out_dir: Path, checkpoint_every: int | None = None):
        super().__init__(iterations, start, ctx, device, stop, method.state, CHECKPOINT_KIND,
                         out_dir / "checkpoint_last.pt", log_every=cfg.log_every,
                         checkpoint_every=checkpoint_every or cfg.checkpoint_every or eval_every, eval_every=eval_every,
                         progress=cfg.progress, stop_after=cfg.stop_after,
                         board_dir=out_dir / LOG_DIR if cfg.tensorboard else None)
        self.cfg, self.method, self.data, self.record = cfg, method, data, record
        self.channels_last = use_channels_last(cfg, device)
        # the pictures of each evaluation in TensorBoard: the first selection images, as evaluated
        self.overlay_set = SegmentationDataset(data.run_data.selection[:OVERLAY_IMAGES], cfg.image_size, cfg.in_channels,
                                               cfg.normalization, mask_values=cfg.mask_values) if self.board else None

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        images, masks = self.data.batch(step)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.method.train_step(images, masks, step)

    def on_read(self, done: int, means: dict[str, float]) -> None:
        self.bar.set_postfix(loss=f"{means['loss']:.4f}", best_iou=f"{self.record.best['iou']:.4f}",
                             lr=f"{self.method.lr():.2e}")

    def board_scalars(self, done: int) -> dict[str, float]:
        # lambda of the last step, from the method's own schedule on the host (no read of the device); the
        # method's, not cfg.consistency: that is None where the method's reference weight applies
        weight = self.method.module.consistency_weight(done - 1)
        return {"lr": self.method.lr(), **({"lambda": weight} if self.method.semi else {})}

    def on_eval(self, done: int) -> None:
        train_means = self.losses.mark()
        if self.ctx.is_main:
            # in fp32 whatever the training precision: metrics comparable across runs and with predict.py
            # HD95, ASD and NSD need every mask on the CPU: only the final evaluation of the selected checkpoint
            # has them
            metrics = evaluate(self.method.evaluated, self.data.selection_batches(), self.device, surface=False)
            if self.record.add(done, metrics, train_means, self.method.lr()):
                self.record.save("checkpoint_best.pt", {"kind": CHECKPOINT_KIND, **self.described(done),
                                                        "model": self.method.evaluated.state_dict(), "metrics": metrics})
            self.bar.write(self.record.describe_last())
            self.board.scalars(done, metrics, prefix=self.record.selection_name)
            if self.overlay_set is not None and len(self.overlay_set):
                self.board.image(f"{self.record.selection_name}/overlays", done,
                                 overlay_grid(self.method.evaluated, self.overlay_set, self.device))

    def described(self, done: int) -> dict:
        return {"config": file_values(self.cfg, OPTIONS), "network": self.cfg.network, "model_args": model_args(self.cfg),
                "iteration": done}

    def checkpoint_extra(self, done: int) -> dict:  # with the method's state and the RNG: what --resume needs
        return {**self.described(done), "history": self.record.history, "best": self.record.best}


def train(cfg, ctx, device) -> int:
    cfg, out_dir, checkpoint = prepare_run(cfg, ctx)
    semi = METHODS[cfg.method].uses_unlabeled
    run_data = load_run_data(cfg.data_dir, cfg.split, cfg.labeled_fraction, cfg.holdout, cfg.unlabeled_dir,
                             cfg.unlabeled_from_train, need_unlabeled=semi, progress=cfg.progress and ctx.is_main,
                             mask_values=cfg.mask_values, split_name=cfg.split_name, labeled_list=cfg.labeled_list)
    check_config(cfg, run_data, ctx.world_size, device)
    schedule = run_schedule(cfg, run_data)
    iterations, eval_every = schedule.iterations, schedule.eval_every
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(file_values(cfg, OPTIONS), out_dir / "config.yaml")
        print(f"run folder {out_dir} | {cfg.network} network | {cfg.method} on {device} x {ctx.world_size} | "
              f"{run_data.summary()} | {iterations} iterations, evaluated every {eval_every}"
              f"{describe_schedule(cfg, schedule)}", flush=True)

    # setup: the method's networks (the same initial weights on every rank), then its restored state
    seed_everything(cfg.seed)
    torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
    method = Method(cfg, ctx, device, iterations, ramp_every=schedule.ramp_every)
    if ctx.enabled:
        torch.manual_seed(cfg.seed + ctx.rank)  # each rank its own perturbation noise
    restore(method.state, checkpoint, ctx)
    method.begin()
    start = checkpoint["iteration"] if checkpoint else 0
    data = TrainingBatches(cfg, run_data, device, ctx, start, method.unlabeled_batch_size())
    if ctx.is_main:
        print(f"data: {data.describe()}", flush=True)
    record = RunRecord(out_dir, run_data.selection_name, ctx.is_main, *(
        (checkpoint["history"], checkpoint["best"]) if checkpoint else ()))

    # the loop, then the final evaluation of the selected checkpoint
    with StopRequest() as stop:
        loop = SegmenterTraining(cfg, method, data, record, iterations, eval_every, start, ctx, device, stop, out_dir,
                                 checkpoint_every=schedule.checkpoint_every)
        if not loop.run(cfg.method):
            return loop.stopped("train.py", "--out-dir", str(out_dir))
    if ctx.is_main:
        finish(cfg, method.evaluated, record, run_data, out_dir, iterations, device, data.report_batches(), loop.board)
    loop.board.close()
    return 0


def finish(cfg, model, record, run_data, out_dir, iterations, device, val_batches, board) -> None:
    """metrics.json: 'val' holds every metric (HD95, ASD, NSD too) of the selected checkpoint on the val list,
    with --holdout its single evaluation there."""
    best = record.best
    summary = {"mode": cfg.mode, "method": cfg.method, "reference": METHODS[cfg.method].reference,
               "network": cfg.network, "iterations": iterations, "schedule_scale": cfg.schedule_scale,
               "parameters": count_parameters(model),
               "selection_set": run_data.selection_name, "best_iteration": best["iteration"],
               "best": {k: v for k, v in best.items() if k != "iteration"}, "last": record.history[-1],
               "labeled": len(run_data.labeled), "labeled_list": cfg.labeled_list}
    model.load_state_dict(load_checkpoint(out_dir / "checkpoint_best.pt", CHECKPOINT_KIND)["model"])
    summary["val"] = evaluate(model, val_batches, device, nsd_tolerance=cfg.nsd_tolerance)
    board.scalars(iterations, summary["val"], prefix="final_val")  # checkpoint_best on the val list, surface metrics too
    if run_data.report:
        summary["note"] = "checkpoint_best selected on the holdout ids; 'val' is its single evaluation on the val list."
    else:  # 'best' again, with the surface metrics: the periodic evaluations leave them out
        summary["note"] = OPTIMISTIC_NOTE
    atomic_write_text(out_dir / "metrics.json", json.dumps(summary, indent=2))
    print(f"done: val IoU {summary['val']['iou']:.4f} Dice {summary['val']['dice']:.4f} "
          f"(checkpoint_best at iteration {best['iteration']}); wrote {out_dir}")


if __name__ == "__main__":
    run_cli(main)
