"""Sweeps: the experiment grids (conf/experiment/), the Makefile targets, and a real Slurm run.

The Slurm tests start a single-node cluster on loopback (scripts/slurm_local.py: munged, mariadbd,
slurmdbd, slurmctld, slurmd, state under tmp_path, stopped by PID) and run a tiny sweep through Hydra's
submitit launcher (conf/hydra/launcher/slurm.yaml). They skip only where Slurm is not installed
(scripts/install_slurm.sh installs it; CI runs that first).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from lineareval.compose import compose_config, policy_names
from lineareval.config import call_target
from lineareval.identity import register_resolvers
from lineareval.runner import run

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
EXPERIMENTS = sorted(path.stem for path in (CONF_DIR / "experiment").glob("*.yaml"))
POLICIES = tuple(name for name in policy_names() if name != "full")
KEEPS = ("1/4", "1/6", "1/8")


def _load_slurm_local():
    spec = importlib.util.spec_from_file_location("slurm_local", ROOT / "scripts" / "slurm_local.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


slurm_local = _load_slurm_local()


# --- the grids: what `python run.py -m experiment=NAME` sweeps, expanded as Hydra's basic sweeper does ---

def sweep_jobs(experiment: str, *overrides: str) -> list:
    """The composed config of every job of the sweep (sweeper params first, command line last, as Hydra)."""
    register_resolvers()
    arguments = [f"experiment={experiment}", "output_root=out", *overrides]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        master = compose("config", overrides=arguments, return_hydra_config=True)
        params = [f"{key}={value}" for key, value in master.hydra.sweeper.params.items()]
        loader = GlobalHydra.instance().config_loader()  # expands glob(*) over a config group, as the sweeper does
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(params + arguments)
        (jobs,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
        return [compose_config(*job) for job in jobs]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_gives_each_run_its_own_folder(experiment):
    jobs = sweep_jobs(experiment)
    run_dirs = [job.run_dir for job in jobs]
    assert len(jobs) >= 2 and len(set(run_dirs)) == len(jobs), run_dirs


def test_efficiency_sweeps_the_papers_table():
    jobs = sweep_jobs("efficiency")
    table = {job.model.name: (job.batch_size, list(job.benchmark.keeps)) for job in jobs}
    assert table == {"llamagen_xl": (256, ["1/4", "1/6"]), "llamagen_xxl": (128, ["1/4", "1/6"]),
                     "janus_pro_1b": (128, ["1/4", "1/6"]), "janus_pro_7b": (64, ["1/4", "1/6"]),
                     "lumina_mgpt_768": (12, ["1/6", "1/8"]), "lumina_mgpt_1024": (8, ["1/8"])}
    for job in jobs:  # every policy of conf/cache/, full first
        assert (job.benchmark.name, job.weights, job.benchmark.policies) == ("efficiency", "random", None)
        specs = call_target(job.benchmark, exclude=("name",)).entry_specs()
        assert specs[0] == ("full", "1") and {name for name, _ in specs} == set(policy_names())
        assert job.num_samples == job.batch_size  # one batch of class labels is enough for the timing


@pytest.mark.parametrize(("experiment", "model", "benchmark"), [
    ("imagenet", "llamagen_xl", "imagenet_fid"), ("coco", "janus_pro_1b", "coco_fid"),
    ("dpg", "lumina_mgpt_768", "dpg")])
def test_quality_grid_is_every_policy_at_every_keep_plus_the_full_baseline(experiment, model, benchmark):
    jobs = sweep_jobs(experiment)
    assert sorted((job.cache.name, job.keep) for job in jobs) == sorted(itertools.product(POLICIES, KEEPS))
    assert {(job.model.name, job.benchmark.name, job.weights) for job in jobs} == {(model, benchmark, "checkpoint")}
    (baseline,) = sweep_jobs(experiment, "cache=full", "keep=1")  # as `make <experiment>` runs it
    assert (baseline.cache.name, baseline.keep, baseline.model.name) == ("full", 1, model)
    assert baseline.run_dir not in {job.run_dir for job in jobs}


def test_ablations_vary_one_linear_knob_and_share_only_the_default_point():
    points = {}  # run_dir -> (anchors, recent_lines, score_source, keep)
    expected = {"ablation_keep": 3, "ablation_anchors": 3, "ablation_recent_lines": 2, "ablation_score_source": 3}
    for experiment, count in expected.items():
        jobs = sweep_jobs(experiment)
        assert len(jobs) == count
        for job in jobs:
            assert (job.cache.name, job.model.name, job.benchmark.name) == ("linear", "llamagen_xl", "imagenet_fid")
            point = (str(job.cache.anchors), job.cache.recent_lines, job.cache.score_source, job.keep)
            assert points.setdefault(job.run_dir, point) == point, f"{job.run_dir} holds two configurations"
    default = [point for point in points.values() if point[:3] == ("line", 1, "line")]
    assert sorted(default) == [("line", 1, "line", keep) for keep in sorted(KEEPS)]
    assert len(points) == 8  # 3 keeps + 2 other anchors + 1 other recent_lines + 2 other score sources
    assert {point[0] for point in points.values()} == {"0", "4", "line"}
    assert {point[2] for point in points.values()} == {"line", "last_token", "cumulative"}


def test_slurm_launcher_exposes_the_cluster_fields():
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        launcher = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                                "hydra.launcher.gpus_per_node=4", "hydra.launcher.tasks_per_node=4"],
                           return_hydra_config=True).hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    fields = {key: launcher[key] for key in ("partition", "gpus_per_node", "tasks_per_node", "nodes")}
    assert fields == {"partition": "gpu", "gpus_per_node": 4, "tasks_per_node": 4, "nodes": 1}
    assert all(isinstance(launcher[key], int) for key in ("cpus_per_task", "mem_gb", "timeout_min",
                                                          "array_parallelism"))


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("target", ["efficiency", "imagenet", "coco", "dpg", "ablations"])
def test_make_sweep_targets_pick_the_launcher(target):
    # not the variables of a `make test` that runs this test
    env = {key: value for key, value in os.environ.items()
           if key not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "LAUNCHER", "ARGS")}

    def make(*arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", *arguments], cwd=ROOT, env=env, capture_output=True, text=True)

    slurm, local = make("-n", "-o", "setup", target, "LAUNCHER=slurm", "ARGS=seed=3"), make("-n", "-o", "setup", target)
    assert slurm.returncode == 0 and local.returncode == 0, slurm.stderr + local.stderr
    assert "experiment=" in slurm.stdout and "seed=3" in slurm.stdout
    assert "hydra/launcher=slurm" in slurm.stdout and "hydra/launcher" not in local.stdout
    assert f"make {target} " in make("help").stdout
    wrong = make("-n", target, "LAUNCHER=cloud")
    assert wrong.returncode != 0 and "LAUNCHER must be local or slurm" in wrong.stderr


# --- a real Slurm ---

TINY_SWEEP = ("hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.mem_gb=null",
              "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10", "model=llamagen_tiny",
              "model.image_size=128", "weights=random", "cache=linear", "keep=1/2,1/4", "num_samples=2",
              "batch_size=2", "decode_images=false", "device=cpu")
TERMINAL = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = slurm_local.missing_programs()
    if missing:
        pytest.skip(f"Slurm is not installed (missing {', '.join(missing)}); scripts/install_slurm.sh installs "
                    "Debian's slurm-wlm, munge, slurmdbd and mariadb-server (as root)")
    with slurm_local.LocalSlurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


class Sweep:
    """`python run.py -m <TINY_SWEEP>` against the local cluster, its records and its Slurm jobs."""

    def __init__(self, cluster, output_root: Path):
        self.cluster, self.output_root = cluster, output_root
        self.env = {**cluster.env, "HF_HUB_OFFLINE": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

    def start(self, *overrides: str) -> subprocess.Popen:
        log = open(self.output_root.parent / f"launcher-{time.monotonic_ns()}.log", "w")
        self.log = Path(log.name)
        with log:
            return subprocess.Popen([sys.executable, "run.py", "-m", *TINY_SWEEP, f"output_root={self.output_root}",
                                     *overrides], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def run(self, *overrides: str) -> None:
        process = self.start(*overrides)
        returncode = process.wait(timeout=600)
        assert returncode == 0, self.log.read_text()[-4000:]

    def record(self, keep: str) -> Path:
        """The run's metrics.json, in its default folder (seed-0/n-<num_samples>_cfg-<cfg>_<decoding>_<hash>/)."""
        seed_dir = self.output_root / "samples" / "llamagen_tiny" / "linear" / f"keep-{keep.replace('/', '_')}" / \
            "random" / "seed-0"
        found = sorted(seed_dir.glob("n-*/metrics.json"))
        assert len(found) <= 1, found  # one configuration per keep in these sweeps
        return found[0] if found else seed_dir / "n-unknown" / "metrics.json"

    def job_ids(self) -> set[str]:
        """The Slurm jobs (arrays) the launcher submitted: submitit names a folder after each."""
        folders = self.output_root.glob("multirun/*/.submitit/*")
        return {path.name for path in folders if path.is_dir() and path.name.isdigit()}

    def job_states(self, job_id: str, tasks: int | None = None) -> dict[str, str]:
        """`job -> state` from Slurm's accounting, once all have finished: {"7_0": ..., "7_1": ...} for an
        array of `tasks` runs (a sweep), {"7": ...} for a single job (submitit does not make an array of one).

        A task cancelled while pending may be listed only inside the array's remainder ("7_[1%1]", or
        "7_[0-1%1]" while the record of task 0, which ran, is listed on its own too): a remainder row
        gives its state to the tasks it names that have no row of their own. slurmdbd records jobs
        asynchronously, so under load sacct can list the remainder before the task that already ran:
        the answer counts once every expected job is listed, all finished, and it has not changed for
        5 seconds."""
        expected = {f"{job_id}_{task}" for task in range(tasks)} if tasks else {job_id}
        deadline, previous, stable_since = time.monotonic() + 60, None, time.monotonic()
        while True:
            result = subprocess.run(["sacct", "-X", "--noheader", "--parsable2", f"--jobs={job_id}",
                                     "--format=JobID,State"], env=self.cluster.env, capture_output=True, text=True)
            states = sacct_states(result.stdout)
            if states != previous:
                previous, stable_since = states, time.monotonic()
            done = set(states) >= expected and all(state in TERMINAL for state in states.values())
            if (done and time.monotonic() - stable_since >= 5) or time.monotonic() > deadline:
                return {job: state for job, state in states.items() if job in expected}
            time.sleep(0.5)


