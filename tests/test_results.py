"""protocol/results.py: paired differences with Student-t intervals, against hand-computed numbers, and
results.md over (split, seed) pairs."""
from __future__ import annotations

import pytest

from utils.metrics import METRIC_NAMES
from protocol.results import markdown, paired_difference, reading


def test_paired_difference_and_its_interval_by_hand():
    # differences 0.01, 0.03, 0.02, 0.04: mean 0.025, sd sqrt(5e-4 / 3) = 0.0129099;
    # t(0.975, 3) = 3.182446, half width 3.182446 x 0.0129099 / 2 = 0.0205426
    d = paired_difference([0.51, 0.53, 0.52, 0.54], [0.5, 0.5, 0.5, 0.5])
    assert d["n"] == 4 and d["mean"] == pytest.approx(0.025) and d["sd"] == pytest.approx(0.0129099, rel=1e-5)
    assert (d["low"], d["high"]) == pytest.approx((0.025 - 0.0205426, 0.025 + 0.0205426), rel=1e-5)
    assert reading(d) == "higher than the baseline"
    # differences 0.02, -0.01, 0.03: mean 0.0133333, sd sqrt(8.6667e-4 / 2) = 0.0208167;
    # t(0.975, 2) = 4.302653, half width 4.302653 x 0.0208167 / sqrt(3) = 0.0517118: the interval holds 0
    d = paired_difference([0.62, 0.59, 0.63], [0.6, 0.6, 0.6])
    assert (d["low"], d["high"]) == pytest.approx((0.0133333 - 0.0517118, 0.0133333 + 0.0517118), rel=1e-4)
    assert reading(d) == "no detectable difference"
    assert reading(paired_difference([0.4, 0.41], [0.5, 0.5])) == "lower than the baseline"
    one = paired_difference([0.7], [0.6])
    assert one["mean"] == pytest.approx(0.1) and one["low"] is None and reading(one) == "one pair: no interval"


def row(arm, split, seed, iou):
    return {"arm": arm, "split": split, "seed": seed, **{m: iou for m in METRIC_NAMES}, "selected_iteration": 2,
            "iterations": 2, "selection_set": "val", "train_seconds": 1.0, "predict_seconds": 1.0}


def test_results_pair_runs_by_split_and_seed():
    """Two splits x two seeds: the baseline's run of the same (split, seed) is subtracted, not another's."""
    base = {(1, 0): 0.50, (1, 1): 0.60, (2, 0): 0.40, (2, 1): 0.70}
    delta = {(1, 0): 0.01, (1, 1): 0.03, (2, 0): 0.02, (2, 1): 0.04}
    rows = [row("supervised", s, seed, v) for (s, seed), v in base.items()]
    rows += [row("mgcc-real", s, seed, base[s, seed] + delta[s, seed]) for (s, seed) in base]
    text = markdown(rows, ["supervised", "mgcc-real"], {}, ["# test"])
    assert "## Mean ± standard deviation over runs (splits 1, 2 × seeds 0, 1)" in text
    # IoU: the mean over 4 runs, 0.55 ± sd(0.5, 0.6, 0.4, 0.7) = 0.1291
    assert "| supervised | 4 | 0.5500 ± 0.1291 |" in text
    # the paired differences are those of the first hand-computed case above
    assert "| mgcc-real | IoU | 4 | 0.0250 | 0.0129 | [0.0045, 0.0455] | higher than the baseline |" in text
    assert text.count("| 1 | 0 | supervised |") == 1 and "Student's t with n − 1 degrees of freedom" in text


def test_curves_of_a_protocol_folder_are_each_run_s_evaluations_and_their_mean(tmp_path):
    """Issue 35: results_curves.png's lines from run folders of known metrics.jsonl: one line per run
    (split, seed), the mean and its SD over the iterations the runs share."""
    import json
    from types import SimpleNamespace

    import cv2
    from protocol.report import run_curves
    from protocol.results import CURVES, mean_curve, plot_curves, read_curve

    evaluations = {1: [(2, 0.1), (4, 0.3), (6, 0.5)], 2: [(2, 0.3), (4, 0.5), (6, 0.6)]}
    for seed, points in evaluations.items():
        folder = tmp_path / "out" / "split1" / f"seed{seed}" / "mgcc-real"
        folder.mkdir(parents=True)
        (folder / "metrics.jsonl").write_text("".join(
            json.dumps({"iteration": it, "set": "val", "iou": iou, "dice": 2 * iou / (1 + iou)}) + "\n"
            for it, iou in points))
    args = SimpleNamespace(out_dir=tmp_path / "out", seeds=[1, 2], arms=["mgcc-real", "supervised"])
    curves = run_curves(args, [1])
    assert curves["mgcc-real"] == [("split 1, seed 1", [2, 4, 6], [0.1, 0.3, 0.5]),
                                   ("split 1, seed 2", [2, 4, 6], [0.3, 0.5, 0.6])]
    assert curves["supervised"] == [("split 1, seed 1", [], []), ("split 1, seed 2", [], [])]  # not run: no line
    its, mean, sd = mean_curve([(its, ious) for _, its, ious in curves["mgcc-real"]])
    assert its == [2, 4, 6] and mean == pytest.approx([0.2, 0.4, 0.55])
    assert sd == pytest.approx([0.1414214, 0.1414214, 0.0707107], abs=1e-6)  # |a - b| / sqrt(2)
    # a run cut short shares only its first evaluations with the others
    its, mean, _ = mean_curve([([2, 4, 6], [0.1, 0.3, 0.5]), ([2, 4], [0.3, 0.5])])
    assert its == [2, 4] and mean == pytest.approx([0.2, 0.4])
    assert read_curve(tmp_path / "nowhere.jsonl") == ([], [])
    plot_curves(curves, tmp_path / CURVES, "toy")
    assert cv2.imread(str(tmp_path / CURVES)) is not None
