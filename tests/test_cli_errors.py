"""run.py's mistakes and interruptions end with one clear line and an exit status, never a traceback."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lineareval.runner import run

ROOT = Path(__file__).resolve().parents[1]
TINY = ("model=llamagen_tiny", "weights=random", "decode_images=false", "device=cpu")


def run_py(tmp_path: Path, *overrides: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *TINY, f"weights_dir={tmp_path / 'weights'}",
                             *overrides], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


@pytest.mark.parametrize("device", ["tpu", "meta", "cuda:x"])
def test_an_unknown_device_is_refused_before_the_run_folder_exists(make_config, device):
    cfg = make_config(f"device={device}")
    with pytest.raises(ValueError, match=rf"device={device} .*use auto, cpu, cuda or cuda:N"):
        run(cfg)
    assert not Path(cfg.run_dir).exists()


def test_a_read_only_output_root_is_a_clear_error_not_hydras_mkdir_traceback(tmp_path):
    if os.access("/sys", os.W_OK) and not Path("/sys").is_mount():
        pytest.skip("no read-only file system to try")
    probe = Path("/sys/lineareval-probe")
    try:
        probe.mkdir()
        probe.rmdir()
        pytest.skip("/sys is writable here")
    except OSError:
        pass
    done = run_py(tmp_path, "output_root=/sys/lineareval")
    output, _ = done.communicate(timeout=300)
    assert done.returncode == 2, output
    assert "StorageError: could not write /sys/lineareval/" in output and "set output_root=" in output
    assert "Traceback" not in output


def test_ctrl_c_says_how_to_resume_and_exits_130_without_a_traceback(tmp_path):
    """SIGINT mid-sampling: exit status 130, the line saying how to resume, no traceback, the shards kept.

    The signal waits for a state, not a time: a finished shard on disk (sampling is under way, past the start-up
    and the first batch). A fixed sleep after a log line put it wherever the load had let the run get to, and
    reading that line without a deadline could hang. Far more samples than any wait here could sample keep the
    run sampling when the signal arrives; a thread drains the merged output all along (a full pipe would
    stall the run)."""
    out = tmp_path / "out"
    process = run_py(tmp_path, "num_samples=100000", "batch_size=2", f"output_root={out}")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not any(out.rglob("shard-*.npz")):
            assert process.poll() is None, f"exited ({process.returncode}) before a shard:\n{''.join(lines)[-3000:]}"
            assert time.monotonic() < deadline, f"no finished shard within 300 s:\n{''.join(lines)[-3000:]}"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)
        reader.join(timeout=60)
    output = "".join(lines)
    assert process.returncode == 130, output[-3000:]
    assert "interrupted by Ctrl-C" in output and "run the same command again to resume" in output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    reported = re.search(r"keeps its finished work \((\d+) finished shards\)", output)
    assert reported and int(reported.group(1)) >= 1, output[-3000:]
    assert len(list(out.rglob("shard-*.npz"))) >= int(reported.group(1))  # what it says it keeps is there
