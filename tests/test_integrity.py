"""Run integrity: one writer per run folder, identity by what determines the samples, clean interruptions,
leftovers removed, every sampling field checked, and storage errors that say where and what to do."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import lineareval.runner as runner
from lineareval import shards
from lineareval.runner import RunConflictError, run

ROOT = Path(__file__).resolve().parents[1]
# 8x8 tokens, no decoding: a batch samples in well under a second on one core
SMALL = ("model=llamagen_tiny", "weights=random", "num_samples=4", "batch_size=2", "model.image_size=128",
         "decode_images=false")


def tokens_of(run_dir: Path) -> np.ndarray:
    return np.load(Path(run_dir) / "tokens.npz")["tokens"]


def environment() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def cli(tmp_path: Path, *overrides: str, **popen) -> subprocess.Popen:
    """`python run.py` on the tiny model, outputs under tmp_path; stdout and stderr merged."""
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), f"output_root={tmp_path / 'outputs'}",
                             f"weights_dir={tmp_path / 'weights'}", "device=cpu", *overrides], cwd=tmp_path,
                            env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s} s"
        time.sleep(0.05)


HOLD_LOCK = """
import sys, time
from pathlib import Path
from lineareval.runlock import RunLock
lock = RunLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Start another process that holds a run folder's lock; yields a function run_dir -> that process."""
    started = []

    def hold(run_dir: Path) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], env=environment(),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started.append(process)
        line = process.stdout.readline()
        assert line.strip() == "locked", line + process.stdout.read()
        return process

    yield hold
    for process in started:
        process.kill()
        process.wait()


# --- 1. one writer per run folder ---

def test_a_run_folder_held_by_another_process_is_refused_naming_the_holder(make_config, holder):
    cfg = make_config(*SMALL)
    other = holder(Path(cfg.run_dir))
    with pytest.raises(runner.RunLockedError, match=rf"pid {other.pid} on host {os.uname().nodename} since 20"):
        run(cfg)
    assert sorted(path.name for path in Path(cfg.run_dir).iterdir()) == [".lock"]  # nothing of this run written


def test_the_efficiency_suite_is_locked_too(make_config, holder):
    cfg = make_config("benchmark=efficiency", "weights=random", "batch_size=1", "model.image_size=128")
    other = holder(Path(cfg.run_dir))
    with pytest.raises(runner.RunLockedError, match=f"pid {other.pid}"):
        run(cfg)
    assert not (Path(cfg.run_dir) / "config.yaml").exists()


def test_the_lock_is_released_when_its_holder_is_killed(make_config, holder):
    cfg = make_config(*SMALL)
    other = holder(Path(cfg.run_dir))
    other.send_signal(signal.SIGKILL)
    other.wait()
    record = run(cfg)  # no stale lock to remove by hand
    assert record["num_samples"] == 4 and (Path(cfg.run_dir) / "metrics.json").exists()


TIMED_GENERATION = runner.timed_generation


class Interrupted(Exception):
    pass


def interrupt_after(monkeypatch, batches: int) -> list[int]:
    """Make the runner raise after sampling `batches` batches (a kill mid-run); returns the first id of each batch."""
    calls, original = [], TIMED_GENERATION

    def counted(generator, policy, budget, conditions, sample_ids, seed, device, method):
        if len(calls) == batches:
            raise Interrupted
        calls.append(int(sample_ids[0]))
        return original(generator, policy, budget, conditions, sample_ids, seed, device, method)

    monkeypatch.setattr(runner, "timed_generation", counted)
    return calls


def test_a_shard_of_another_configuration_is_sampled_again_never_merged(make_config, tmp_path, monkeypatch):
    """An unfinished top_k=0 run whose shards/ got a top_k=5 shard of the same name (copied in)."""
    SIX = (*SMALL, "num_samples=6")
    run(make_config(*SIX, f"run_dir={tmp_path / 'reference'}"))
    interrupt_after(monkeypatch, 2)
    with pytest.raises(Interrupted):
        run(make_config(*SIX, "sampling.top_k=5", f"run_dir={tmp_path / 'other'}"))
    interrupt_after(monkeypatch, 1)
    with pytest.raises(Interrupted):
        run(make_config(*SIX, f"run_dir={tmp_path / 'target'}"))
    foreign = shards.Shard(2, 4).path(tmp_path / "other" / "shards")
    shutil.copy(foreign, shards.Shard(2, 4).path(tmp_path / "target" / "shards"))
    calls = interrupt_after(monkeypatch, 99)
    run(make_config(*SIX, f"run_dir={tmp_path / 'target'}"))
    assert calls == [2, 4]  # the copied shard was sampled again
    np.testing.assert_array_equal(tokens_of(tmp_path / "target"), tokens_of(tmp_path / "reference"))
    assert not np.array_equal(np.load(foreign)["tokens"], tokens_of(tmp_path / "reference")[2:4])


