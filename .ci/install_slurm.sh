#!/usr/bin/env bash
# Install the Debian/Ubuntu packages that tests/slurm_cluster.py needs to start a
# throwaway single-node SLURM cluster (slurmctld + slurmd + slurmdbd + MariaDB).
# Idempotent and non-interactive; run as root or with passwordless sudo.
# The packages' own system services are stopped and disabled: the test harness
# starts its own daemons with configs under a temp dir.
set -euo pipefail

packages=(slurm-wlm slurmdbd slurm-client mariadb-server munge)

if [ "$(id -u)" -eq 0 ]; then sudo=(); else sudo=(sudo -n); fi

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The harness runs its own daemons; the distribution's services must not hold
# the ports, pid files or the MariaDB socket. Without systemd (containers) this
# is a no-op.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    for svc in slurmctld slurmd slurmdbd mariadb munge; do
        "${sudo[@]}" systemctl disable --now "$svc" >/dev/null 2>&1 || true
    done
fi

for bin in slurmctld slurmd slurmdbd sbatch sacct mariadb-install-db mariadbd; do
    if ! command -v "$bin" >/dev/null 2>&1 && ! [ -x "/usr/sbin/$bin" ]; then
        echo "install_slurm.sh: $bin not found after install" >&2
        exit 1
    fi
done
echo "install_slurm.sh: slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm) ready for tests/slurm_cluster.py"
