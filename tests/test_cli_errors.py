"""run.py's mistakes and interruptions end with one clear line and an exit status, never a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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
    process = run_py(tmp_path, "num_samples=400", "batch_size=2", f"output_root={tmp_path / 'out'}")
    lines = []
    deadline = time.monotonic() + 300
    for line in process.stdout:  # wait until sampling has begun
        lines.append(line)
        if "shards to sample" in line or time.monotonic() > deadline:
            break
    time.sleep(2)
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=300)
    output = "".join(lines) + rest
    assert process.returncode == 130, output[-3000:]
    assert "interrupted by Ctrl-C" in output and "run the same command again to resume" in output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
