"""Entry point: `python run.py model=llamagen_xl cache=linear keep=1/6` (Hydra; configs in conf/)."""

import logging
import sys

import hydra
from omegaconf import DictConfig

from lineareval.config import register_resolvers
from lineareval.keep import BudgetError
from lineareval.models.checkpoint import CheckpointError
from lineareval.models.weights import MissingWeightsError
from lineareval.runner import RunConflictError, run

log = logging.getLogger("lineareval")
USER_ERRORS = (BudgetError, CheckpointError, MissingWeightsError, RunConflictError, ValueError, FileNotFoundError)


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except USER_ERRORS as error:
        # a mistake in the command or missing files: say what and how to fix it, without a traceback
        log.error("%s: %s", type(error).__name__, error)
        sys.exit(2)


if __name__ == "__main__":
    register_resolvers()
    main()
