"""SIGTERM, SIGINT and SIGKILL on a closed-loop run with worker processes: no child outlives the
run, and the finished episodes stay in the results file."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prunebench.evaluation.libero_env import libero_available
from prunebench.runtime.interrupts import Interrupted, exit_code

pytestmark = [pytest.mark.libero,
              pytest.mark.skipif(not libero_available(), reason="LIBERO not installed (extra 'libero')")]


def children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_signal_stops_every_worker_and_keeps_finished_episodes(tmp_path, signum):
    out = tmp_path / "run.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "prunebench.cli.main", "run", "--suite", "libero_object", "--tasks", "0",
         "--episodes", "20", "--workers", "2", "--strategy", "none", "--render-quality", "fast",
         "--fast-reset", "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        # as from a terminal: a test run started in the background (`cmd &`) inherits SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline:  # wait for the first finished episode
        try:
            if json.loads(out.read_text())["episodes"]:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("no episode finished in time")
    workers = children(proc.pid)
    assert workers, "the run should have worker processes"
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)  # Ctrl-C reaches the whole foreground group
    else:
        os.kill(proc.pid, signum)
    _, err = proc.communicate(timeout=60)
    time.sleep(1.0)  # PR_SET_PDEATHSIG is delivered asynchronously
    assert not [p for p in workers if alive(p)], "worker processes outlived the run"
    saved = json.loads(out.read_text())
    assert len(saved["episodes"]) >= 1 and not saved["complete"]
    if signum == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        return
    assert proc.returncode == 128 + signum and saved["interrupted"]
    assert "Traceback" not in err and "interrupted: the episodes finished so far are in" in err


def test_exit_codes_follow_the_shell_convention():
    assert exit_code(KeyboardInterrupt()) == 130 and exit_code(Interrupted()) == 143
