"""Adding a cache policy is one Python file plus one YAML file: it then appears, with no other edit, in the
efficiency benchmark's default grid (`make efficiency`), the quality sweeps (`make imagenet/coco/dpg`),
the demo (`make demo` and its table) and the figures' colours."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from lineareval.compose import policy_colors, policy_names

ROOT = Path(__file__).resolve().parents[1]
TOY_POLICY = '''"""A toy policy for tests/test_toy_policy.py: keeps the most recent tokens, like window."""

from dataclasses import dataclass

from lineareval.cache.policy import CachePolicy


@dataclass
class Toy(CachePolicy):
    selects_by_position = True

    def score(self, view, context):
        return view.positions.float()
'''


@pytest.fixture
def toy():
    """One .py in lineareval/cache/ and one .yaml in conf/cache/, removed afterwards."""
    name = f"toy_{uuid.uuid4().hex[:8]}"
    module = ROOT / "lineareval" / "cache" / f"{name}.py"
    config = ROOT / "conf" / "cache" / f"{name}.yaml"
    module.write_text(TOY_POLICY)
    config.write_text(f"_target_: lineareval.cache.{name}.Toy\n")  # its name: the file's
    try:
        yield name
    finally:
        module.unlink(missing_ok=True)
        config.unlink(missing_ok=True)


def expand(override: str, *context: str) -> list[str]:
    """The values a sweep override takes, as Hydra's basic sweeper expands it (glob over the config group)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        (parsed,) = parser.parse_overrides([override])
        return [str(value) for value in parsed.sweep_string_iterator()]


def test_a_new_policy_joins_every_grid_report_and_figure(toy, make_config):
    from lineareval.benchmarks.efficiency import Efficiency
    from test_slurm import sweep_jobs

    assert toy in policy_names() and policy_names()[0] == "full"
    efficiency = make_config("experiment=efficiency")  # make efficiency's default grid
    specs = Efficiency(**{key: value for key, value in efficiency.benchmark.items() if key not in ("_target_", "name")
                          }).entry_specs()
    assert {(toy, "1/4"), (toy, "1/6")} <= set(specs)
    for experiment in ("imagenet", "coco", "dpg"):  # the quality sweeps
        assert {job.cache.name for job in sweep_jobs(experiment)} == set(policy_names()) - {"full"}
    demo = re.search(r"run.py -m model=demo benchmark=demo_fid '(cache=[^']+)'", (ROOT / "Makefile").read_text())
    assert toy in expand(demo.group(1))  # make demo samples it; its table ranks runs by policy_names()
    assert toy in policy_colors() and policy_colors()["full"] == "black"


def test_a_new_policy_runs_through_the_runner(toy, make_config):
    from lineareval.runner import run

    record = run(make_config(f"cache={toy}", "keep=1/4", "weights=random", "num_samples=2", "batch_size=2",
                             "decode_images=false"))
    assert record["cache"] == toy and record["visual_budget"] == 64
