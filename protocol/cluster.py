"""Stages as cluster jobs through submitit: ``reproduce.py --launcher slurm``.

Each stage that is not done becomes one job, submitted at once with the dependencies the stages have
(``--dependency afterok:<ids>``, and ``--kill-on-invalid-dep yes`` so that the jobs after a failed one
end instead of waiting for ever). The submitting command then returns: nothing has to stay logged in.
A job runs ``python reproduce.py <the same options> --stage NAME``, which checks, runs and records that
one stage exactly as a local run would, in the same ledger (``stages.json``, updated under its lock by
every job) and the same folders; the stage's output goes to ``<folder>.log`` beside its folder, and
submitit's own log of the job to ``<out>/submitit/``.

Rerunning the command looks up every recorded job: one still pending or running is reported, never
submitted again; a stage whose job ended without finishing is submitted again (it resumes from its
last checkpoint); when every stage is done, the results are collected as after a local run.

Preemption and time limits: SLURM sends SIGUSR2 ``signal_delay_s`` before a job's time limit (and on
preemption, where a cluster signals preempted jobs so); submitit then calls :meth:`StageJob.checkpoint`,
which passes SIGTERM to the stage (it finishes its step and checkpoints, as on Ctrl-C), and requeues the
job, which resumes the stage. The stage itself ignores SIGUSR2, which SLURM sends to every process of
the job. ``--launcher submitit-local`` runs the same jobs on this machine through submitit's local
executor, which has no dependencies of its own: there each job first waits for the stages it depends on.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

from utils.config import ConfigError
from .ledger import Ledger, Stage, child_environment, parent_death_signal

# sacct's states of a job that has not ended (https://slurm.schedmd.com/sacct.html#SECTION_JOB-STATE-CODES)
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
                 "CONFIGURING", "COMPLETING", "STAGE_OUT", "SIGNALING", "UNKNOWN"}
LAUNCHERS = ("local", "slurm", "submitit-local")
WAIT_SECONDS = 2.0


def ignore_usr2_and_end_with_parent() -> Callable[[], None]:
    """A preexec_fn: the child ignores SIGUSR2 (SLURM's early warning, meant for the job's checkpoint
    handler, not for the stage, which it would kill) and gets SIGTERM when its parent dies."""
    end_with_parent = parent_death_signal()

    def preexec() -> None:
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        if end_with_parent is not None:
            end_with_parent()
    return preexec


class StageJob:
    """One stage as a submitit job (a picklable callable with a ``checkpoint`` method)."""

    def __init__(self, name: str, command: list[str], cwd: str, ledger_path: str, log: str,
                 depends: Sequence[str] = ()):
        self.name, self.command, self.cwd = name, list(command), cwd
        self.ledger_path, self.log, self.depends = ledger_path, log, list(depends)
        self._child: subprocess.Popen | None = None
        self._requeued = False

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_child", "_requeued")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _child=None, _requeued=False)

    def __call__(self) -> int:
        ledger = Ledger(Path(self.ledger_path))
        ledger.set_job(self.name, state="running", host=socket.gethostname(), pid=os.getpid(),
                       started=datetime.now().isoformat(timespec="seconds"))
        code = None
        try:
            self.wait_for_inputs(ledger)
            Path(self.log).parent.mkdir(parents=True, exist_ok=True)
            with open(self.log, "ab") as log:
                log.write(f"\n=== {self.name} [job on {socket.gethostname()}] "
                          f"{datetime.now().isoformat(timespec='seconds')}\n".encode())
                log.flush()
                self._child = subprocess.Popen(self.command, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, env={**child_environment(),
                                                                              "PYTHONUNBUFFERED": "1"},
                                               start_new_session=True, preexec_fn=ignore_usr2_and_end_with_parent())
                # polled, not waited on: checkpoint() runs in a signal handler and must not block on a wait
                while (code := self._child.poll()) is None:
                    time.sleep(0.5)
        finally:
            if not self._requeued:
                ledger.set_job(self.name, state="ended", exit_status=code)
        if code != 0:
            raise RuntimeError(f"stage {self.name} exited with status {code}; its log: {self.log}")
        return code

    def wait_for_inputs(self, ledger: Ledger) -> None:
        """Under SLURM the dependencies already held this job back; under the local executor, wait here."""
        while True:
            ledger.reload()
            pending = [d for d in self.depends if not ledger.stages.get(d, {}).get("finished")]
            if not pending:
                return
            ended = [d for d in pending if ledger.jobs.get(d, {}).get("state") == "ended"]
            if ended:
                raise RuntimeError(f"stage {self.name} needs {', '.join(ended)}, whose job ended unfinished")
            time.sleep(WAIT_SECONDS)

    def checkpoint(self, *args, **kwargs):
        """submitit's hook on SIGUSR2: the stage checkpoints, and the job is requeued to resume it."""
        import submitit

        self._requeued = True
        if self._child is not None and self._child.poll() is None:
            self._child.send_signal(signal.SIGTERM)
            while self._child.poll() is None:
                time.sleep(0.2)
        ledger = Ledger(Path(self.ledger_path))
        ledger.set_job(self.name, state="requeued", requeues=ledger.jobs.get(self.name, {}).get("requeues", 0) + 1)
        return submitit.helpers.DelayedSubmission(StageJob(self.name, self.command, self.cwd, self.ledger_path,
                                                           self.log, self.depends))


