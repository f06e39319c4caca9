#!/usr/bin/env bash
# Offline-data step: run this on a node WITH internet (login/devel node) before training on a site whose
# compute nodes are offline. It fetches the pretraining shards, the CORE eval bundle and the HF datasets
# into the cache, verified, then trains the tokenizer.
#
#   bash scripts/download_data.sh [--site S] [--shards N] [--yes] [--skip-datasets] [--skip-eval-bundle]
#                                 [--skip-tokenizer] [--cache-dir DIR] [--base-url URL] [--workers N] ...
#
# Cache root: --cache-dir, else $NANOCHAT_BASE_DIR, else NANOCHAT_BASE_DIR from .env.local or env/<site>.env,
# else ~/.cache/nanochat; --shards defaults to the site's SHARDS. Without a terminal (sbatch, nohup) pass
# --yes: it never waits for an answer.
# All flags: python -m scripts.download_data --help. Python: $PYTHON, else python, else python3.
# Exit status: 0 all verified, 1 some item failed (listed; run again to resume), 2 usage error or
# declined, 130 interrupted (run again to resume).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

if [[ -n "${PYTHON:-}" ]]; then
    python_bin="$PYTHON"
elif command -v python >/dev/null 2>&1; then
    python_bin="python"
else
    python_bin="python3"
fi

exec "$python_bin" -m scripts.download_data "$@"