@pytest.mark.slow  # about 20 s: torchrun starts three processes
def test_torchrun_ranks_stop_together_on_a_locked_run_folder(tmp_path, holder):
    """Rank 0 takes the lock for the job and shares the outcome: no rank samples, none waits at a barrier."""
    run_dir = tmp_path / "locked"
    other = holder(run_dir)
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "run.py"), *SMALL, "device=cpu", f"run_dir={run_dir}",
                           f"weights_dir={tmp_path / 'weights'}"],
                          cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0 and time.monotonic() - began < 120, output[-3000:]
    assert output.count(f"RunLockedError: {run_dir} is being written by pid {other.pid}") == 2, output[-3000:]
    assert not (run_dir / "shards").exists() and not (run_dir / "config.yaml").exists()


@pytest.mark.slow
def test_two_processes_started_together_never_mix_their_samples(tmp_path):
    """The issue's reproduction: top_k=0 and top_k=1 started at once on one run folder."""
    run_dir = tmp_path / "shared"
    common = (*SMALL, "num_samples=12", f"run_dir={run_dir}")
    processes = [cli(tmp_path, *common, f"sampling.top_k={top_k}") for top_k in (0, 1)]
    results = [finish(process) for process in processes]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], [output[-2000:] for _, output in results]
    refused = next(output for code, output in results if code == 2)
    assert "RunLockedError" in refused or "RunConflictError" in refused  # locked, or finished under the other
    finished_top_k = json.loads((run_dir / "identity.json").read_text())["config"]["sampling"]["top_k"]
    expected = tmp_path / "expected"
    run_one = cli(tmp_path, *SMALL, "num_samples=12", f"run_dir={expected}", f"sampling.top_k={finished_top_k}")
    assert finish(run_one)[0] == 0
    np.testing.assert_array_equal(tokens_of(run_dir), tokens_of(expected))


# --- 2. the default run folder names every setting that changes a sample ---

SAMPLE_SETTINGS = [("sampling.cfg_scale=1.5", "sampling.cfg_scale=2.0"), ("sampling.top_k=0", "sampling.top_k=1"),
                   ("sampling.temperature=1.0", "sampling.temperature=0.9"),
                   ("sampling.top_p=1.0", "sampling.top_p=0.9"), ("sampling.cfg_interval=-1", "sampling.cfg_interval=3"),
                   ("num_samples=4", "num_samples=8"), ("seed=0", "seed=1"), ("cache.anchors=line", "cache.anchors=4"),
                   ("cache.recent_lines=1", "cache.recent_lines=2"), ("cache.score_source=line", "cache.score_source=last_token"),
                   ("model.image_size=128", "model.image_size=256"), ("decode_images=true", "decode_images=false"),
                   ("dtype=float32", "dtype=bfloat16")]
EXECUTION_SETTINGS = [("batch_size=2", "batch_size=4"), ("device=auto", "device=cpu"), ("device=cuda:1", "device=cpu"),
                      ("logger=none", "logger=wandb"), ("force=false", "force=true"), ("stage=all", "stage=generate"),
                      ("grid_images=4", "grid_images=9"), ("compile=false", "compile=true"),
                      ("weights_dir=/a/weights", "weights_dir=/b/weights/")]


@pytest.mark.parametrize(("first", "second"), SAMPLE_SETTINGS)
def test_default_run_folders_differ_for_every_setting_that_changes_a_sample(make_config, first, second):
    assert make_config("cache=linear", "keep=1/2", first).run_dir != make_config("cache=linear", "keep=1/2", second).run_dir


@pytest.mark.parametrize(("first", "second"), EXECUTION_SETTINGS)
def test_default_run_folder_is_shared_by_spellings_of_the_same_samples(make_config, first, second):
    assert make_config("cache=linear", "keep=1/2", first).run_dir == make_config("cache=linear", "keep=1/2", second).run_dir


