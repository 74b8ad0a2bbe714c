"""benchmarks/gpu_check.py: its tiny CPU run fills every part's rows with numbers, its Markdown parses,
and the budget cuts and skips rows with a reason instead of dropping them. Speed is never asserted."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402  (the script under test; its helpers are pure functions)
import smoke  # noqa: E402  (its smoke part)

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
                        "--methods", "supervised", "--budget-s", "3600", "--parts", "1,2,3,4", "--out-dir", str(out),
                        timeout=3600)
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
               "--methods", "supervised", "--parts", "1", "2", "3", "4", "--out-dir", str(tmp_path))
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


@pytest.mark.slow
def test_smoke_part_on_the_cpu_runs_every_script(tmp_path):
    """The smoke part as CI runs it: every script end to end on phantom data, every row ok, with its time;
    the table written as JSON and Markdown."""
    # two commands at once: CI's runners have two cores or more, each command one thread
    result = run_script("benchmarks/gpu_check.py", "--device", "cpu", "--size", "tiny", "--parts", "smoke",
                        "--smoke-jobs", "2", "--budget-s", "7200", "--out-dir", str(tmp_path), timeout=3600)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = report["rows"]
    assert report["environment"]["finished"] is True and report["parts"] == ["smoke"]
    names = [r["step"] for r in rows]
    expected = {f"train.py --method {m} --network {n}" for m in smoke.METHODS for n in smoke.NETWORKS
                if (m, n) != ("mgcc", "unet")}  # train.py refuses MGCC on the U-Net
    expected |= {"train_ldm.py --stage vae", "train_ldm.py --stage diffusion", "sample_ldm.py with its report",
                 "train.py stopped by SIGTERM", "train.py --resume after SIGTERM", "predict.py on a checkpoint",
                 "torchrun --nproc_per_node 1 train.py", "reproduce.py --jobs 1"}
    assert sorted(names) == sorted(expected) and len(names) == 15 + 8  # 8 methods x 2 networks, less one
    for r in rows:
        assert r["part"] == 0 and r["status"] == "ok", (r["step"], r["reason"], result.stderr[-3000:])
        assert finite(r["seconds"]) and r["seconds"] > 0 and Path(r["log"]).read_text().startswith("$ "), r
    assert "--precision auto --data-on-device auto" in next(r["command"] for r in rows if r["step"].endswith(
        "--method cps --network unet"))
    text = (tmp_path / "gpu_check.md").read_text()
    assert f"Smoke: {len(rows)} of {len(rows)} rows ok." in text and "Recommended" not in text
    table = markdown_tables(text)[0]
    assert table[0] == ["row", "status", "s", "first error line / reason"] and len(table) == len(rows) + 1
    assert "part smoke:" in result.stdout


def test_first_error_line():
    traceback = ("$ python train.py\nstarting\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
                 "RuntimeError: CUDA error: no kernel image is available\nsecond line of the message\n")
    assert smoke.first_error(traceback) == "RuntimeError: CUDA error: no kernel image is available"
    assert smoke.first_error("warming up\nerror: --data-dir x: no images\nTraceback\n") == "error: --data-dir x: no images"
    torchrun = ("[rank0]: Traceback (most recent call last):\n[rank0]: ValueError: bad batch\nE1202 failed\n"
                "Traceback (most recent call last):\ntorch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n")
    assert smoke.first_error(torchrun) == "ValueError: bad batch"  # the rank's error, not the agent's
    chained = "Traceback\nKeyError: 'x'\nDuring handling of the above exception\nRuntimeError: while loading\n"
    assert smoke.first_error(chained) == "KeyError: 'x'"  # the cause
    missing = "Traceback (most recent call last):\nModuleNotFoundError: No module named 'kornia.augmentation'\n"
    assert smoke.first_error(missing) == "missing kornia (No module named 'kornia.augmentation')"
    assert smoke.first_error("$ cmd\n\nKilled\n") == "Killed" and smoke.first_error("") == "no output"


def test_a_failing_row_does_not_stop_the_others_and_skips_what_needs_it(tmp_path):
    ok = smoke.Step("ok", [sys.executable, "-c", "print('fine')"])
    bad = smoke.Step("bad", [sys.executable, "-c", "raise ValueError('broken input')"])
    after = smoke.Step("after bad", [sys.executable, "-c", "print('never')"])
    unwritten = smoke.Step("no file", [sys.executable, "-c", "pass"], expect=(tmp_path / "never.txt",))
    deadline = time.monotonic() + 120
    for chain in ([bad, after], [ok], [unwritten]):
        smoke.run_chain(chain, deadline, tmp_path, dict(os.environ))
    assert bad.row["status"] == "failed" and bad.row["reason"] == "exit 1: ValueError: broken input"
    assert after.row["status"] == "skipped" and "'bad'" in after.row["reason"]
    assert ok.row["status"] == "ok" and ok.row["reason"] == "" and ok.row["seconds"] >= 0
    assert unwritten.row["status"] == "failed" and "never.txt not written" in unwritten.row["reason"]
    slow = smoke.Step("slow", [sys.executable, "-c", "import time; time.sleep(60)"])
    started = time.monotonic()
    smoke.run_chain([slow], started + 3, tmp_path, dict(os.environ))
    assert slow.row["status"] == "cut" and "budget" in slow.row["reason"] and time.monotonic() - started < 30


def test_sigterm_row_expects_a_clean_stop(tmp_path):
    """The interrupted row: SIGTERM once its file exists; exit 143 with "stopped by SIGTERM" is ok, a run
    that dies of the signal (no handler) fails saying so."""
    flag = tmp_path / "ready"
    handled = ("import pathlib, signal, sys, time\n"
               "signal.signal(signal.SIGTERM, lambda *a: (print('stopped by SIGTERM', flush=True), sys.exit(143)))\n"
               f"pathlib.Path({str(flag)!r}).touch()\ntime.sleep(60)\n")
    good = smoke.Step("handled", [sys.executable, "-c", handled], interrupt=flag)
    smoke.run_chain([good], time.monotonic() + 60, tmp_path, dict(os.environ))
    assert good.row["status"] == "ok", good.row
    flag.unlink()
    crude = smoke.Step("unhandled", [sys.executable, "-c", handled.replace("signal.signal(", "(lambda *a: None)(")], interrupt=flag)
    smoke.run_chain([crude], time.monotonic() + 60, tmp_path, dict(os.environ))
    assert crude.row["status"] == "failed" and "exit -15 after SIGTERM" in crude.row["reason"], crude.row


@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA GPU is here: --device auto is fine")
def test_device_auto_without_a_gpu_is_refused_not_a_silent_cpu_run(tmp_path):
    result = run_script("benchmarks/gpu_check.py", "--out-dir", str(tmp_path), check=False)
    assert result.returncode == 2 and "--device auto:" in result.stderr and "--device cpu" in result.stderr
    assert "CPU-only build" in result.stderr or "cannot use it" in result.stderr or "sees no CUDA" in result.stderr
    assert not (tmp_path / "gpu_check.json").exists()


@pytest.mark.slow
def test_missing_dependencies_fail_their_rows_and_the_table_is_written(tmp_path):
    """kornia and huggingface_hub made unimportable (a module that raises as a missing one does): part 1's
    rows fail "missing kornia", part 3 is skipped naming huggingface_hub; the table is there."""
    blocked = tmp_path / "blocked"
    for name in ("kornia", "huggingface_hub"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{name}'\", "
                                                     f"name={name!r})\n")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=f"{blocked}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--size",
                             "tiny", "--parts", "1,3", "--variants", "fp32 eager", "--budget-s", "1200", "--out-dir",
                             str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    part1 = [r for r in report["rows"] if r["part"] == 1 and r["variant"] == "fp32 eager"]
    assert len(part1) == 2 and all(r["status"] == "failed" and "missing kornia" in r["reason"] for r in part1), part1
    part3 = [r for r in report["rows"] if r["part"] == 3]
    assert part3 and all(r["status"] == "skipped" and "huggingface_hub" in r["reason"] for r in part3), part3
    assert report["environment"]["dependencies"]["kornia"] is not None  # installed, yet not importable here
    assert "missing kornia" in (out / "gpu_check.md").read_text()


def test_the_table_is_written_after_every_benchmark(tmp_path, monkeypatch):
    """A kill at the command limit keeps what was done: the JSON and Markdown exist, complete, after each job."""
    args = gpu_check.parse_args(["--device", "cpu", "--size", "tiny", "--parts", "1", "--out-dir", str(tmp_path)])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = gpu_check.Report(args, ["supervised"], "2026-12-02 00:00 UTC")
    report.save()  # as main() does before the first part
    seen = []

    def fake_run_job(job, deadline, logs, env, data):
        seen.append(json.loads((tmp_path / "gpu_check.json").read_text())["rows"])  # the file as it is now
        return [{**r, "it_per_s": 1.0} for r in gpu_check.mark(job.rows, "measured", "")]

    monkeypatch.setattr(gpu_check, "run_job", fake_run_job)
    plan = {1: lambda: [gpu_check.Job(1, "a", ["true"], [gpu_check.row(1, "loop", method="mgcc", variant="x")]),
                        gpu_check.Job(1, "b", ["true"], [gpu_check.row(1, "step", method="mgcc", variant="y")])]}
    monkeypatch.setattr(gpu_check, "finish_stage2", lambda rows, size: None)
    gpu_check.run_part(1, args, report, plan, time.monotonic() + 60, tmp_path / "logs", {}, None)
    assert [len(rows) for rows in seen] == [0, 1]  # job b saw job a's row already written
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["variant"] for r in written["rows"]] == ["x", "y"] and written["environment"]["finished"] is False
    assert not list(tmp_path.glob("*.tmp*"))  # written by rename: no half-written file left beside it


def test_recommendation_is_provisional_when_the_budget_cut_loop_variants():
    def loop(variant, status="measured", **values):
        return {**gpu_check.row(1, "loop", method="mgcc", variant=variant), "status": status, **values}

    rows = [loop(VARIANTS[0], it_per_s=5.0), loop(VARIANTS[1], "cut", reason="budget: its part's time ran out"),
            loop(VARIANTS[2], "skipped", reason="budget: 0 s left of part 1's time"),
            loop(VARIANTS[3], "skipped", reason="CUDA graphs: a CUDA device only")]
    advice = gpu_check.recommendation(rows, compile_limit_s=120)
    assert advice["variant"] == VARIANTS[0] and advice["provisional"] is True and advice["compared"] == [VARIANTS[0]]
    assert [r["variant"] for r in advice["not_measured"]] == [VARIANTS[1], VARIANTS[2]]  # not the CPU's CUDA graphs
    text = gpu_check.describe(advice)
    assert text.startswith("PROVISIONAL, not a default to set") and "bf16 + channels_last (cut: budget" in text
    rows[1].update(status="measured", reason="", it_per_s=9.0)
    rows[2].update(status="measured", reason="", it_per_s=12.0, compile_s=30.0)
    advice = gpu_check.recommendation(rows, compile_limit_s=120)
    assert advice["variant"] == VARIANTS[2] and advice["provisional"] is False
    assert not gpu_check.describe(advice).startswith("PROVISIONAL")


def test_loop_rows_run_train_py_with_its_own_checkpoint_interval():
    args = gpu_check.parse_args(["--device", "cpu", "--size", "tiny", "--parts", "1"])
    data = gpu_check.DataFolder("/tmp", Path("/tmp"), gpu_check.SIZES["tiny"], Path("/tmp"))
    loop = next(j for j in gpu_check.stage2_jobs(1, ["mgcc"], args, gpu_check.SIZES["tiny"], data)
                if j.name == "loop_mgcc")
    train_args = loop.command[loop.command.index("--train-args") + 1]
    assert "--checkpoint" not in train_args and train_args == "--num-workers 2"


def test_parts_by_name_and_number():
    assert gpu_check.parse_args(["--device", "cpu", "--parts", "smoke,1", "3"]).parts == [0, 1, 3]
    assert gpu_check.parse_args(["--device", "cpu"]).parts == [0, 1, 2, 3, 4]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--device", "cpu", "--parts", "5"])


@pytest.mark.slow
def test_sigterm_ends_the_running_commands_and_keeps_the_table(tmp_path):
    """A command limit's SIGTERM (gpu_run.sh's timeout): the running rows are cut, the others skipped, each
    saying so; the table is written complete and gpu_check exits 143."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    process = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--size",
                                "tiny", "--parts", "smoke", "--budget-s", "3600", "--out-dir", str(tmp_path)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "logs" / "smoke").glob("*.log")):  # the first smoke command has started
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    process.terminate()
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["environment"]["finished"] is True, stderr[-3000:]
    rows = report["rows"]
    assert len(rows) == 15 + 8 and all(r["reason"] == smoke.STOP_REASON for r in rows), (rows, stderr[-3000:])
    assert {r["status"] for r in rows} <= {"cut", "skipped"} and any(r["status"] == "cut" for r in rows)
