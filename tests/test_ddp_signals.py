"""`charmlp train` under torchrun (2 CPU processes, gloo): Ctrl-C, SIGTERM and a lost peer.

* Ctrl-C (SIGINT to the whole process group, as a terminal sends it; torchrun then forwards
  a second SIGINT to each worker) and SIGTERM to a single rank both stop every rank at the
  same step with a checkpoint there; resuming it gives bitwise the uninterrupted run.
* A stopped peer (SIGSTOP) ends the other rank within the collective timeout
  (``CHARMLP_DIST_TIMEOUT``), with a one-line error, instead of gloo's 30 minutes.

Every signal is sent only once the run has made progress (its first periodic checkpoint
exists), so the tests do not depend on how fast the machine starts the workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from charmlp.checkpoint import CHECKPOINT_NAME, load_checkpoint

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with gloo is not available"),
    pytest.mark.skipif(not Path("/proc/self/environ").exists(),
                       reason="finds the torchrun workers through /proc"),
]

ARGS = ["--hidden", "32", "--init", "default", "--lr-schedule", "constant", "--lr", "0.1",
        "--eval-every", "0", "--samples", "2", "-q"]


def _cmd(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "charmlp", "train", *args]


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _torchrun(*args, timeout=300):
    r = subprocess.run(_cmd(*args), capture_output=True, text=True, timeout=timeout, env=_env())
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


class _Job:
    """A long torchrun training in its own session (its own process group, like a job
    started from a terminal), with its output in files."""

    def __init__(self, tmp_path: Path, run: Path, **env):
        self.out, self.err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                _cmd("--steps", "1000000", "--checkpoint-every", "50", *ARGS, "--out", str(run)),
                stdout=out, stderr=err, env=_env(**env), start_new_session=True)
        deadline = time.monotonic() + 180
        while not (run / CHECKPOINT_NAME).exists():  # progress: the first checkpoint
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"the torchrun job did not start:\n{self.stderr()}")
            time.sleep(0.05)

    def workers(self) -> dict[int, int]:
        """rank -> pid of the worker processes (children of the torchrun agent)."""
        found = self._children()
        assert sorted(found) == [0, 1], found
        return found

    def _children(self) -> dict[int, int]:
        found = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid != self.proc.pid:
                    continue
                env = dict(kv.split("=", 1) for kv in (d / "environ").read_bytes().decode().split("\0")
                           if "=" in kv)
                found[int(env["RANK"])] = int(d.name)
            except (OSError, ValueError, KeyError, IndexError):
                continue  # (a process that just exited, or not a worker)
        return found

    def wait(self, timeout=120) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        # torchrun starts each worker in a session of its own, so killing the agent's
        # process group leaves them running (a stopped peer's partner then waits forever):
        # the workers are killed by pid first.
        if self.proc.poll() is None:
            for pid in self._children().values():
                for sig in (signal.SIGKILL, signal.SIGCONT):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
                os.killpg(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def stderr(self) -> str:
        return self.err.read_text()


def _stopped_consistently(run: Path, stderr: str) -> int:
    """The step the run stopped at: rank 0 said so once, and the checkpoint and the
    metrics end there."""
    assert stderr.count("interrupted at step") == 1, stderr  # (rank 0 alone tells)
    step = int(stderr.split("interrupted at step ")[1].split(";")[0].replace(",", ""))
    ckpt = load_checkpoint(run)
    assert ckpt["step"] == step and ckpt["world_size"] == 2 and len(ckpt["rng"]["batch"]) == 2
    assert len((run / "metrics.csv").read_text().splitlines()) == 1 + step
    return step


def test_ctrl_c_under_torchrun_checkpoints_and_resumes_exactly(tmp_path):
    run = tmp_path / "run"
    job = _Job(tmp_path, run)
    os.killpg(job.proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: torchrun and both workers
    job.wait()
    step = _stopped_consistently(run, job.stderr())
    assert step >= 50

    total = step + 40
    r = _torchrun("--resume", str(run), "--steps", str(total), "-q")
    assert f"resuming at step {step:,}" in r.stdout
    ref = tmp_path / "ref"
    _torchrun("--steps", str(total), "--checkpoint-every", "50", *ARGS, "--out", str(ref))
    got, want = load_checkpoint(run)["model"]["state_dict"], load_checkpoint(ref)["model"]["state_dict"]
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert (run / "metrics.csv").read_text() == (ref / "metrics.csv").read_text()


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    run = tmp_path / "run"
    job = _Job(tmp_path, run)
    os.kill(job.workers()[1], signal.SIGTERM)  # e.g. a scheduler preempting one worker
    job.wait()
    step = _stopped_consistently(run, job.stderr())
    r = _torchrun("--resume", str(run), "--steps", str(step + 10), "-q")
    assert f"resuming at step {step:,}" in r.stdout
    assert load_checkpoint(run)["step"] == step + 10


def test_a_stopped_peer_ends_the_job_within_the_timeout(tmp_path):
    run = tmp_path / "run"
    timeout = 3
    job = _Job(tmp_path, run, CHARMLP_DIST_TIMEOUT=str(timeout))
    try:
        workers = job.workers()
        os.kill(workers[1], signal.SIGSTOP)
        t0 = time.monotonic()
        # Rank 0 gives up after the timeout (torchrun then needs its own --shutdown-timeout,
        # 30 s, to SIGKILL the stopped process: the test does not wait for that).
        while "lost contact with another rank" not in job.stderr():
            assert time.monotonic() - t0 < timeout + 30, job.stderr()
            time.sleep(0.1)
        waited = time.monotonic() - t0
        line = next(l for l in job.stderr().splitlines() if "lost contact" in l)
        assert line.startswith("charmlp train: error: rank 0: lost contact with another rank")
        assert f"at most {timeout} s, $CHARMLP_DIST_TIMEOUT" in line
        assert timeout - 0.5 <= waited
        load_checkpoint(run)  # the last periodic checkpoint is intact
    finally:
        job.kill()
