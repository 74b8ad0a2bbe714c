"""The skeleton every training loop of the project shares: train.py and both stages of train_ldm.py
(sample_ldm.py stops on a signal through :func:`stop_requested` and :func:`stop_status` too).

A script subclasses :class:`Trainer` and fills in its hooks (nnU-Net's ``nnUNetTrainer`` shape):

    train_step(step)      one optimisation step; returns the named losses, "loss" their total
    on_read(done, means)  the losses were read back (progress bar figures)
    board_scalars(done)   scalars logged to TensorBoard with the losses at each reading (lr, lambda...)
    on_eval(done)         the periodic evaluation (and preview), every ``eval_every`` steps and at the end
    checkpoint_extra(done)  what a checkpoint holds besides the registered state and the RNG
    on_checkpoint(done)   after the state file was written (rank 0): models, plots, run description

``Trainer.run()`` is the loop; around each step it does the bookkeeping once for every script: the
progress bar, the loss log (read back every few steps: the step never waits for the device), the
periodic evaluation, checkpoints whose weights are checked finite first, per-rank RNG states, a
stop on SIGINT/SIGTERM (or --stop-after) with the one "Continue with ... --resume" message, and the
speed report. What a checkpoint holds is registered once as a :class:`TrainingState` (name ->
module, optimizer, scheduler, EMA...), saved and restored in one call.
"""
from __future__ import annotations

import contextlib
import csv
import math
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import distributed
from .checkpoint import atomic_save, to_host
from .plots import plot_curves
from .runtime import rng_state, set_rng_state
from .tensorboard import TensorBoardLog


def due(step: int, every: int, last: int) -> bool:
    """After ``step`` steps: every ``every`` steps and always at the end (every = 0: only the end)."""
    return step == last or (every > 0 and step % every == 0)


