#!/usr/bin/env bash
# Install what the local Slurm test cluster needs (scripts/slurm_local.py, tests/test_slurm.py): Debian's
# slurm-wlm, munge, slurmdbd and mariadb-server. Idempotent, and best effort: it exits 0 when everything is
# there, after installing it (as root, with apt-get), or with a message saying why it cannot; the Slurm
# tests then skip and name what is missing. The packages' init services are not used (nor started where
# init services are blocked); the tests start every daemon by hand with its state in a temporary folder.
set -u
PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)
PROGRAMS=(munged mariadbd mariadb-install-db slurmdbd slurmctld slurmd sbatch squeue sinfo sacct scancel srun)

missing() {
  local program
  for program in "${PROGRAMS[@]}"; do
    PATH="$PATH:/usr/sbin:/usr/local/sbin" command -v "$program" >/dev/null || echo "$program"
  done
}

absent=$(missing)
if [ -z "$absent" ]; then
  echo "install_slurm: Slurm, munge and MariaDB are installed"
  exit 0
fi
echo "install_slurm: missing:" $absent
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "install_slurm: cannot install here (needs root and apt-get); as root on Debian/Ubuntu:"
  echo "  apt-get install ${PACKAGES[*]}"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if apt-get update -qq && apt-get install -y -qq "${PACKAGES[@]}" >/dev/null; then
  absent=$(missing)
  [ -z "$absent" ] && echo "install_slurm: installed ${PACKAGES[*]}" || echo "install_slurm: still missing:" $absent
else
  echo "install_slurm: apt-get failed; the Slurm tests will skip"
fi
exit 0
