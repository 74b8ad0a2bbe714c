"""benchmarks/gpu_check.py: its tiny CPU run fills every part's rows with numbers, its Markdown parses,
and the budget cuts and skips rows with a reason instead of dropping them. Speed is never asserted."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402  (the script under test; its helpers are pure functions)

VARIANTS = gpu_check.VARIANTS
CPU_VARIANTS = VARIANTS[:3]  # the CUDA-graph variant is reported as not run on a CPU
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu_check")
    # a budget no loaded CI machine reaches: the budget's own cut is tested below
    result = run_script("benchmarks/gpu_check.py", "--device", "cpu", "--size", "tiny", "--compile-backend", "eager",
                        "--methods", "supervised", "--budget-s", "3600", "--out-dir", str(out), timeout=3600)
    assert "part 1: stage 2" in result.stdout  # the printed table
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Each Markdown table of the text as rows of cells (the header first, the --- line dropped)."""
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            assert line.endswith("|"), line
            cells = [c.strip() for c in line[1:-1].split("|")]
            if current is None:
                current = []
                tables.append(current)
            if not all(c == "---" for c in cells):
                current.append(cells)
        else:
            current = None
    return tables


@pytest.mark.slow
def test_every_part_and_variant_row_has_numbers(tiny_run):
    report, _ = tiny_run
    env = report["environment"]
    for key in ("device", "torch", "date", "python"):
        assert env[key], key
    rows = report["rows"]
    assert sorted({r["part"] for r in rows}) == [1, 2, 3, 4]
    assert all(r["status"] in gpu_check.STATUSES for r in rows)
    for part, method in ((1, "mgcc"), (2, "supervised")):
        for benchmark in ("step", "loop"):
            found = {r["variant"]: r for r in rows if r["part"] == part and r["benchmark"] == benchmark
                     and r["method"] == method}
            assert list(found) == list(VARIANTS), (part, benchmark, list(found))
            for variant in CPU_VARIANTS:
                r = found[variant]
                assert r["status"] == "measured", r
                assert finite(r["it_per_s"]) and r["it_per_s"] > 0 and finite(r["ms_per_step"]), r
                assert math.isclose(r["ratio_to_official"], r["it_per_s"] / 3.55)
                assert finite(r["compile_s"] if benchmark == "step" else r["startup_s"]), r
            compiled = found["bf16 + channels_last + compile"]
            if benchmark == "loop":  # start-up beyond the eager bf16 loop's
                assert compiled["compile_s"] == pytest.approx(
                    max(compiled["startup_s"] - found["bf16 + channels_last"]["startup_s"], 0))
            assert "--compile" in found["bf16 + channels_last + compile"].get("train_flags", "--compile")
            graphs = found[VARIANTS[3]]
            assert graphs["status"] == "skipped" and "CUDA" in graphs["reason"], graphs
    part3 = [r for r in rows if r["part"] == 3]
    if not HAS_DIFFUSERS:
        assert part3 and all(r["status"] == "skipped" and "diffusers" in r["reason"] for r in part3)
    else:
        measured = {r["benchmark"]: r for r in part3 if r["benchmark"] != "ldm_schedule"}
        assert set(measured) == {"autoencoder training", "denoiser training", "sampling DDIM 50"}
        for r in measured.values():
            assert r["status"] == "measured" and finite(r["it_per_s"]) and r["it_per_s"] > 0, r
        schedule = {r["part_name"]: r for r in part3 if r["benchmark"] == "ldm_schedule"}
        assert {"autoencoder training", "denoiser training", "sampling DDIM 50", "total"} <= set(schedule)
        vae = schedule["autoencoder training"]
        # measured: the schedule's steps at the measured time per step
        assert math.isclose(vae["measured_minutes"], vae["count"] * measured["autoencoder training"]["ms_per_step"]
                            / 1000 / 60)
        sampling = schedule["sampling DDIM 50"]
        assert math.isclose(sampling["measured_minutes"], sampling["count"] / measured["sampling DDIM 50"]["it_per_s"] / 60)
        assert finite(schedule["total"]["measured_minutes"]) and finite(schedule["total"]["minutes"])
        assert schedule["total"]["measured_minutes"] >= vae["measured_minutes"] + sampling["measured_minutes"]
    part4 = {r.get("check") or r.get("run"): r for r in rows if r["part"] == 4}
    step = part4["step"]
    assert step["status"] == "measured" and -1 <= step["cosine_network"] <= 1 and finite(step["loss_bf16"])
    windows = [r for r in rows if r["part"] == 4 and r["benchmark"] == "loss window"]
    assert [w["iteration"] for w in windows] == [2, 4]  # tiny: 4 iterations, evaluated every 2
    for w in windows:
        assert math.isclose(w["relative_difference"], abs(w["default_loss"] - w["fp32_loss"]) / w["fp32_loss"])
    assert part4["curves"]["windows"] == 2 and isinstance(part4["curves"]["within_tolerance"], bool)


