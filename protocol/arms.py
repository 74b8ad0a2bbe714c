"""The arms of the comparison: a method on a network with real, synthetic or no unlabeled images.

The paper's comparison is three arms (supervised, mgcc-real, mgcc-synthetic); --methods x --networks x
--unlabeled (or --arms by name) make others, named <method>[-unet][-real|-synthetic].
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

    @property
    def name(self) -> str:
        return "-".join([self.method] + (["unet"] if self.network == "unet" else []) + ([self.unlabeled] if self.unlabeled else []))

    def flags(self, samples: Path) -> list[str]:
        # the paper's arms keep their --mode flags: their finished stages in an existing --out-dir stay valid
        if self.network == "mgcc" and self.method in ("supervised", "mgcc"):
            chosen = ["--mode", self.method]
        else:
            chosen = ["--method", self.method, "--network", self.network]
        if self.unlabeled == "synthetic":
            return chosen + ["--unlabeled-dir", str(samples), "--no-unlabeled-from-train"]
        return chosen + (["--unlabeled-from-train"] if self.unlabeled == "real" else [])


def make_arms(methods, networks, unlabeled) -> list[Arm]:
    """Every valid (network, method, unlabeled) combination, baselines first; mgcc only on its network."""
    arms = []
    for network in networks:
        for method in methods:
            if method == "supervised":
                arms.append(Arm(method, network))
            elif not (method == "mgcc" and network != "mgcc"):
                arms.extend(Arm(method, network, kind) for kind in unlabeled)
    return arms


def parse_arm(name: str) -> Arm:
    """An arm from its name (supervised-unet, mgcc-real, mean-teacher-unet-synthetic...)."""
    rest, unlabeled, network = name, None, "mgcc"
    for kind in UNLABELED:
        if rest.endswith("-" + kind):
            rest, unlabeled = rest[:-len(kind) - 1], kind
    if rest.endswith("-unet"):
        rest, network = rest[:-5], "unet"
    arm = Arm(rest, network, unlabeled)
    if rest not in METHODS or (rest == "supervised") != (unlabeled is None) or (rest == "mgcc" and network != "mgcc"):
        raise ConfigError(f"--arms {name}: not an arm; arms are <method>[-unet][-real|-synthetic] with a method of "
                          f"{', '.join(METHODS)} (supervised without -real/-synthetic, mgcc without -unet), e.g. "
                          "supervised-unet, cct-real, unimatch-unet-synthetic")
    return arm
