"""train.py's settings (stage 2): its options (flags, YAML keys and --help) and the method they choose.

One table, OPTIONS, from which utils/config.py makes train.py's flags, its YAML keys and its --help;
the protocol (reproduce.py) and the benchmarks read the same table, so that a stage's configuration is
resolved exactly as train.py resolves it.
"""
from __future__ import annotations

from dataloaders.datasets import NORMALIZATIONS
from dataloaders.device_data import DEVICE_DATA_BUDGET_GIB
from dataloaders.io import MASK_VALUES, MAX_IMAGE_PIXELS_OPTION
from methods import CONSISTENCY_DEFAULTS, METHODS, PRETRAIN_SHARE, U_WEIGHT, network_args
from networks.unet import NETWORKS
from utils.config import (NON_NEGATIVE, POSITIVE, ConfigError, Option, between, count_or, greater_than, if_number,
                          multiple_of, odd_positive, optional)
from utils.tensorboard import LOG_DIR

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
    Option("synthetic_pairs", None, "folder of synthetic image-mask pairs (images/, masks/0/: sample_ldm.py's "
           "output of a mask-conditioned generator) used as extra labeled data; they fill synthetic_pairs_share of "
           "every labeled batch, the real labeled images the rest. Checked as --unlabeled-dir is: its generator must "
           "not have trained on an evaluated id, and no image may copy one", type=optional(str)),
    Option("synthetic_pairs_share", 0.5, "with synthetic_pairs: the share of each labeled batch they fill, "
           "round(share x labeled_batch_size) images (at least 1, at most labeled_batch_size - 1)",
           check=between(0, 1, above_low=True)),
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
    Option("method", None, "training method (docs/methods.md): " + ", ".join(METHODS) + "; none: --mode's",
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
           f"; fixmatch and unimatch have fixed weights in their formula; bcp {U_WEIGHT:g}, the pseudo-labelled parts' "
           "fixed weight from its self-training phase on, no ramp). The official ramp (200 steps of 150 "
           "iterations) spans 30,000 iterations, so at the end of the official 20,000 mgcc's lambda is 3.99, not 7",
           type=optional(float), check=NON_NEGATIVE),
    Option("consistency_start", None, "iterations before the unlabeled loss counts (weight 0), at scale 1 "
           "like every iteration count (x schedule_scale); none: the method's reference (mean-teacher 1000, others 0)", type=optional(int), check=NON_NEGATIVE),
    Option("consistency_rampup", 200.0, "lambda ramps up over this many ramp steps (sigmoid ramp-up)",
           check=NON_NEGATIVE),
    Option("consistency_ramp_every", 150, "iterations per ramp step (official: t = iteration // 150)", check=POSITIVE),
    Option("ema_decay", 0.99, "mean-teacher, bcp: EMA decay of the teacher (SSL4MIS, BCP: 0.99; mean-teacher's "
           "starts as the true average, min(1 - 1/(it + 1), decay), bcp's is fixed)", check=between(0, 1)),
    Option("pretrain_share", PRETRAIN_SHARE, "bcp: share of the iterations (after schedule_scale) spent in its "
           "pre-training phase, copy-paste among the labeled images, before self-training with the EMA teacher (BCP's "
           "10,000 of 10,000 + 30,000 iterations: 0.25)", check=between(0, 1)),
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
    Option("compile_scope", "model", "with --compile: model (the method's forward and its backward) or step "
           "(torch.compile around the step function: not one graph of the whole step. Dynamo compiles the forward "
           "with the losses, then breaks the graph at optimizer.zero_grad, which it never traces, and at backward(), "
           "which runs the forward graph's compiled backward; the SGD update is a graph of its own, and on CUDA the "
           "fused SGD kernel runs as it does eagerly. torch 2.13: 3 graphs, 2 breaks)", choices=("model", "step")),
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
    Option("checkpoint_every", None, "also write checkpoint_last.pt every N iterations (x schedule_scale); none: by "
           "checkpoint_minutes alone. It is always written at the end and at a stop (signal, --stop-after)",
           type=optional(int), check=POSITIVE),
    Option("checkpoint_minutes", 10.0, "write checkpoint_last.pt at the first loss reading (log_every) after this many "
           "minutes of wall time since the last one (0: by checkpoint_every alone); what a crash or kill -9 can lose. "
           "checkpoint_best.pt is written at each evaluation that improves", type=float, check=NON_NEGATIVE),
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