def sacct_states(text: str) -> dict[str, str]:
    """`sacct --parsable2 --format=JobID,State` rows -> {job: state}. A row of an array's remainder
    ("7_[1%1]", "7_[0-1%1]", "7_[2,4-5]") gives its state to each task it names that has no row of its own."""
    own, remainder = {}, {}
    for job, state in (line.split("|") for line in text.splitlines()):
        state = state.split()[0]  # "CANCELLED by 0" -> "CANCELLED"
        if "_[" not in job:
            own[job] = state
            continue
        array, tasks = job.split("_[")
        for part in tasks.rstrip("]").split("%")[0].split(","):
            first, _, last = part.partition("-")
            for task in range(int(first), int(last or first) + 1):
                remainder[f"{array}_{task}"] = state
    return {**remainder, **own}


def test_sacct_states_expand_an_array_remainder():
    assert sacct_states("7_0|COMPLETED\n7_[0-1%1]|CANCELLED by 0\n") == {"7_0": "COMPLETED", "7_1": "CANCELLED"}
    assert sacct_states("7_0|COMPLETED\n7_[1%1]|CANCELLED by 0") == {"7_0": "COMPLETED", "7_1": "CANCELLED"}
    assert sacct_states("7_[2,4-5]|PENDING\n7_4|RUNNING") == {"7_2": "PENDING", "7_4": "RUNNING", "7_5": "PENDING"}
    assert sacct_states("8|COMPLETED") == {"8": "COMPLETED"}


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s} s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def resumed_sweep(slurm, tmp_path_factory):
    """A sweep interrupted after its first run (Slurm job cancelled, launcher stopped), then started again."""
    sweep = Sweep(slurm, tmp_path_factory.mktemp("sweep") / "outputs")
    began = time.perf_counter()
    # one run at a time, so the second job is still pending or just started when we cancel
    launcher = sweep.start("hydra.launcher.array_parallelism=1")
    try:
        wait_for(lambda: sweep.record("1/2").exists() or launcher.poll() is not None, 600, "the first record")
        assert sweep.record("1/2").exists(), sweep.log.read_text()[-4000:]
        (interrupted,) = sweep.job_ids()
        # cancel the second run only: the first one's job may still be tidying up after writing its record
        subprocess.run(["scancel", f"{interrupted}_1"], env=slurm.env, check=True)
    finally:
        launcher.terminate()
        launcher.wait(timeout=60)
    first = {"bytes": sweep.record("1/2").read_bytes(), "mtime": sweep.record("1/2").stat().st_mtime_ns}
    interrupted_states = sweep.job_states(interrupted, tasks=2)
    unfinished_after_interrupt = not sweep.record("1/4").exists()
    sweep.run()
    (resumed,) = sweep.job_ids() - {interrupted}
    return {"sweep": sweep, "first": first, "interrupted_job": interrupted, "interrupted": interrupted_states,
            "resumed": sweep.job_states(resumed, tasks=2), "unfinished_after_interrupt": unfinished_after_interrupt,
            "seconds": time.perf_counter() - began}


