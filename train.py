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
--method mean-teacher | cct | cps | fixmatch | unimatch | bcp: the comparison methods (methods/,
docs/methods.md), on --network mgcc or unet (MGCCNet without its ConvMixer stages), in this same loop.
--synthetic-pairs DIR (sample_ldm.py's image-mask pairs of a mask-conditioned generator): extra labeled
data for any method; they fill --synthetic-pairs-share of every labeled batch, the real labeled images the
rest (the schedule still counts the real labeled images).

Writes to the run folder: config.yaml (resolved), metrics.jsonl (one line per evaluation),
metrics.json (final), curves.png, checkpoint_last.pt (for --resume: every --checkpoint-minutes, default 10, or
--checkpoint-every iterations, at the end and at a stop), checkpoint_best.pt (at each evaluation that improves) and
tensorboard/ (losses, lambda, learning rate, metrics and overlays; --no-tensorboard: none).
"""
# Where the pieces live: the options in segmenter/options.py, the network, the step and the method's
# training wrapper in segmenter/training.py, the losses in methods/losses.py, the batches in dataloaders/training_batches.py, the loop's skeleton
# in utils/training.py; here the run folder, the loop's hooks and the final evaluation.
from __future__ import annotations

import json
from pathlib import Path

import torch

from dataloaders.datasets import SegmentationDataset
from dataloaders.duplicates import leak_note
from dataloaders.io import DataError, check_outside_data, dataset_name, note
from dataloaders.splits import load_run_data
from dataloaders.training_batches import TrainingBatches, labeled_parts
from methods import CONSISTENCY_DEFAULTS, METHODS, pretrain_iterations
from segmenter.evaluation import evaluate, overlay_grid
from segmenter.options import CHECKPOINT_KIND, OPTIONS, model_args, resolve_method
from segmenter.run import RunRecord, claim_run_folder
from segmenter.training import MethodTraining, use_channels_last
from networks import count_parameters
from networks.unet import build_network
from utils.checkpoint import CheckpointError, check_finite, load_checkpoint, require_fields, weights_misfit
from utils.cli import run_cli, run_on_device
from utils.config import ConfigError, file_values, parse_config, read_yaml, save_yaml, saved_problems
from utils.files import atomic_write_text, check_writable, remove_stale_temporaries
from utils.locks import hold
from utils.runtime import StopRequest, seed_everything
from utils.schedule import final_consistency_weight, run_schedule
from utils.tensorboard import LOG_DIR
from utils.training import Trainer, restore

# what checkpoint_last.pt holds for --resume (a crafted or foreign file lacking one is one error)
RESUME_FIELDS = {"config": dict, "model_args": dict, "model": dict, "iteration": int, "optimizer": dict,
                 "scheduler": dict, "history": list, "best": dict, "rng": (list, dict)}
OVERLAY_IMAGES = 4  # selection images shown in TensorBoard at each evaluation
OPTIMISTIC_NOTE = ("checkpoint_best was selected on the val list that is also reported (the official protocol): "
                   "these val metrics are optimistic. Use --holdout to select on ids carved from the training list.")


def run_name(cfg) -> str:
    return cfg.method + ("-unet" if cfg.network == "unet" else "")


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
    check_outside_data(out_dir, cfg.data_dir)
    if ctx.is_main:  # a file or a read-only file system in the way: before the data checks
        check_writable(out_dir)
        hold(out_dir, "run folder")  # one writer: a second train.py into this folder is refused here
        remove_stale_temporaries(out_dir)  # a checkpoint write cut short by kill -9
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
    bad = resumable_config(cfg, saved, path, out_dir)
    for name in sorted(cfg.explicit & set(saved) - {"out_dir"} - set(bad)):
        if getattr(cfg, name) != saved[name]:
            raise ConfigError(f"--resume: {name} = {getattr(cfg, name)!r} differs from the run's "
                              f"{saved[name]!r} (saved in {path}): a continued run keeps its options; start a new "
                              "run to change it")
    for name, value in saved.items():
        if name not in bad:  # an invalid saved value is replaced by the flag given for it
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


def resumable_config(cfg, saved: dict, path: Path, out_dir: Path) -> set[str]:
    """Check the configuration a run resumes with, before any work: each saved value by the option schema
    (a crafted or old checkpoint's lr -5 or eval_every 0 are errors, not tracebacks or silent loops), and
    the run's config.yaml against it (hand edits are refused: the run keeps its options; before, they were
    silently discarded and the file rewritten). The names of invalid saved values that flags replace."""
    bad = saved_problems(saved, OPTIONS, f"{path}'s config")
    unfixed = [problem for name, problem in sorted(bad.items()) if name not in cfg.explicit]
    if unfixed:
        flags = " ".join(o.flag for o in OPTIONS if o.name in bad and o.name not in cfg.explicit)
        raise ConfigError(f"{'; '.join(unfixed)} (written by an older version, or edited); give {flags} with a valid "
                          "value to continue the run with it")
    yaml_path = out_dir / "config.yaml"
    if yaml_path.is_file():
        written = read_yaml(yaml_path, OPTIONS)
        edited = [f"{k}: {v!r} in config.yaml, {saved[k]!r} in the run" for k, v in sorted(written.items())
                  if k in saved and k != "out_dir" and k not in bad and v != saved[k]]
        if edited:
            raise ConfigError(f"{yaml_path} was edited after the run started ({'; '.join(edited[:4])}): --resume "
                              f"continues the run with the options it started with (saved in {path.name}); undo the "
                              "edit, or start a new run (--config <the edited file> --out-dir <another folder>)")
    return set(bad)


def describe_schedule(cfg, schedule) -> str:
    """' | schedule x 0.05: ramp step every 7.5 iterations, lambda 3.99 at the end' (MGCC; '' for the baseline
    at scale 1)."""
    parts = [f"schedule x {float(schedule.scale):g}"] if schedule.scale != 1 else []
    if cfg.method in CONSISTENCY_DEFAULTS:  # a ramped unlabeled weight
        weight = CONSISTENCY_DEFAULTS[cfg.method] if cfg.consistency is None else cfg.consistency
        end = final_consistency_weight(weight, cfg.consistency_rampup, schedule.ramp_every, schedule.iterations)
        parts.append(f"ramp step every {float(schedule.ramp_every):g} iterations, lambda {end:.2f} at the end")
    if cfg.method == "bcp":
        parts.append(f"copy-paste pre-training for the first {pretrain_iterations(cfg.pretrain_share, schedule.iterations)} "
                     f"iterations (pretrain_share {cfg.pretrain_share:g}), then self-training")
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
    real, synthetic = labeled_parts(cfg.labeled_batch_size, cfg.synthetic_pairs_share if cfg.synthetic_pairs else None)
    if cfg.synthetic_pairs and not 0 < synthetic < cfg.labeled_batch_size:
        raise ConfigError(f"synthetic_pairs_share {cfg.synthetic_pairs_share} of a labeled batch of "
                          f"{cfg.labeled_batch_size} gives {synthetic} synthetic pairs; it must leave at least one "
                          "real and one synthetic image in each labeled batch")
    if len(run_data.labeled) < real:
        raise DataError(f"labeled_batch_size {cfg.labeled_batch_size} is larger than the labeled set "
                        f"({len(run_data.labeled)} images)" if not synthetic else
                        f"the {real} real images of each labeled batch need that many labeled images, found "
                        f"{len(run_data.labeled)}")
    if len(run_data.synthetic) < synthetic:
        raise DataError(f"the {synthetic} synthetic pairs of each labeled batch need that many pairs in "
                        f"{cfg.synthetic_pairs}, found {len(run_data.synthetic)}")
    if real % world_size or synthetic % world_size:
        raise ConfigError(f"under torchrun the real ({real}) and synthetic ({synthetic}) parts of the labeled batch "
                          f"must each split evenly over {world_size} processes")
    unlabeled_batch = cfg.batch_size - cfg.labeled_batch_size
    if semi and len(run_data.unlabeled) < unlabeled_batch:
        raise DataError(f"an unlabeled batch of {unlabeled_batch} needs that many unlabeled images, "
                        f"found {len(run_data.unlabeled)}")
    if cfg.labeled_batch_size % world_size or (semi and unlabeled_batch % world_size):
        raise ConfigError(f"under torchrun the labeled ({cfg.labeled_batch_size}) and unlabeled "
                          f"({unlabeled_batch if semi else 0}) batches must split evenly over {world_size} processes")
    if cfg.method == "bcp" and (unlabeled_batch != cfg.labeled_batch_size or cfg.labeled_batch_size // world_size % 2):
        raise ConfigError(f"bcp mixes each half of the labeled batch with one half of the unlabeled batch: batch_size "
                          f"({cfg.batch_size}) must be twice labeled_batch_size ({cfg.labeled_batch_size}), and "
                          f"labeled_batch_size per process (over {world_size}) even")
    if cfg.iterations is not None and cfg.iterations < 1:
        raise ConfigError(f"iterations must be positive, got {cfg.iterations}")


class SegmenterTraining(Trainer):
    """train.py's loop (utils.training.Trainer's hooks): batches from TrainingBatches, the method's
    step, periodic evaluation on the selection set with checkpoint_best, checkpoint_last for --resume."""
    unit = "iteration"
    agree_every_step = False  # the step never waits for the device: under torchrun the ranks agree at readings

    def __init__(self, cfg, method: MethodTraining, data: TrainingBatches, record: RunRecord, iterations: int,
                 eval_every: int, start: int, ctx, device, stop, out_dir: Path, checkpoint_every: int | None = None):
        super().__init__(iterations, start, ctx, device, stop, method.state, CHECKPOINT_KIND,
                         out_dir / "checkpoint_last.pt", log_every=cfg.log_every,
                         checkpoint_every=checkpoint_every or cfg.checkpoint_every or 0, eval_every=eval_every,
                         checkpoint_minutes=cfg.checkpoint_minutes,
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
                             mask_values=cfg.mask_values, split_name=cfg.split_name, labeled_list=cfg.labeled_list,
                             synthetic_pairs=cfg.synthetic_pairs)
    check_config(cfg, run_data, ctx.world_size, device)
    if ctx.is_main:  # a note, not an error: the published protocol keeps its splits
        note(f"near-duplicates across the split: {leak_note(cfg.data_dir, [cfg.split], cfg.split_name)}")
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
    method = MethodTraining(cfg, ctx, device, iterations, ramp_every=schedule.ramp_every, scale=schedule.scale)
    if ctx.enabled:
        torch.manual_seed(cfg.seed + ctx.rank)  # each rank its own perturbation noise
    restore(method.state, checkpoint, ctx, device)
    method.begin()
    start = checkpoint["iteration"] if checkpoint else 0
    data = TrainingBatches(cfg, run_data, device, ctx, start, method.unlabeled_batch_size())
    if ctx.is_main:
        print(f"data: {data.describe()}", flush=True)
    record = RunRecord(out_dir, run_data.selection_name, ctx.is_main, *(
        (checkpoint["history"], checkpoint["best"]) if checkpoint else (None, None)), device=device)

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
               "labeled": len(run_data.labeled), "labeled_list": cfg.labeled_list,
               **({"synthetic_pairs": str(Path(cfg.synthetic_pairs).resolve()), "synthetic_pairs_count":
                   len(run_data.synthetic), "synthetic_pairs_share": cfg.synthetic_pairs_share}
                  if cfg.synthetic_pairs else {})}
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


def main(argv=None) -> int:
    cfg = parse_config(OPTIONS, __doc__, argv)
    resolve_method(cfg)
    return run_on_device(cfg, train)


if __name__ == "__main__":
    run_cli(main)
