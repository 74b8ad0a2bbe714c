"""Reduced (or longer) schedules that keep the method: ``--schedule-scale S``.

The official MGCC schedule is defined in iterations: T = 20,000 at half the labels (40,000 x the
labeled fraction), the consistency weight lambda(it) = 7 exp(-5 (1 - t/200)^2) with t = it // 150
(official train.py, ``get_current_consistency_weight(iter_num // 150)``), the learning rate
0.01 (1 - it/T)^0.9, and an evaluation after every pass over the labeled images. A run cut to
fewer iterations with these numbers is not MGCC at a smaller budget: lambda would stay near 0
(0.07 at the end of a 1,500-iteration run), and the auxiliary decoders would idle.

Scaling by S multiplies every iteration count of the schedule by S: the iterations, the
iterations per ramp step (150 S, a fraction: no rounding), the evaluation and checkpoint
intervals. Then lambda(t / T) and lr(t / T) are the published curves, at every iteration where
S x (published iteration) is whole, and a run evaluates as many times as the published one.

The published ramp does not reach its weight within the published schedule: at the last of the
20,000 iterations t = 133 of 200 and lambda = 7 exp(-5 (67/200)^2) = 3.99, not 7 (0.74 at 10,000
iterations, a quarter of the labels). :func:`final_consistency_weight` gives it for any schedule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction


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


def as_fraction(value) -> Fraction:
    """0.05 (a float, as YAML and argparse give it) -> Fraction(1, 20), exactly as written."""
    return Fraction(str(value))


@dataclass(frozen=True)
class Schedule:
    scale: Fraction
    iterations: int
    ramp_every: Fraction  # iterations per step t of the consistency ramp
    eval_every: int
    checkpoint_every: int | None


def scaled_schedule(scale, iterations: int, ramp_every, eval_every: int, checkpoint_every: int | None) -> Schedule:
    """The schedule of ``iterations`` (ramp step every ``ramp_every``, evaluation every ``eval_every``,
    checkpoints every ``checkpoint_every``; None: by wall time alone) scaled by ``scale``: every count x S,
    the iterations and intervals rounded to whole iterations (at least 1), the ramp step kept exact."""
    s = as_fraction(scale)
    if s <= 0:
        raise ValueError(f"schedule scale must be positive, got {scale}")

    def whole(count: int) -> int:
        return max(1, round(count * s))
    return Schedule(s, whole(iterations), as_fraction(ramp_every) * s, whole(eval_every),
                    whole(checkpoint_every) if checkpoint_every else None)


def batches_per_epoch(num_items: int, batch_size: int) -> int:
    """Whole batches in one pass over ``num_items`` (the incomplete tail is dropped): the iterations of
    one epoch of the labeled stream, the official loop's epoch."""
    return num_items // batch_size


def run_schedule(cfg, run_data) -> Schedule:
    """A train.py run's schedule: iterations, ramp step, evaluation and checkpoint intervals, x schedule_scale.
    The official iterations: base_iterations x the labeled fraction (a labeled list's share of the training
    list, ``run_data.labeled_share``); an evaluation per pass over ``run_data.labeled`` with eval_every epoch.
    The one place the stage-2 schedule is computed: train.py runs it, reproduce.py's estimate plans with it."""
    share = run_data.labeled_share if cfg.labeled_list else cfg.labeled_fraction
    iterations = cfg.iterations or round(cfg.base_iterations * share)
    eval_every = (batches_per_epoch(len(run_data.labeled), cfg.labeled_batch_size) if cfg.eval_every == "epoch"
                  else cfg.eval_every)
    return scaled_schedule(cfg.schedule_scale, iterations, cfg.consistency_ramp_every, eval_every, cfg.checkpoint_every)


def final_consistency_weight(weight: float, rampup: float, ramp_every, iterations: int) -> float:
    """lambda at the last iteration of a run: the weight the ramp actually reaches."""
    return consistency_weight(iterations - 1, weight, rampup, as_fraction(ramp_every))