def test_interrupted_slurm_sweep_finishes_the_rest_without_redoing_runs(resumed_sweep):
    sweep = resumed_sweep["sweep"]
    job = resumed_sweep["interrupted_job"]
    assert resumed_sweep["interrupted"] == {f"{job}_0": "COMPLETED", f"{job}_1": "CANCELLED"}
    assert resumed_sweep["unfinished_after_interrupt"]
    assert sorted(resumed_sweep["resumed"].values()) == ["COMPLETED"] * 2  # both went through Slurm again
    records = {keep: json.loads(sweep.record(keep).read_text()) for keep in ("1/2", "1/4")}
    assert {keep: (record["keep"], record["cache"], record["model"]) for keep, record in records.items()} == {
        "1/2": ("1/2", "linear", "llamagen_tiny"), "1/4": ("1/4", "linear", "llamagen_tiny")}
    assert [records[keep]["visual_budget"] for keep in ("1/2", "1/4")] == [32, 16]  # 8x8 tokens
    # the finished run was skipped: its record is byte for byte the one written before the interruption
    assert sweep.record("1/2").read_bytes() == resumed_sweep["first"]["bytes"]
    assert sweep.record("1/2").stat().st_mtime_ns == resumed_sweep["first"]["mtime"]
    print(f"local Slurm: interrupted + resumed sweep took {resumed_sweep['seconds']:.1f} s")


