"""The training methods of the comparison, one small module each; train.py's loop runs any of them.

| method | module | reference |
| --- | --- | --- |
| supervised | supervised.py | the labeled images alone (MGCC's supervised loss) |
| mgcc | mgcc.py | MGCC, official code |
| mean-teacher | mean_teacher.py | SSL4MIS code/train_mean_teacher_2D.py |
| cct | cct.py | SSL4MIS code/train_cross_consistency_training_2D.py |
| cps | cps.py | SSL4MIS code/train_cross_pseudo_supervision_2D.py |
| fixmatch | fixmatch.py | UniMatch more-scenarios/medical/unimatch.py (reduced) and fixmatch.py |
| unimatch | unimatch.py | UniMatch more-scenarios/medical/unimatch.py |
| bcp | bcp.py | BCP code/ACDC_BCP_train.py |
"""
from __future__ import annotations

from networks.unet import build_network

from .augment import Intensity
from .base import Method
from .bcp import BCP, PRETRAIN_SHARE, U_WEIGHT, pretrain_iterations
from .cct import AUX_DECODERS, CrossConsistency
from .cps import CrossPseudoSupervision
from .fixmatch import FixMatch
from .mean_teacher import MeanTeacher
from .mgcc import MGCC
from .supervised import Supervised
from .unimatch import UniMatch

METHODS = {m.name: m for m in (Supervised, MGCC, MeanTeacher, CrossConsistency, CrossPseudoSupervision, FixMatch,
                               UniMatch, BCP)}
# settings whose default (None) means the reference's own value, per method
CONSISTENCY_DEFAULTS = {"mgcc": 7.0, "mean-teacher": 0.1, "cct": 0.1, "cps": 0.1}


def network_args(network: str, method: str, in_channels: int, width: int, mixer_depth: int, mixer_kernel: int) -> dict:
    """The constructor arguments of ``network`` for ``method`` (a checkpoint's model_args; build_network's after
    the network's name)."""
    args = {"in_channels": in_channels, "width": width}
    if network == "mgcc":
        args.update(mixer_depth=mixer_depth, mixer_kernel=mixer_kernel)
    elif method == "cct":
        args["aux_decoders"] = AUX_DECODERS
    return args


def build_method(method: str, network: str, model_args: dict, normalization: str = "official", consistency: float | None = None,
                 consistency_rampup: float = 200.0, consistency_ramp_every: int = 150, ema_decay: float = 0.99,
                 conf_thresh: float = 0.95, consistency_start: int | None = None, iterations: int = 0,
                 pretrain_share: float = PRETRAIN_SHARE) -> Method:
    """The method with its networks, drawn from the global torch RNG (seed it first).

    ``consistency`` None takes the reference's weight (CONSISTENCY_DEFAULTS; bcp's fixed U_WEIGHT),
    ``consistency_start`` None the reference's first iteration of the unlabeled loss (mean-teacher 1000,
    others 0); bcp pre-trains for ``pretrain_share`` of the run's ``iterations``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    student = build_network(network, **model_args)
    if method == "supervised":
        return Supervised(student)
    intensity = Intensity(model_args["in_channels"], normalization)
    if method in ("fixmatch", "unimatch"):
        return METHODS[method](student, intensity, conf_thresh=conf_thresh)
    if method == "bcp":
        return BCP(student, pretrain_iterations(pretrain_share, iterations),
                   u_weight=U_WEIGHT if consistency is None else consistency, ema_decay=ema_decay)
    ramp = {"consistency": CONSISTENCY_DEFAULTS[method] if consistency is None else consistency,
            "rampup": consistency_rampup, "ramp_every": consistency_ramp_every}
    if consistency_start is not None:
        ramp["consistency_start"] = consistency_start
    if method == "mean-teacher":
        return MeanTeacher(student, intensity, ema_decay=ema_decay, **ramp)
    if method == "cps":
        return CrossPseudoSupervision(student, build_network(network, **model_args), **ramp)  # a second random draw
    return METHODS[method](student, **ramp)
