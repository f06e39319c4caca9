#!/usr/bin/env bash
# System packages the tests need: a real SLURM cluster (slurm-wlm, munge, MariaDB for sacct) and Chromium.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if [ -f .ci/install_slurm.sh ]; then
    bash .ci/install_slurm.sh
fi
bash .ci/install_browser.sh
