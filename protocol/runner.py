"""Running a protocol's stages: here one after another or side by side, one stage alone (a cluster job's
--stage), or as cluster jobs; and the closing table of estimated against measured times."""
from __future__ import annotations

import sys
from pathlib import Path

from utils.config import ConfigError

from . import cluster
from .estimate import estimate, print_plan
from .ledger import Ledger, Stage, check_plan, execute, format_seconds
from .parallel import log_path, run_side_by_side
from .plan import ROOT
from .report import device_description


def run_one_stage(args, stages: list[Stage], ledger: Ledger) -> int:
    """--stage NAME: that stage alone, as a local run would run it (what each cluster job does)."""
    by_name = {stage.name: stage for stage in stages}
    if args.stage not in by_name:
        raise ConfigError(f"--stage {args.stage}: no such stage in this plan; its stages are "
                          + ", ".join(by_name))
    stage = by_name[args.stage]
    missing = [dep for dep in stage.depends if not ledger.stages.get(dep, {}).get("finished")]
    if missing:
        raise ConfigError(f"--stage {stage.name} reads {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                          "not done yet")
    statuses = check_plan([stage], ledger)
    code = execute([stage], ledger, statuses, ROOT)
    if code == 0:  # the device the job ran on (results.md names it, not the device of the host that collects)
        described = device_description(args.device)
        with ledger.transaction():
            if stage.name in ledger.stages:
                ledger.stages[stage.name]["device"] = described
    return code


def refuse_if_jobs_active(args, ledger: Ledger) -> None:
    """A local run of a folder whose cluster jobs have not ended would run their stages twice."""
    if args.launcher == "local" and ledger.jobs:
        if running := cluster.active_jobs(ledger):
            raise ConfigError(f"{len(running)} cluster jobs of {args.out_dir} have not ended ("
                              + ", ".join(f"{n}: job {i}" for n, i in list(running.items())[:5])
                              + "): rerun with their --launcher to see them, or cancel them first")


def submit_jobs(args, stages: list[Stage], ledger: Ledger, statuses: dict[str, str], device: str) -> int:
    """--launcher slurm | submitit-local: a job per stage not done; the number of jobs not ended."""
    gpus = cluster.job_gpus(args.launcher, device, args.slurm_gpus_per_job, args.nproc_per_node)
    executor = cluster.make_executor(args.launcher, args.out_dir.resolve() / "submitit", args.slurm_time,
                                     args.slurm_partition, gpus, args.slurm_options)
    command = lambda stage: [sys.executable, str(ROOT / "reproduce.py"), *args.argv, "--stage", stage.name,
                             "--no-estimate"]
    states = cluster.submit(stages, ledger, statuses, executor, args.launcher, command, Path.cwd(), log_path)
    if states:
        print(f"\n{'stage':32s} {'job':>10s}  state")
        for name, state in states.items():
            print(f"{name:32s} {ledger.jobs[name]['id']:>10s}  {state}")
        submitted = sum(state == "SUBMITTED" for state in states.values())
        print(f"\n{submitted} jobs submitted, {len(states) - submitted} queued or running before; rerun this command "
              f"to see them, and once they have ended to collect the results (job logs: {executor.folder})", flush=True)
    return len(states)


def run_here(args, stages: list[Stage], ledger: Ledger, statuses: dict[str, str], device: str, slots) -> int:
    """The estimate and the plan, then every stage not done: one after another, or --jobs N side by side."""
    if args.estimate and any(status != "done" for status in statuses.values()):
        estimate(stages, statuses, ledger, device, args.nproc_per_node)
    print_plan(stages, statuses)
    if args.jobs > 1:
        return run_side_by_side(stages, ledger, statuses, ROOT, slots, live=args.progress and sys.stdout.isatty())
    return execute(stages, ledger, statuses, ROOT)


def print_times(stages: list[Stage], ledger: Ledger, jobs: int) -> None:
    """Each stage's estimated and measured time, and how the estimated stages compared in all."""
    print(f"\n{'stage':32s} {'estimate':>10s} {'measured':>10s}")
    for stage in stages:
        print(f"{stage.name:32s} {format_seconds(stage.estimate):>10s} {format_seconds(ledger.seconds(stage.name)):>10s}")
    total = sum(ledger.seconds(s.name) or 0 for s in stages)
    estimated = [(s.estimate, ledger.seconds(s.name)) for s in stages if s.estimate is not None and ledger.seconds(s.name)]
    print(f"total measured: {format_seconds(total)}" + (
        f"; the stages estimated took {sum(m for _, m in estimated) / sum(e for e, _ in estimated):.2f} x their "
        "estimate" if estimated else "") + (f" (stage time summed: with --jobs {jobs} they overlapped)"
                                            if jobs > 1 else ""))