@pytest.mark.slow
def test_markdown_rows_parse(tiny_run):
    report, text = tiny_run
    assert text.startswith("### GPU check: CPU")
    tables = markdown_tables(text)
    assert len(tables) == 4  # one per part
    for table in tables:
        header, body = table[0], table[1:]
        assert body, header
        for cells in body:
            assert len(cells) == len(header), (header, cells)
    part1 = {(r[0], r[2]): dict(zip(tables[0][0], r)) for r in tables[0][1:]}
    for cells in part1.values():
        for column in ("it/s", "ms/it", "compile s", "start-up s", "x official 3.55 it/s"):
            assert cells[column] == "–" or float(cells[column]) >= 0, (column, cells)
    assert len(part1) == 2 * len(VARIANTS)
    fp32_step = part1[("step", "fp32 eager")]
    row = next(r for r in report["rows"] if r["part"] == 1 and r["benchmark"] == "step" and r["variant"] == "fp32 eager")
    assert float(fp32_step["it/s"]) == pytest.approx(row["it_per_s"], abs=0.006)
    assert fp32_step["peak GiB"] == "–"  # not measured on a CPU: a dash, never a made-up number
    assert part1[("step", VARIANTS[3])]["status"].startswith("skipped: CUDA graphs")


@pytest.mark.slow
def test_budget_marks_later_parts_skipped_with_the_reason(tmp_path):
    """A budget too small to start anything: every row of every part is there, skipped, saying why."""
    run_script("benchmarks/gpu_check.py", "--device", "cpu", "--size", "tiny", "--budget-s", "1",
               "--methods", "supervised", "--out-dir", str(tmp_path))
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = report["rows"]
    assert sorted({r["part"] for r in rows}) == [1, 2, 3, 4]
    assert len([r for r in rows if r["part"] == 1]) == 2 * len(VARIANTS)
    for r in rows:
        assert r["status"] == "skipped", r
        assert "budget" in r["reason"] or "CUDA" in r["reason"] or "diffusers" in r["reason"], r
    assert "skipped: budget" in (tmp_path / "gpu_check.md").read_text()
    assert report["recommendation"] is None


@pytest.mark.slow  # runs training steps for seconds to minutes: out of the fast tier
def test_a_benchmark_past_its_deadline_is_cut_keeping_its_rows(tmp_path):
    """The process is killed at the part's deadline; the rows it printed are kept, the rest are cut."""
    script = ("import json, time; print(json.dumps({'variant': 'a', 'it_per_s': 2.0}), flush=True); "
              "time.sleep(60); print(json.dumps({'variant': 'b', 'it_per_s': 3.0}))")
    job = gpu_check.Job(1, "sleeper", [sys.executable, "-c", script],
                        [gpu_check.row(1, "step", variant="a"), gpu_check.row(1, "step", variant="b")])
    started = time.monotonic()
    rows = gpu_check.run_job(job, started + gpu_check.MIN_START_S + 3, tmp_path, dict(os.environ), None)
    assert time.monotonic() - started < 30  # killed, not waited for
    assert rows[0]["status"] == "measured" and rows[0]["it_per_s"] == 2.0
    assert rows[1]["status"] == "cut" and "budget" in rows[1]["reason"]
    assert (tmp_path / "sleeper.log").read_text().startswith("$ ")  # the command, for a rerun


def test_accuracy_verdict_by_window():
    rows = [{**gpu_check.row(4, "train.py loss curve", run="fp32"), "status": "measured", "curve": [[50, 1.0], [100, 0.5]]},
            {**gpu_check.row(4, "train.py loss curve", run="default"), "status": "measured",
             "curve": [[50, 1.05], [100, 0.6]]}]
    out = gpu_check.finish_accuracy(rows, tolerance=0.1)
    assert [r["relative_difference"] for r in out[:2]] == pytest.approx([0.05, 0.2])
    assert [r["within_tolerance"] for r in out[:2]] == [True, False]
    assert out[2]["within_tolerance"] is False and out[2]["max_relative_difference"] == pytest.approx(0.2)
    assert gpu_check.finish_accuracy(rows, tolerance=0.25)[2]["within_tolerance"] is True
    cut = [rows[0], {**rows[1], "status": "cut", "reason": "budget: its part's time ran out", "curve": None}]
    verdict = gpu_check.finish_accuracy(cut, tolerance=0.1)
    assert len(verdict) == 1 and verdict[0]["status"] == "skipped" and "budget" in verdict[0]["reason"]


def test_recommendation_is_the_fastest_loop_that_compiles_in_time():
    def measured(benchmark, variant, **values):
        return {**gpu_check.row(1, benchmark, method="mgcc", variant=variant), "status": "measured", **values}

    rows = [measured("step", VARIANTS[2], compile_s=200.0), measured("step", VARIANTS[3], compile_s=90.0),
            measured("loop", VARIANTS[1], it_per_s=9.0), measured("loop", VARIANTS[2], it_per_s=15.0),
            measured("loop", VARIANTS[3], it_per_s=12.0, train_flags="--compile")]
    advice = gpu_check.recommendation(rows, compile_limit_s=120)
    assert advice["variant"] == VARIANTS[3] and advice["loop_it_per_s"] == 12.0 and advice["compile_s"] == 90.0
    assert gpu_check.recommendation(rows, compile_limit_s=300)["variant"] == VARIANTS[2]
    assert gpu_check.recommendation(rows, compile_limit_s=10)["variant"] == VARIANTS[1]
    rows[3]["compile_s"] = 100.0  # the loop's own compile time wins over its step's
    assert gpu_check.recommendation(rows, compile_limit_s=120)["variant"] == VARIANTS[2]
