"""CPU threads sized to the cores this process may use, and how busy the machine was while it ran.

PyTorch's OpenMP threads spin while they wait for each other (libgomp's default wait policy). On cores
shared with another process a spinning thread burns the time slice a working one needs: two tiny CPU runs
at once took 202 s each instead of 3.3 s. So `run.py` makes them sleep instead (`OMP_WAIT_POLICY=PASSIVE`,
read by libgomp when it loads, i.e. before torch is imported; `prefer_passive_waits`), and the runner
gives each process the cores it may run on (`os.sched_getaffinity`), shared among the ranks of its node
under torchrun. An explicit `OMP_NUM_THREADS` or `OMP_WAIT_POLICY` is always kept.

Every record says how many threads ran and how busy the machine's cores were (`cpu_load_per_core`:
runnable tasks from the 1-minute load average over the usable cores), and a run warns when the machine is
oversubscribed, so a slow number is not mistaken for a slow method.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

OVERSUBSCRIBED = 1.0  # load per usable core above which other work competes for the cores


def prefer_passive_waits() -> None:
    """Let idle OpenMP threads sleep rather than spin (unless the user chose); call before torch is imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask: taskset, Slurm's cgroups), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def thread_budget(local_world_size: int = 1) -> int:
    """Intra-op threads for one of `local_world_size` processes on this node sharing its usable cores."""
    return max(1, usable_cores() // max(1, local_world_size))


def load_per_core() -> float | None:
    """The 1-minute load average over the usable cores (None where the OS has none)."""
    try:
        return os.getloadavg()[0] / usable_cores()
    except (AttributeError, OSError):
        return None


def configure(local_world_size: int | None = None) -> int:
    """Set torch's intra-op threads to this process's share of the usable cores (an explicit OMP_NUM_THREADS
    wins; `local_world_size` defaults to torchrun's LOCAL_WORLD_SIZE) and warn when the cores are already busy;
    returns the thread count."""
    import torch

    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(thread_budget(local_world_size))
    warn_if_oversubscribed()
    return torch.get_num_threads()


def warn_if_oversubscribed() -> None:
    load = load_per_core()
    if load is not None and load > OVERSUBSCRIBED:
        log.warning("the machine is oversubscribed: load %.1f per usable core (%d cores); CPU timings of this run "
                    "are slowed by other work", load, usable_cores())


def cpu_info() -> dict:
    """Record fields: the threads torch used, the usable cores, the load per core and the OpenMP wait policy."""
    import torch

    load = load_per_core()
    return {"cpu_threads": torch.get_num_threads(), "usable_cores": usable_cores(),
            "cpu_load_per_core": None if load is None else round(load, 2),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}