def test_rerunning_a_finished_slurm_sweep_redoes_nothing(resumed_sweep):
    sweep = resumed_sweep["sweep"]
    before = {keep: (sweep.record(keep).read_bytes(), sweep.record(keep).stat().st_mtime_ns) for keep in ("1/2", "1/4")}
    submitted = sweep.job_ids()
    sweep.run()
    (rerun,) = sweep.job_ids() - submitted
    assert sweep.job_states(rerun, tasks=2) == {f"{rerun}_0": "COMPLETED", f"{rerun}_1": "COMPLETED"}
    after = {keep: (sweep.record(keep).read_bytes(), sweep.record(keep).stat().st_mtime_ns) for keep in ("1/2", "1/4")}
    assert after == before
    logs = sorted(sweep.output_root.glob(f"multirun/*/.submitit/{rerun}_*/*_log.out"))
    assert len(logs) == 2 and all("is finished; skipping" in log.read_text() for log in logs)


def test_slurm_job_with_two_tasks_samples_what_one_process_does(slurm, tmp_path, make_config):
    """tasks_per_node=2: the runner splits the batches over Slurm's tasks (no torchrun); same tokens."""
    sweep = Sweep(slurm, tmp_path / "outputs")
    sweep.run("keep=1/2", "num_samples=4", "hydra.launcher.tasks_per_node=2")
    (job_id,) = sweep.job_ids()
    assert sweep.job_states(job_id) == {job_id: "COMPLETED"}
    logs = sorted(sweep.output_root.glob(f"multirun/*/.submitit/{job_id}/{job_id}_*_log.out"))
    assert [log.name for log in logs] == [f"{job_id}_0_log.out", f"{job_id}_1_log.out"]  # one per task
    two_tasks = np.load(sweep.record("1/2").parent / "tokens.npz")
    one_process = make_config("model.image_size=128", "weights=random", "cache=linear", "keep=1/2", "num_samples=4",
                              "batch_size=2", "decode_images=false", f"output_root={tmp_path / 'one_process'}")
    run(one_process)
    reference = np.load(Path(one_process.run_dir) / "tokens.npz")
    assert two_tasks["tokens"].shape == (4, 64)
    np.testing.assert_array_equal(two_tasks["tokens"], reference["tokens"])
    np.testing.assert_array_equal(two_tasks["labels"], reference["labels"])
