"""The arms of the comparison: a method on a network with real, synthetic or no unlabeled images, and with
or without synthetic labeled pairs.

The paper's comparison is three arms (supervised, mgcc-real, mgcc-synthetic); --methods x --networks x
--unlabeled (or --arms by name) make others, named <method>[-unet][-real|-synthetic][-pairs]. An arm ending in
-pairs also trains on the split's synthetic image-mask pairs (train.py --synthetic-pairs: the samples of a
mask-conditioned generator trained on the arms' labeled images), e.g. supervised-pairs, mgcc-real-pairs,
mgcc-synthetic-pairs: one table then compares the two uses of a generator (issue 31).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from methods import METHODS
from utils.config import ConfigError

ARMS = ("supervised", "mgcc-real", "mgcc-synthetic")  # the default arms: the paper's own comparison
NETWORKS = ("mgcc", "unet")
UNLABELED = ("real", "synthetic")
BASELINES = ("supervised", "supervised-unet")


@dataclass(frozen=True)
class Arm:
    """One training configuration of the comparison: a method on a network with real or synthetic unlabeled images."""
    method: str
    network: str = "mgcc"
    unlabeled: str | None = None  # None for supervised
    pairs: bool = False  # also the split's synthetic labeled pairs

    @property
    def name(self) -> str:
        return "-".join([self.method] + (["unet"] if self.network == "unet" else []) + ([self.unlabeled] if self.unlabeled else [])
                        + (["pairs"] if self.pairs else []))

    def flags(self, samples: Path, pairs: Path | None = None) -> list[str]:
        # the paper's arms keep their --mode flags: their finished stages in an existing --out-dir stay valid
        if self.network == "mgcc" and self.method in ("supervised", "mgcc"):
            chosen = ["--mode", self.method]
        else:
            chosen = ["--method", self.method, "--network", self.network]
        if self.pairs:
            chosen += ["--synthetic-pairs", str(pairs)]
        if self.unlabeled == "synthetic":
            return chosen + ["--unlabeled-dir", str(samples), "--no-unlabeled-from-train"]
        return chosen + (["--unlabeled-from-train"] if self.unlabeled == "real" else [])


def make_arms(methods, networks, unlabeled, pairs=(False,)) -> list[Arm]:
    """Every valid (network, method, unlabeled) combination, baselines first; mgcc only on its network; each
    without, then with the synthetic pairs, as ``pairs`` asks."""
    arms = []
    for network in networks:
        for method in methods:
            if method == "supervised":
                arms.extend(Arm(method, network, pairs=p) for p in pairs)
            elif not (method == "mgcc" and network != "mgcc"):
                arms.extend(Arm(method, network, kind, p) for kind in unlabeled for p in pairs)
    return arms


def parse_arm(name: str) -> Arm:
    """An arm from its name (supervised-unet, mgcc-real, mean-teacher-unet-synthetic, mgcc-real-pairs...)."""
    rest, unlabeled, network, pairs = name, None, "mgcc", False
    if rest.endswith("-pairs"):
        rest, pairs = rest[:-len("-pairs")], True
    for kind in UNLABELED:
        if rest.endswith("-" + kind):
            rest, unlabeled = rest[:-len(kind) - 1], kind
    if rest.endswith("-unet"):
        rest, network = rest[:-5], "unet"
    arm = Arm(rest, network, unlabeled, pairs)
    if rest not in METHODS or (rest == "supervised") != (unlabeled is None) or (rest == "mgcc" and network != "mgcc"):
        raise ConfigError(f"--arms {name}: not an arm; arms are <method>[-unet][-real|-synthetic][-pairs] with a "
                          f"method of {', '.join(METHODS)} (supervised without -real/-synthetic, mgcc without -unet), "
                          "e.g. supervised-unet, cct-real, unimatch-unet-synthetic, supervised-pairs, mgcc-real-pairs")
    return arm