def optimizer_update(loss: torch.Tensor, parameters, optimizer, schedule=None, grad_clip: float = 0.0) -> None:
    """One update: backward, gradient-norm clipping (grad_clip > 0), the optimizer's and the schedule's steps."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()
    if schedule is not None:
        schedule.step()


@contextlib.contextmanager
def ema_weights(ema, model):
    """``model`` holds the EMA weights (a diffusers EMAModel's) inside the block, its own again after it."""
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield model
    finally:
        ema.restore(model.parameters())


def kept_checkpoint(path: Path) -> str:
    return f"its last checkpoint {path} is untouched" if path.is_file() else "no checkpoint was written"


class TrainingState:
    """What a checkpoint holds, registered once: name -> object with ``state_dict`` and
    ``load_state_dict`` (a module, an optimizer, a scheduler, an EMA), or None when the run has none
    (saved as None). ``state_dict()`` saves them all, ``load_state_dict(saved)`` restores them all."""

    def __init__(self, **parts):
        self.parts = parts

    def state_dict(self) -> dict:
        return {name: part.state_dict() if part is not None else None for name, part in self.parts.items()}

    def load_state_dict(self, saved: dict) -> None:
        for name, part in self.parts.items():
            if part is not None:
                part.load_state_dict(saved[name])

    def modules(self) -> list[torch.nn.Module]:
        return [part for part in self.parts.values() if isinstance(part, torch.nn.Module)]


def check_finite_weights(modules, where: str, path: Path, device, advice: str = "") -> None:
    """Never checkpoint non-finite weights (a finite loss can still step to them): they would
    poison --resume. Parameters and buffers (batch-norm statistics) are checked; every rank raises
    together."""
    # one flag per tensor, reduced on the device: a single read back, not one per tensor
    flags = [torch.isfinite(t).all() for m in modules for t in m.state_dict().values() if t.is_floating_point()]
    bad = bool(flags) and not bool(torch.stack(flags).all())
    if distributed.any_rank(bad, device):
        raise FloatingPointError(f"non-finite weights {where}: stopped; {kept_checkpoint(path)}{advice}")


def rank_rng_state(saved, ctx) -> dict:
    """This process's RNG state from a checkpoint (one per rank): its own when the number of
    processes is unchanged, else rank 0's (a run resumed on another number of processes)."""
    states = saved if isinstance(saved, list) else [saved]
    return states[ctx.rank] if len(states) == ctx.world_size else states[0]


def restore(state: TrainingState, saved: dict | None, ctx, device: torch.device | None = None) -> None:
    """Load ``state`` and this rank's RNG state from checkpoint ``saved`` (None: a fresh run, nothing to do);
    a GPU's RNG state goes to ``device``, the training device."""
    if saved is not None:
        state.load_state_dict(saved)
        set_rng_state(rank_rng_state(saved["rng"], ctx), device)


def stop_requested(stop, ctx, device) -> bool:
    """A signal reached this process or, under torchrun, any: every rank gets the same answer."""
    return distributed.any_rank(bool(stop), device) if ctx.enabled else bool(stop)


def stop_status(stop) -> int:
    """128 + the number of the signal that stopped the run (the same on every rank)."""
    return 128 + max(distributed.gather_objects(stop.signal_number))


def resume_hint(ctx, script: str, *args: str) -> str:
    """The command that continues a stopped run, as this run was launched."""
    launcher = f"torchrun --nproc_per_node {ctx.world_size}" if ctx.enabled else "python"
    return f"Continue with:\n  {' '.join([launcher, script, *args])} --resume"


class LossLog:
    """Sums each named loss on the device and reads the sums back only every few steps.

    Reading a loss forces the host to wait for the device, so the step itself never does. The first
    step with a non-finite loss is remembered on the device and reported at the next reading. Under
    torchrun each process holds the losses of its own slice of the batch; the means read are
    averaged over the processes (equal slices: the mean over the global batch), so every rank gets
    the same figures and every rank stops together when one of them went non-finite. ``history``
    keeps one row per reading ({"step": done, name: mean...}).
    """

    def __init__(self, device, history: list[dict] | None = None):
        self.device = device
        self.history = list(history or [])
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.first_bad = torch.full((), -1, device=device, dtype=torch.long)
        self.marked: dict[str, list[float]] = {}  # sums and counts since mark() (e.g. the last evaluation)

    def add(self, step: int, **losses: torch.Tensor) -> None:
        """The losses of step number ``step`` (the number a non-finite loss is reported with)."""
        for name, value in losses.items():
            value = value.detach().float()
            if name in self.sums:
                self.sums[name] += value
            else:
                self.sums[name] = value.clone()
            self.counts[name] = self.counts.get(name, 0) + 1
            self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(value), step, self.first_bad)

    def read(self, done: int, what: str, unit: str, path: Path, advice: str = "") -> dict[str, float]:
        """Means of each loss since the last reading; FloatingPointError (on every rank) after a
        non-finite loss, naming its ``unit`` (step, iteration) and saying what became of ``path``."""
        local = {name: (float(total), self.counts[name]) for name, total in self.sums.items()}
        ranks = distributed.gather_objects((local, int(self.first_bad.item())))
        means = {name: sum(r[name][0] / max(r[name][1], 1) for r, _ in ranks) / len(ranks) for name in local}
        bad = [b for _, b in ranks if b >= 0]
        if bad or not all(math.isfinite(v) for v in means.values()):
            terms = ", ".join(f"{k} {v:.4g}" for k, v in means.items())
            raise FloatingPointError(f"non-finite {what + ' ' if what else ''}loss at {unit} {min(bad) if bad else done} "
                                     f"(means of {unit}s up to {done}: {terms}): stopped; {kept_checkpoint(path)}"
                                     f"{advice}")
        for name, mean in means.items():
            total, count = self.marked.get(name, (0.0, 0))
            self.marked[name] = [total + mean * self.counts[name], count + self.counts[name]]
        self.sums, self.counts = {}, {}
        self.history.append({"step": done, **means})
        return means

    def write(self, csv_path: Path, png_path: Path, title: str, panels: dict[str, dict[str, str]]) -> None:
        """The history as a CSV file (one row per reading) and a plot; panels: {title: {curve label: loss name}}."""
        if not self.history:
            return
        columns = ["step"] + sorted({k for row in self.history for k in row} - {"step"})
        with csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.history)
        figure = {}
        for panel, curves in panels.items():
            drawn = {label: ([r["step"] for r in self.history if column in r],
                             [r[column] for r in self.history if column in r]) for label, column in curves.items()}
            drawn = {label: xy for label, xy in drawn.items() if xy[0]}
            if drawn:
                figure[panel] = drawn
        plot_curves(png_path, figure, xlabel="step", title=title)

    def mark(self) -> dict[str, float]:
        """Means of each loss over the readings since the previous mark (e.g. since the last evaluation)."""
        means = {name: total / max(count, 1) for name, (total, count) in self.marked.items()}
        self.marked = {}
        return means


