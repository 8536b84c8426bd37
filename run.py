"""Entry point: `python run.py model=llamagen_xl cache=linear keep=1/6` (Hydra; configs in conf/)."""

import logging
import signal
import sys

from lineareval.threads import prefer_passive_waits

prefer_passive_waits()  # before torch loads its OpenMP runtime: idle threads sleep instead of spinning

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from lineareval.identity import register_resolvers  # noqa: E402
from lineareval.keep import BudgetError  # noqa: E402
from lineareval.models.checkpoint import CheckpointError  # noqa: E402
from lineareval.models.weights import MissingWeightsError  # noqa: E402
from lineareval.runner import RunConflictError, RunInterrupted, RunLockedError, StorageError, run  # noqa: E402

log = logging.getLogger("lineareval")
USER_ERRORS = (BudgetError, CheckpointError, MissingWeightsError, RunConflictError, RunLockedError, StorageError,
               ValueError, FileNotFoundError)


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except USER_ERRORS as error:
        # a mistake in the command, missing files, a busy or full run folder: say what and how to fix it,
        # without a traceback
        log.error("%s: %s", type(error).__name__, error)
        sys.exit(2)
    except RunInterrupted:  # SIGTERM: the runner has logged how to resume; exit as a process killed by it would
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:  # Ctrl-C: likewise, without the traceback
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    register_resolvers()
    main()