def job_states(records: dict[str, dict]) -> dict[str, str]:
    """{stage: 'ended', or the scheduler's state of a job that has not ended (PENDING, RUNNING, ...,
    UNKNOWN when SLURM's accounting does not answer: then it is taken for running, never submitted
    twice)} for the recorded jobs. The SLURM ones are asked about in one sacct call."""
    states, slurm = {}, {}
    for name, record in records.items():
        if record.get("state") == "ended":  # the job said so itself, as it ended
            states[name] = "ended"
        elif record["launcher"] == "slurm":
            import submitit
            slurm[name] = submitit.SlurmJob(folder=record["folder"], job_id=str(record["id"]))  # registers it
        elif record.get("submit_host") != socket.gethostname():
            states[name] = "UNKNOWN"
        else:  # submitit's local executor: the job is its controller process, on the host that submitted it
            try:
                command = Path(f"/proc/{int(record['id'])}/cmdline").read_bytes()
            except (OSError, ValueError):
                command = b""
            states[name] = "RUNNING" if b"submitit" in command else "ended"
    if slurm:
        # one forced update for every registered job: submitit's watcher would otherwise ask sacct about
        # the first job only and answer UNKNOWN for the others for the next 2 s
        next(iter(slurm.values())).watcher.update()
        for name, job in slurm.items():
            state = (job.watcher.get_state(job.job_id, mode="cache") or "UNKNOWN").split()[0]  # "CANCELLED by 12"
            states[name] = state if state in ACTIVE_STATES else "ended"
    return states


def read_options(path: Path) -> dict:
    """A YAML mapping of submitit executor options (SlurmExecutor's names: partition, time, mem,
    cpus_per_task, constraint, account, qos, additional_parameters, ...)."""
    import yaml

    try:
        options = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"--slurm-options {path}: cannot be read as YAML ({error})") from None
    if not isinstance(options, dict):
        raise ConfigError(f"--slurm-options {path}: a YAML mapping of submitit executor options was expected")
    return options


def job_gpus(launcher: str, device: str, requested: int | None, nproc_per_node: int) -> int:
    """GPUs each job asks for: --slurm-gpus-per-job when given; none with --device cpu; else, for SLURM,
    --nproc-per-node whatever this host has: a login node without a GPU would resolve --device auto to the
    CPU and every job would ask for 0 GPUs. Each job resolves --device itself, on its node. submitit-local's
    jobs run here, so this host's device decides."""
    if requested is not None:
        return requested
    if device == "cpu":
        return 0
    if launcher == "slurm":
        return nproc_per_node
    from utils.runtime import resolve_device
    return nproc_per_node if resolve_device(device).type == "cuda" else 0