def test_benchmark_sample_settings_name_the_run_folder_but_data_locations_do_not(make_config, monkeypatch):
    def folder(*overrides: str) -> str:
        return make_config("benchmark=imagenet_fid", *overrides).run_dir

    assert folder("benchmark.balanced=false") != folder("benchmark.balanced=true")
    assert folder("benchmark.resolution=256") != folder("benchmark.resolution=128")
    default = folder()
    monkeypatch.setenv("LINEAREVAL_DATA", "/elsewhere/data")  # the same reference batch, another mount point
    assert folder() == default


# --- 3. run identity: what determines the samples, not paths or spelling ---

def test_spelling_copies_and_environment_do_not_change_run_identity(make_config, tmp_path, monkeypatch):
    cfg = make_config(*SMALL, f"run_dir={tmp_path / 'run'}")
    first = run(cfg)
    metrics = tmp_path / "run" / "metrics.json"
    stamp = metrics.stat().st_mtime_ns
    assert run(make_config(*SMALL, f"run_dir={tmp_path / 'run'}/")) == first  # trailing slash
    assert run(make_config(*SMALL, f"run_dir={tmp_path / 'run'}", f"weights_dir={tmp_path / 'w2'}")) == first
    assert run(make_config(*SMALL, f"run_dir={tmp_path / 'run'}", "batch_size=4")) == first
    if not torch.cuda.is_available():
        assert run(make_config(*SMALL, f"run_dir={tmp_path / 'run'}", "device=auto")) == first
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    assert run(make_config(*SMALL, f"run_dir={tmp_path / 'copy'}")) == first  # a copied folder
    assert metrics.stat().st_mtime_ns == stamp


def test_a_real_difference_names_the_field_both_values_and_the_choices(make_config, tmp_path):
    run(make_config(*SMALL, f"run_dir={tmp_path / 'run'}"))
    with pytest.raises(RunConflictError) as raised:
        run(make_config(*SMALL, f"run_dir={tmp_path / 'run'}", "sampling.top_k=5"))
    message = str(raised.value)
    assert "sampling.top_k: 0 (stored) -> 5 (now)" in message and "force=true" in message and "run_dir=" in message
    assert "batch_size" not in message and "run_dir:" not in message


def test_a_generation_made_on_another_device_is_evaluated_here_unless_a_dtype_was_pinned(make_config, tmp_path):
    """stage=generate on GPU nodes, stage=evaluate on a CPU machine: same folder, no conflict over dtype=auto."""
    common = (*SMALL, "num_samples=2", f"output_root={tmp_path / 'outputs'}")
    generated = make_config(*common, "stage=generate")
    run(generated)
    identity_file = Path(generated.run_dir) / "identity.json"
    identity = json.loads(identity_file.read_text())
    identity["config"].update(device="cuda", dtype="bfloat16")  # as a GPU node records it
    identity_file.write_text(json.dumps(identity))
    evaluate = make_config(*common, "stage=evaluate", "device=auto")
    assert evaluate.run_dir == generated.run_dir
    assert run(evaluate)["evaluated"] is True
    with pytest.raises(RunConflictError, match=r"(?s)dtype: 'bfloat16' \(stored\) -> 'float32' \(now\)"):
        run(make_config(*common, f"run_dir={generated.run_dir}", "dtype=float32"))  # a pinned precision must match


def test_weights_match_by_content_wherever_the_file_is(make_config, tmp_path, monkeypatch):
    """A checkpoint copied to another folder resumes the same run; a changed file of that name does not."""
    generator = runner.build_generator(make_config(*SMALL), torch.device("cpu"), torch.float32)
    first, copies = tmp_path / "first", tmp_path / "copies"
    for folder in (first, copies):
        folder.mkdir()
        torch.save({"model": generator.model.state_dict()}, folder / "tiny_c2i.pt")
        torch.save({"model": generator.family.vq.state_dict()}, folder / "tiny_vq.pt")
    common = (*SMALL, "weights=checkpoint", "num_samples=2", "batch_size=1")

    def files(folder: Path) -> tuple[str, str]:
        return f"model.gpt_ckpt={folder / 'tiny_c2i.pt'}", f"model.vq_ckpt={folder / 'tiny_vq.pt'}"

    assert make_config(*common, *files(first)).run_dir == make_config(*common, *files(copies)).run_dir
    for run_dir in ("run", "changed"):
        interrupt_after(monkeypatch, 1)
        with pytest.raises(Interrupted):
            run(make_config(*common, *files(first), f"run_dir={tmp_path / run_dir}"))
    calls = interrupt_after(monkeypatch, 99)
    run(make_config(*common, *files(copies), f"run_dir={tmp_path / 'run'}"))
    assert calls == [1]  # the copies are the same weights: the first shard is reused
    state = torch.load(copies / "tiny_c2i.pt", weights_only=True)
    key = next(name for name, tensor in state["model"].items() if tensor.is_floating_point())
    state["model"][key] = state["model"][key] + 1.0
    torch.save(state, copies / "tiny_c2i.pt")  # same name and size, other weights
    with pytest.raises(RunConflictError, match=r"(?s)content.weight_files: .*tiny_c2i\.pt"):
        run(make_config(*common, *files(copies), f"run_dir={tmp_path / 'changed'}"))


