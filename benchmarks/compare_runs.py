"""Compare train.py runs: one table of a validation metric at every evaluated iteration, and a PNG.

    python benchmarks/compare_runs.py runs/fp32 runs/bf16 --labels fp32 bf16 --png runs/fp32_vs_bf16.png

Each run folder's metrics.jsonl (written by train.py at every evaluation) gives the rows: the metric
of each run at each iteration, then the best value and where it was reached. The PNG shows the
metric and the training loss of all runs, one curve per run. This is how a speed option is shown
not to move accuracy (benchmarks/RESULTS.md), or MGCC set beside the supervised baseline.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataloaders.io import DataError  # noqa: E402
from utils.cli import run_cli  # noqa: E402
from utils.metrics import METRIC_NAMES  # noqa: E402
from utils.plots import plot_curves  # noqa: E402


def read_history(run_dir: Path) -> list[dict]:
    """The evaluation records of one run, in order; DataError naming the file if there are none."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run_dir} is not a train.py run folder: {path.name} not found")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {number} is not JSON ({error.msg})") from None
    if not records:
        raise DataError(f"{path} holds no evaluation yet")
    return records


def comparison_table(histories: dict[str, list[dict]], metric: str) -> str:
    """Rows: iteration, then the metric of each run there ('-' where a run did not evaluate)."""
    labels = list(histories)
    by_iteration = {label: {r["iteration"]: r[metric] for r in h} for label, h in histories.items()}
    iterations = sorted({it for values in by_iteration.values() for it in values})
    width = max(13, *(len(label) for label in labels))
    lines = [f"{'iteration':>9s}  " + "  ".join(f"{label:>{width}s}" for label in labels)]
    for it in iterations:
        cells = [f"{by_iteration[label][it]:{width}.4f}" if it in by_iteration[label] else f"{'-':>{width}s}"
                 for label in labels]
        lines.append(f"{it:9d}  " + "  ".join(cells))
    best = [max(h, key=lambda r: r[metric]) for h in histories.values()]
    cells = [f"{b[metric]:.4f} @{b['iteration']}" for b in best]
    lines.append(f"{'best':>9s}  " + "  ".join(f"{cell:>{width}s}" for cell in cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="train.py run folders (each with metrics.jsonl)")
    parser.add_argument("--labels", nargs="+", help="a name per run (default: the folder names)")
    parser.add_argument("--metric", default="iou", choices=METRIC_NAMES, help="validation metric (default: iou)")
    parser.add_argument("--png", type=Path, help="write the curves to this PNG (default: no figure)")
    args = parser.parse_args(argv)
    labels = args.labels or [run.name for run in args.runs]
    if len(labels) != len(args.runs) or len(set(labels)) != len(labels):
        parser.error(f"--labels needs {len(args.runs)} distinct names, got {labels}")
    histories = {label: read_history(run) for label, run in zip(labels, args.runs)}
    set_name = histories[labels[0]][0]["set"]
    print(f"{args.metric} on {set_name} at each evaluation")
    print(comparison_table(histories, args.metric))
    if args.png:
        curves = lambda key: {label: ([r["iteration"] for r in h], [r[key] for r in h])  # noqa: E731
                              for label, h in histories.items()}
        plot_curves(args.png, {f"{set_name} {args.metric}": curves(args.metric),
                               "training loss (mean since last evaluation)": curves("train_loss")})
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    run_cli(main)
