"""launch: turns a site profile plus a request into stage commands, an environment and an executor.

    python -m launch [--site S] [--stages a,b | --from STAGE] [--dry-run | --print-config | --check]

Modules: keys (every setting and its meaning), sites (env/<site>.env and .env.local files), detect (which
site this machine is), config (layered resolution into typed sections), stages (the pipeline as data),
commands (python / torchrun / srun command lines), preflight (inputs, disk, batch and GPU checks),
executors (local subprocesses, SLURM through submitit), slurm_env (the only reader of SLURM_*),
logs (logs/<site>/<launch-id>/), memory (the GPU-memory and disk estimates), cli (the command line).
The launcher never imports torch or model code.
"""
