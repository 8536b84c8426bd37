#!/bin/bash
# EXAMPLE, not for running: the sbatch script that Hydra's submitit launcher rendered for
# `make efficiency LAUNCHER=slurm` (conf/hydra/launcher/slurm.yaml defaults; one array job, one task
# per model of conf/experiment/efficiency.yaml), captured on the local test cluster (scripts/slurm_local.py).
# Machine-specific paths are replaced by placeholders: <repo> is the checkout (and <repo>/.venv its venv).

# Parameters
#SBATCH --array=0-5%6
#SBATCH --cpus-per-task=8
#SBATCH --error=<repo>/outputs/multirun/efficiency/2026-11-22_20-41-50/.submitit/%A_%a/%A_%a_0_log.err
#SBATCH --gpus-per-node=1
#SBATCH --job-name=lineareval-efficiency
#SBATCH --mem=64GB
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=<repo>/outputs/multirun/efficiency/2026-11-22_20-41-50/.submitit/%A_%a/%A_%a_0_log.out
#SBATCH --signal=USR2@120
#SBATCH --time=1440
#SBATCH --wckey=submitit

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output <repo>/outputs/multirun/efficiency/2026-11-22_20-41-50/.submitit/%A_%a/%A_%a_%t_log.out --error <repo>/outputs/multirun/efficiency/2026-11-22_20-41-50/.submitit/%A_%a/%A_%a_%t_log.err <repo>/.venv/bin/python -u -m submitit.core._submit <repo>/outputs/multirun/efficiency/2026-11-22_20-41-50/.submitit/%j
