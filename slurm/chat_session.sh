#!/bin/bash
# Chat with a trained model on a GPU node of the cluster.
#
#   bash slurm/chat_session.sh            web UI (python -m scripts.chat_web); tunnel its port to your laptop
#   bash slurm/chat_session.sh cli        terminal chat (python -m scripts.chat_cli)
#   bash slurm/chat_session.sh web --port 8000 ...   further flags go to the chat script
#
# Asks SLURM for one GPU for CHAT_TIME (default 2:00:00) with an interactive shell (srun --pty), using
# the site's cache (NANOCHAT_BASE_DIR from `python -m launch --print-config`) and your .env.local's
# account and partition. Compute nodes are offline, so the model and tokenizer must already be in the cache.
set -euo pipefail

mode="${1:-web}"
case "$mode" in
    web) module=scripts.chat_web ;;
    cli) module=scripts.chat_cli ;;
    *) echo "usage: bash slurm/chat_session.sh [web|cli] [flags for the chat script]" >&2; exit 2 ;;
esac
shift || true

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
site="${NANOCHAT_SITE:-a100-slurm}"
config="$(python -m launch --site "$site" --print-config)"
setting() { awk -v key="$1" '$1 == key { print $2 }' <<<"$config"; }

cache="$(setting NANOCHAT_BASE_DIR)"
srun_args=(--nodes=1 --ntasks=1 --gpus=1 --cpus-per-task=8 --time="${CHAT_TIME:-2:00:00}" --pty)
account="$(setting SBATCH_ACCOUNT)"
partition="$(setting SBATCH_PARTITION)"
[ "$account" != "(unset)" ] && srun_args+=(--account="$account")
[ "$partition" != "(unset)" ] && srun_args+=(--partition="$partition")

echo "chat: $module on one GPU, cache $cache"
[ "$mode" = web ] && echo "chat: once it prints its port, tunnel it: ssh -L 8000:<node>:8000 <login node>"
exec srun "${srun_args[@]}" env NANOCHAT_BASE_DIR="$cache" HF_HUB_OFFLINE=1 WANDB_MODE=offline \
    python -m "$module" "$@"