# --- 5. leftovers and SIGTERM ---

def test_a_rerun_removes_what_interrupted_runs_left(make_config, tmp_path):
    cfg = make_config(*SMALL)
    run_dir = Path(cfg.run_dir)
    run(cfg)
    merge_left = run_dir / ".samples.npz.0123abcd.tmp"  # SIGKILL during the merge's streamed write
    merge_left.write_bytes(b"\0" * 1000)
    (run_dir / "shards").mkdir()  # SIGKILL between metrics.json and removing the merged shards
    (run_dir / "shards" / "shard-00000000-00000002.npz").write_bytes(b"merged already")
    (run_dir / "shards" / ".shard-00000002-00000004.npz.89abcdef.tmp").write_bytes(b"half")
    keep_mine = run_dir / "notes.txt"  # not ours: left alone
    keep_mine.write_text("mine")
    run(cfg)
    assert not merge_left.exists() and not (run_dir / "shards").exists() and keep_mine.read_text() == "mine"


def test_sigterm_keeps_finished_shards_says_how_to_resume_and_the_rerun_completes(make_config, tmp_path):
    overrides = (*SMALL, "num_samples=6", "batch_size=1", f"run_dir={tmp_path / 'run'}")
    process = cli(tmp_path, *overrides)
    shard_dir = tmp_path / "run" / "shards"
    wait_for(lambda: process.poll() is not None or len(list(shard_dir.glob("shard-*.npz"))) >= 2, 240,
             "two finished shards")
    process.send_signal(signal.SIGTERM)  # what Slurm sends at the time limit
    code, output = finish(process)
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert "SIGTERM" in output and "run the same command again to resume" in output, output[-3000:]
    kept = sorted(shard_dir.glob("shard-*.npz"))
    assert 2 <= len(kept) < 6 and not list(shard_dir.glob(".*.tmp"))
    assert not (tmp_path / "run" / "metrics.json").exists()
    record = run(make_config(*overrides))
    reference = make_config(*SMALL, "num_samples=6", f"run_dir={tmp_path / 'reference'}")
    run(reference)
    np.testing.assert_array_equal(tokens_of(tmp_path / "run"), tokens_of(tmp_path / "reference"))
    assert record["num_samples"] == 6


# --- 6. every run field checked, with the accepted range ---

@pytest.mark.parametrize(("override", "message"), [
    ("seed=abc", r"seed must be an integer in \[0, 2\*\*32\), got 'abc'"),
    ("seed=1.5", r"seed must be an integer in \[0, 2\*\*32\), got 1.5"),
    ("seed=-1", r"seed must be an integer in \[0, 2\*\*32\)"),
    ("seed=4294967296", r"seed must be an integer in \[0, 2\*\*32\)"),
    ("sampling.top_k=-5", r"sampling.top_k must be an integer >= 0 \(0 = off, 1 = greedy\), got -5"),
    ("sampling.top_k=2.5", r"sampling.top_k must be an integer >= 0"),
    ("sampling.temperature=0", r"sampling.temperature must be a number > 0 .*top_k=1"),
    ("sampling.temperature=nan", r"sampling.temperature must be a number > 0"),
    ("sampling.cfg_scale=-1", r"sampling.cfg_scale must be a number >= 1 \(1 = no guidance"),
    ("sampling.cfg_scale=0.5", r"sampling.cfg_scale must be a number >= 1"),
    ("sampling.cfg_interval=-2", r"sampling.cfg_interval must be an integer >= -1"),
    ("sampling.top_p=0", r"sampling.top_p must be a number in \(0, 1\]"),
    ("sampling.top_p=1.5", r"sampling.top_p must be a number in \(0, 1\]"),
    ("sampling.top_k=true", r"sampling.top_k must be an integer >= 0"),
    ("+sampling.min_p=0.1", r"sampling.min_p is not a sampling field"),
])
def test_bad_run_fields_are_refused_with_the_accepted_range(make_config, override, message):
    cfg = make_config(*SMALL, override)
    with pytest.raises(ValueError, match=message):
        run(cfg)
    assert not Path(cfg.run_dir).exists()  # refused before the folder is touched