def make_executor(launcher: str, folder: Path, time_min: int, partition: str | None, gpus_per_job: int,
                  options_file: Path | None):
    """The submitit executor of ``launcher``, with the job options every stage shares."""
    import submitit

    options = read_options(options_file) if options_file else {}
    if launcher == "slurm":
        try:
            executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=options.pop("max_num_timeout", 3))
        except RuntimeError as error:  # no srun on the PATH
            raise ConfigError(f"--launcher slurm: {error} Submit from a SLURM login node, or run here with "
                              "--launcher local (--jobs N)") from None
        shared = {"time": time_min, "gpus_per_node": gpus_per_job, "ntasks_per_node": 1, "signal_delay_s": 120,
                  **({"partition": partition} if partition else {})}
    else:
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=options.pop("max_num_timeout", 3))
        shared = {"timeout_min": time_min, "gpus_per_node": gpus_per_job, "signal_delay_s": 120}
    try:
        executor.update_parameters(**{**shared, **options})
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{options_file or '--slurm options'}: {error}") from None
    executor.shared_additional = dict(executor.parameters.get("additional_parameters", {}) or {})
    return executor


@contextmanager
def outputs_not_inherited(detach: bool):
    """While submitit's local executor starts a job's controller, this process's stdout and stderr are
    /dev/null: the controller outlives this command, and holding its pipe (``| tee log``, a test's
    captured output) would keep that open until every job had ended. The jobs' output goes to files."""
    if not detach:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def submit(stages: Sequence[Stage], ledger: Ledger, statuses: dict[str, str], executor, launcher: str,
           command: Callable[[Stage], list[str]], cwd: Path, log: Callable[[Stage], Path]) -> dict[str, str]:
    """Submit a job for every stage that is not done and has no job pending or running, depending on
    the jobs of its inputs. Returns {stage name: state} of every stage not done (SUBMITTED for new ones)."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), os.environ.get("PYTHONPATH")]))
    states, ids = {}, {}
    known = job_states({s.name: ledger.jobs[s.name] for s in stages
                        if statuses[s.name] != "done" and "id" in ledger.jobs.get(s.name, {})})
    for stage in stages:
        if statuses[stage.name] == "done":
            continue
        record = ledger.jobs.get(stage.name)
        state = known.get(stage.name, "ended")
        if state != "ended":
            states[stage.name], ids[stage.name] = state, str(record["id"])
            continue
        after = [ids[d] for d in stage.depends if d in ids]
        if launcher == "slurm":
            extra = dict(executor.shared_additional)
            if after:
                extra.update({"dependency": "afterok:" + ":".join(after), "kill_on_invalid_dep": "yes"})
            executor.update_parameters(job_name=f"mgcc:{stage.name}", additional_parameters=extra)
        with outputs_not_inherited(launcher == "submitit-local"):
            job = executor.submit(StageJob(stage.name, command(stage), str(cwd), str(ledger.path), str(log(stage)),
                                           depends=[d for d in stage.depends if d in ids]))
        ledger.set_job(stage.name, launcher=launcher, id=str(job.job_id), folder=str(executor.folder),
                       submit_host=socket.gethostname(), state="submitted", after=after,
                       submitted=datetime.now().isoformat(timespec="seconds"))
        states[stage.name], ids[stage.name] = "SUBMITTED", str(job.job_id)
        print(f"=== {stage.name}: job {job.job_id} submitted" + (f", after {', '.join(after)}" if after else ""),
              flush=True)
    return states


def active_jobs(ledger: Ledger) -> dict[str, str]:
    """{stage: job id} of the jobs recorded in the ledger that have not ended."""
    states = job_states({name: record for name, record in ledger.jobs.items() if "id" in record})
    return {name: str(ledger.jobs[name]["id"]) for name, state in states.items() if state != "ended"}