class Trainer:
    """One training loop: ``run()`` calls the hooks (see the module's docstring) and does the rest.

    ``total``: the steps the run trains in all; ``start``: the steps already trained (a resumed run);
    ``state``: what a checkpoint holds; ``kind``: the checkpoint's kind field; ``checkpoint_path``:
    the state file --resume continues from. ``unit`` names a step in messages (step, iteration).
    Under torchrun the ranks agree on a stop every step, or (``agree_every_step`` False, when the
    step must not wait for the device) at each loss reading.

    The state file is written every ``checkpoint_every`` steps (0: none by count), at the first loss reading
    after ``checkpoint_minutes`` of wall time since the last one was written (0: none by time; under torchrun
    rank 0's clock decides for all), at the end, and at a stop. Writing one costs seconds (MGCC at width 64:
    0.9 GiB, fsynced): by time, its share of a run stays small however fast the steps are.
    """
    what = ""            # what is trained, in messages ("autoencoder"); "" for the script's one network
    unit = "step"
    advice = ""          # added to the non-finite messages
    agree_every_step = True
    eval_reads_losses = True  # an evaluation reads the losses back (their means go with its metrics)

    board_prefix = "train"  # TensorBoard tag of the losses: <prefix>/<loss name>

    def __init__(self, total: int, start: int, ctx, device, stop, state: TrainingState, kind: str,
                 checkpoint_path: Path, *, log_every: int, checkpoint_every: int, eval_every: int = 0,
                 progress: bool = True, stop_after: int | None = None, history: list[dict] | None = None,
                 board_dir: Path | None = None, checkpoint_minutes: float = 0.0):
        self.total, self.start, self.ctx, self.device, self.stop = total, start, ctx, device, stop
        # TensorBoard (None: off): every loss reading is logged here; the hooks add their own scalars and images
        self.board = TensorBoardLog(board_dir, enabled=board_dir is not None, writer=ctx.is_main, resume_step=start)
        self.state, self.kind, self.checkpoint_path = state, kind, checkpoint_path
        self.log_every, self.checkpoint_every, self.eval_every = log_every, checkpoint_every, eval_every
        self.progress, self.stop_after = progress, stop_after
        self.checkpoint_minutes = checkpoint_minutes
        self.last_checkpoint_time = time.monotonic()  # the interval counts from the start of this invocation
        self.losses = LossLog(device, history)
        self.done, self.stopping, self.pausing, self.timer = start, False, False, None

    # -- the hooks --------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def on_read(self, done: int, means: dict[str, float]) -> None:
        self.bar.set_postfix({name: f"{value:.4f}" for name, value in means.items()})

    def on_eval(self, done: int) -> None:
        pass

    def board_scalars(self, done: int) -> dict[str, float]:
        return {}

    def checkpoint_extra(self, done: int) -> dict:
        return {"step": done}

    def on_checkpoint(self, done: int) -> None:
        pass

    # -- the skeleton -----------------------------------------------------------------------------
    def restore(self, saved: dict | None) -> None:
        restore(self.state, saved, self.ctx, self.device)

    def stop_requested(self, read_now: bool) -> bool:
        if self.ctx.enabled and not (self.agree_every_step or read_now):
            return False  # the ranks agree at the next reading
        return stop_requested(self.stop, self.ctx, self.device)

    def checkpoint_time_due(self) -> bool:
        """checkpoint_minutes of wall time passed since the last state file (rank 0's clock under torchrun)."""
        if self.checkpoint_minutes <= 0:
            return False
        late = time.monotonic() - self.last_checkpoint_time >= self.checkpoint_minutes * 60
        return bool(distributed.broadcast_object(late)) if self.ctx.enabled else late

    def save_checkpoint(self, done: int) -> None:
        """Check the weights, gather every rank's RNG state, write the state file (rank 0), then on_checkpoint."""
        check_finite_weights(self.state.modules(), f"at {self.unit} {done}", self.checkpoint_path, self.device,
                             self.advice)
        rng = distributed.gather_objects(rng_state(self.device))  # one per rank
        extra = self.checkpoint_extra(done)  # on every rank: it may keep the step (e.g. in the run description)
        if self.ctx.is_main:
            state = to_host(self.state.state_dict(), self.device)  # one wait for the device, not one per tensor
            atomic_save({"kind": self.kind, **state, **extra, "rng": rng}, self.checkpoint_path)
            self.on_checkpoint(done)
        self.last_checkpoint_time = time.monotonic()

    def after_step(self, step: int) -> bool:
        """The bookkeeping after training step ``step``; True when the loop must stop."""
        done = self.done = step + 1
        self.bar.update(1)
        evaluate_now = due(done, self.eval_every, self.total)
        read_now = due(done, self.log_every, self.total) or (evaluate_now and self.eval_reads_losses)
        self.stopping = self.stop_requested(read_now)
        self.pausing = self.stop_after is not None and done - self.start >= self.stop_after and done < self.total
        checkpoint_now = (due(done, self.checkpoint_every, self.total) or self.stopping or self.pausing
                          or (read_now and self.checkpoint_time_due()))
        # the losses are checked before any checkpoint: a non-finite one never overwrites a good state
        if read_now or checkpoint_now:
            means = self.losses.read(done, self.what, self.unit, self.checkpoint_path, self.advice)
            self.board.scalars(done, {**means, **(self.board_scalars(done) if self.board else {})},
                               prefix=self.board_prefix)
            self.on_read(done, means)
        if evaluate_now:
            self.on_eval(done)
        if checkpoint_now:
            self.save_checkpoint(done)
        if self.timer is None and not self.stopping:
            self.timer = (done, time.perf_counter())  # the speed report leaves the first step out
        return (self.stopping or self.pausing) and done < self.total

    def run(self, desc: str) -> bool:
        """Train from ``start`` to ``total`` (or a stop); True when every step is done."""
        self.bar = tqdm(total=self.total, initial=self.start, desc=desc, dynamic_ncols=True,
                        disable=not (self.progress and self.ctx.is_main))
        try:
            for step in range(self.start, self.total):
                self.losses.add(step + 1, **self.train_step(step))
                if self.after_step(step):
                    break
        finally:
            self.board.flush()  # on disk up to the last step, also when the run stops or fails; the script closes it
        self.bar.close()
        return self.done >= self.total

    def stopped(self, script: str, *args: str, who: str = "") -> int:
        """Say how the run stopped and how to continue it; the exit status (0 after --stop-after,
        else 128 + the signal number)."""
        code = stop_status(self.stop) if self.stopping else 0
        if self.ctx.is_main:
            how = (f"by {signal.Signals(code - 128).name}" if self.stopping
                   else f"after {self.stop_after} {self.unit}s (--stop-after)")
            print(f"{who + ': ' if who else ''}stopped {how} at {self.unit} {self.done}; checkpoint written. "
                  + resume_hint(self.ctx, script, *args), file=sys.stderr if self.stopping else sys.stdout)
        return code

    def report_speed(self, name: str) -> None:
        """Steps per second since the end of this invocation's first step (start-up and warm-up left out)."""
        if self.timer is None or self.done <= self.timer[0] or not self.ctx.is_main:
            return
        steps, seconds = self.done - self.timer[0], time.perf_counter() - self.timer[1]
        print(f"{name}: {steps} steps in {seconds:.1f} s ({steps / seconds:.2f} it/s, after the first step)")