def test_greedy_and_guidance_edges_are_accepted(make_config):
    record = run(make_config(*SMALL, "num_samples=2", "sampling.top_k=1", "sampling.cfg_scale=1", "sampling.top_p=1"))
    assert record["num_samples"] == 2


def test_cli_bad_seed_is_one_clear_line(tmp_path):
    code, output = finish(cli(tmp_path, *SMALL, "seed=abc"))
    assert code == 2 and "seed must be an integer in [0, 2**32), got 'abc'" in output
    assert "Traceback" not in output


# --- 8. storage errors ---

def failing_fsync(match: str):
    """os.fsync that fails with ENOSPC for files whose path contains `match` (a disk that fills up there)."""
    original = os.fsync

    def fsync(fd: int) -> None:
        if match in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(fd)

    return fsync


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc to name the file being written")
def test_a_full_disk_says_where_keeps_finished_shards_and_never_looks_finished(make_config, tmp_path, monkeypatch):
    cfg = make_config(*SMALL, "num_samples=6", f"run_dir={tmp_path / 'run'}")
    monkeypatch.setattr(os, "fsync", failing_fsync("shard-00000004-00000006"))
    with pytest.raises(runner.StorageError, match=r"could not write .*shard-00000004-00000006\.npz: No space left "
                                                  r"on device \([0-9.]+ [GM]iB free.*run the same command again"):
        run(cfg)
    run_dir = tmp_path / "run"
    assert not (run_dir / "metrics.json").exists() and not list(run_dir.rglob("*.tmp"))
    assert len(list((run_dir / "shards").glob("shard-*.npz"))) == 2
    monkeypatch.undo()  # space freed
    calls = interrupt_after(monkeypatch, 99)
    run(make_config(*SMALL, "num_samples=6", f"run_dir={tmp_path / 'run'}"))
    assert calls == [4]
    reference = make_config(*SMALL, "num_samples=6", f"run_dir={tmp_path / 'reference'}")
    run(reference)
    np.testing.assert_array_equal(tokens_of(run_dir), tokens_of(tmp_path / "reference"))


def read_only(folder: Path, command: list[str]) -> list[str]:
    """`command` with `folder` read-only: a read-only bind mount in a user namespace, else chmod (not as root)."""
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind -o ro '{folder}' '{folder}'"],
                           capture_output=True) if shutil.which("unshare") else None
    if probe is not None and probe.returncode == 0:
        script = f"mount --bind -o ro '{folder}' '{folder}' && exec \"$@\""
        return ["unshare", "-rm", "sh", "-c", script, "sh", *command]
    if os.geteuid() == 0:
        pytest.skip("no user namespaces to mount read-only, and chmod does not stop root")
    for path in [folder, *folder.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    return command


def test_a_finished_run_on_read_only_storage_is_skipped(make_config, tmp_path):
    overrides = (*SMALL, f"run_dir={tmp_path / 'run'}")
    run(make_config(*overrides))
    before = (tmp_path / "run" / "metrics.json").read_bytes()
    command = [sys.executable, str(ROOT / "run.py"), *overrides, "device=cpu"]
    done = subprocess.run(read_only(tmp_path / "run", command), cwd=tmp_path, env=environment(),
                          capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "is finished; skipping" in output and "Unable to configure handler" not in output
    assert (tmp_path / "run" / "metrics.json").read_bytes() == before


def test_an_unfinished_run_on_read_only_storage_says_so(make_config, tmp_path):
    (tmp_path / "run").mkdir()
    command = [sys.executable, str(ROOT / "run.py"), *SMALL, f"run_dir={tmp_path / 'run'}", "device=cpu"]
    done = subprocess.run(read_only(tmp_path / "run", command), cwd=tmp_path, env=environment(),
                          capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert f"{tmp_path / 'run'}" in output and "read-only" in output.lower() and "Traceback" not in output
    assert "output_root=" in output
