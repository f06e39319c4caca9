"""MuonAdamW: one optimizer object with Muon groups for hidden matrices and AdamW groups for the rest.

Every param group carries `kind` ("muon" or "adamw") and `initial_lr`; the trainer schedules learning rates
with `group["lr"] = group["initial_lr"] * multiplier` (and may schedule a Muon group's `momentum`).

Muon (per matrix, gradient G): an EMA momentum buffer M = lerp(M, G, 1 - momentum); with nesterov the step
direction is lerp(G, M, momentum), else M; that direction is orthogonalised with a quintic Newton-Schulz
iteration, scaled by max(1, rows/cols) ** 0.5, and applied after decoupled weight decay.
AdamW: the standard update with bias correction and decoupled weight decay.

Distributed: when torch.distributed is initialised with more than one rank, `step()` averages the gradients
itself (so the model is never wrapped in DDP). AdamW gradients are all-reduced and AdamW state is
replicated. Muon work is sharded: a Muon group's matrices (all of one shape) are split into contiguous
chunks, rank r orthogonalises and updates only its chunk and keeps only that chunk's momentum, so on NCCL
the group's gradients are reduce-scattered (each rank receives only its chunk: half the traffic of an
all-reduce; gloo, which lacks it, all-reduces), then the updates are all-gathered (in bfloat16 on GPU, the
precision Newton-Schulz computed them in) and every rank applies all of them, so every rank holds identical
weights. Every reduction starts asynchronously at the top of `step()`, Muon groups first, each group waits
only for its own, and each group's all-gather runs while the next groups compute; on NCCL the reductions
average (ReduceOp.AVG), on gloo they sum and divide. Optimizer state is therefore per rank: save it per
rank and resume with the same world size. The result equals one process stepping on the whole batch, up to
floating-point summation order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat.configargs import require

# Quintic Newton-Schulz coefficients (Keller Jordan's Muon): they push every singular value of a normalised
# matrix into roughly [0.7, 1.2] in 5 steps, which is as good as exactly 1 for a step direction.
NEWTON_SCHULZ_COEFFS = (3.4445, -4.7750, 2.0315)

ADAMW_DEFAULTS = {"betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": 0.0}
MUON_DEFAULTS = {"momentum": 0.95, "nesterov": True, "ns_steps": 5, "weight_decay": 0.0}


@dataclass
class OptimizerFlags:
    """The learning rates and weight decay every training stage takes as flags (stage configs extend this);
    `GPT.setup_optimizer(**flags.optimizer_kwargs(scale))` turns them into a MuonAdamW."""

    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    matrix_lr: float = 0.02
    scalar_lr: float = 0.5
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr", "weight_decay"):
            value = getattr(self, name)
            require(math.isfinite(value) and value >= 0,
                    f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")

    def optimizer_kwargs(self, lr_scale: float = 1.0) -> dict[str, float]:
        return {"embedding_lr": self.embedding_lr * lr_scale, "unembedding_lr": self.unembedding_lr * lr_scale,
                "matrix_lr": self.matrix_lr * lr_scale, "scalar_lr": self.scalar_lr * lr_scale,
                "weight_decay": self.weight_decay}


def newton_schulz_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype Newton-Schulz works in: bfloat16 on GPU (fast, and the iteration tolerates it), else float32."""
    return torch.bfloat16 if tensor.is_cuda else torch.float32


def newton_schulz(grad: torch.Tensor, steps: int = 5, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately orthogonalise a matrix (or a batch of them): U V^T of its SVD, singular values ~1.

    Works in `newton_schulz_dtype(grad)`; returns `out_dtype` (default grad's dtype).
    """
    a, b, c = NEWTON_SCHULZ_COEFFS
    x = grad.to(newton_schulz_dtype(grad))
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    batched = x.dim() == 3
    x = x if batched else x.unsqueeze(0)
    for _ in range(steps):
        gram = x @ x.mT
        # a*x + (b*gram + c*gram@gram) @ x as two fused multiply-adds (no separate scale and add kernels)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x if batched else x.squeeze(0)
    if transposed:
        x = x.mT
    return x.to(out_dtype or grad.dtype)


def _nccl() -> bool:
    """NCCL has reduce-scatter and a single-buffer all-gather; gloo gets the all-reduce fallback."""
    return dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl"


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class MuonAdamW(torch.optim.Optimizer):
    """Param groups are dicts with `params`, `kind` ("muon" or "adamw"), `lr` and optional kind settings.

    AdamW settings: betas, eps, weight_decay. Muon settings: momentum, nesterov, ns_steps, weight_decay;
    every parameter of a Muon group must be a 2-D matrix of the group's one shape.
    """

    def __init__(self, param_groups):
        super().__init__(param_groups, defaults={})
        # Set by the trainer before each backward: True for the last micro-step of an optimizer step, when
        # gradients are final and `overlap_reductions` hooks may send them. Ignored without those hooks.
        self.reduce_in_backward = False
        self._backward_reductions: _BackwardReductions | None = None

    def overlap_reductions(self, params_in_backward_order) -> bool:
        """Start each gradient's reduction from a hook as soon as backward has produced it (distributed only;
        returns whether hooks were installed). Pass every optimized parameter in the order backward
        finishes them (`GPT.backward_order()`): reductions start in that one order on every rank, as NCCL
        needs. AdamW gradients are all-reduced, each Muon matrix's gradient is reduced to the rank that
        updates it. Only backward passes run with `reduce_in_backward` True send anything; a step with
        none falls back to reducing in `step()`."""
        rank, world = _rank_and_world()
        if world == 1:
            return False
        order = list(params_in_backward_order)
        destinations: dict[torch.Tensor, int | None] = {}
        for group in self.param_groups:
            chunk = -(-len(group["params"]) // world)
            for index, p in enumerate(group["params"]):
                destinations[p] = None if group["kind"] == "adamw" else index // chunk
        if len(order) != len(destinations) or set(order) != set(destinations):
            raise ValueError("overlap_reductions needs every optimized parameter exactly once")
        self._backward_reductions = _BackwardReductions(self, order, destinations)
        for p in order:
            p.register_post_accumulate_grad_hook(self._backward_reductions.grad_ready)
        return True

    def add_param_group(self, param_group: dict) -> None:
        kind = param_group.get("kind")
        if kind not in ("muon", "adamw"):
            raise ValueError(f"every param group needs kind='muon' or kind='adamw', got {kind!r}")
        if "lr" not in param_group:
            raise ValueError(f"a {kind} param group needs an lr")
        defaults = MUON_DEFAULTS if kind == "muon" else ADAMW_DEFAULTS
        for key, value in defaults.items():
            param_group.setdefault(key, value)
        param_group.setdefault("initial_lr", param_group["lr"])
        super().add_param_group(param_group)
        if kind == "muon":
            shapes = {tuple(p.shape) for p in self.param_groups[-1]["params"]}
            if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                raise ValueError(f"a muon param group needs 2-D matrices of one shape, got shapes {sorted(shapes)}")

    @property
    def reductions_started(self) -> int:
        """How many gradient reductions backward hooks have started for the coming `step()`."""
        return self._backward_reductions.next if self._backward_reductions is not None else 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world = _rank_and_world()
        reductions = self._backward_reductions
        # Muon groups first: their reductions lead the queue, so the Newton-Schulz work (most of a step's
        # optimizer time) starts as early as it can; the AdamW groups' all-reduces follow and their cheap
        # element-wise updates run while the Muon updates are being gathered.
        groups = sorted(self.param_groups, key=lambda group: group["kind"] != "muon")
        if reductions is not None and reductions.launched:
            reductions.finish()
            pending = [self._reduced_in_backward(group, rank, world) for group in groups]
        else:
            pending = [self._reduce_gradients(group, world) for group in groups]
        self.reduce_in_backward = False
        gathers = []
        for group, (grads, handles) in zip(groups, pending):
            for handle in handles:
                handle.wait()
            if world > 1 and not _nccl():  # NCCL averaged already (ReduceOp.AVG); gloo only sums
                for grad in grads:
                    grad.div_(world)
            if group["kind"] == "adamw":
                self._adamw_step(group, grads)
            else:
                gathers.append(self._muon_step(group, grads[0], rank, world))
        # The update all-gathers ran while later groups computed; every rank applies every update at the end.
        for gathered in filter(None, gathers):
            group, updates, handle = gathered
            if handle is not None:
                handle.wait()
            self._apply_muon_updates(group, updates[:len(group["params"])])
        return loss

    def _reduced_in_backward(self, group: dict, rank: int, world: int) -> tuple[list[torch.Tensor], list]:
        """This group's gradients as `_reduce_gradients` returns them, after `_BackwardReductions.finish`:
        AdamW the .grad tensors, Muon this rank's chunk stacked (zeros past the last matrix)."""
        if group["kind"] == "adamw":
            return [p.grad for p in group["params"]], []
        params = group["params"]
        chunk = -(-len(params) // world)
        mine = torch.zeros((chunk, *params[0].shape), dtype=params[0].dtype, device=params[0].device)
        owned = params[rank * chunk:(rank + 1) * chunk]
        if owned:
            torch.stack([p.grad for p in owned], out=mine[:len(owned)])
        return [mine], []

    def _reduce_gradients(self, group: dict, world: int) -> tuple[list[torch.Tensor], list]:
        """Start averaging this group's gradients across ranks; return the tensors and the async handles.

        AdamW: the parameters' own .grad tensors (parameters without a gradient are skipped). Muon: one
        stacked (padded to a multiple of the world size) tensor, a missing gradient counting as zero.
        """
        if group["kind"] == "adamw":
            grads = [p.grad for p in group["params"] if p.grad is not None]
        else:
            params = group["params"]
            padded = -(-len(params) // world) * world
            stacked = torch.empty((padded, *params[0].shape), dtype=params[0].dtype, device=params[0].device)
            if all(p.grad is not None for p in params):
                torch.stack([p.grad for p in params], out=stacked[:len(params)])
                stacked[len(params):].zero_()
            else:
                stacked.zero_()
                for i, p in enumerate(params):
                    if p.grad is not None:
                        stacked[i].copy_(p.grad)
            if world > 1 and _nccl():
                mine = torch.empty((padded // world, *params[0].shape), dtype=stacked.dtype, device=stacked.device)
                return [mine], [dist.reduce_scatter_tensor(mine, stacked, op=dist.ReduceOp.AVG, async_op=True)]
            grads = [stacked]
        op = dist.ReduceOp.AVG if _nccl() else dist.ReduceOp.SUM
        handles = [dist.all_reduce(g, op=op, async_op=True) for g in grads] if world > 1 else []
        return grads, handles

    def _adamw_step(self, group: dict, grads: list[torch.Tensor]) -> None:
        """One AdamW step for the whole group in PyTorch's fused multi-tensor kernel (`torch._fused_adamw_`:
        one pass over parameters, gradients and moments, where separate foreach ops made eight).

        Each parameter's step count is a float32 tensor on its device, as that kernel reads it; a count
        saved as a Python int, or loaded onto the CPU by `load_state_dict`, is moved there first."""
        beta1, beta2 = group["betas"]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            elif not torch.is_tensor(state["step"]) or state["step"].device != p.device:
                state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32, device=p.device)
        steps = [self.state[p]["step"] for p in params]
        torch._foreach_add_(steps, 1)
        torch._fused_adamw_(params, list(grads), [self.state[p]["exp_avg"] for p in params],
                            [self.state[p]["exp_avg_sq"] for p in params], [], steps, lr=group["lr"],
                            beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                            amsgrad=False, maximize=False)

    def _muon_step(self, group: dict, grads: torch.Tensor, rank: int, world: int):
        """Orthogonalise this rank's chunk of the group's matrices with one batched Newton-Schulz call, then
        apply the updates (one process) or start sharing them (distributed). `grads` is this rank's chunk
        (reduce-scattered on NCCL) or the whole stacked group (one process, or gloo: no reduce-scatter).

        Distributed, the updates travel in Newton-Schulz's own dtype (bfloat16 on GPU: half the bytes of
        float32 weights, and exact, since that is the precision they were computed in) and every rank applies
        all of them, so the weights stay identical. Returns None on one process, else (group, gathered
        updates, async handle or None) for the caller to wait on and apply."""
        params = group["params"]
        chunk = -(-len(params) // world)
        mine = grads if grads.size(0) == chunk else grads[rank * chunk:(rank + 1) * chunk]
        owned = range(rank * chunk, min((rank + 1) * chunk, len(params)))
        # one process applies its own float32 updates; ranks share them in the dtype they were computed in
        update_dtype = newton_schulz_dtype(params[0]) if world > 1 else params[0].dtype
        updates = None
        if len(owned) > 0:
            owned_params = [params[i] for i in owned]
            for p in owned_params:
                if not self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            buffers = [self.state[p]["momentum_buffer"] for p in owned_params]
            owned_grads = mine[:len(owned)]
            momentum = group["momentum"]
            torch._foreach_lerp_(buffers, list(owned_grads.unbind(0)), 1 - momentum)
            stacked_buffers = torch.stack(buffers)
            directions = owned_grads.lerp(stacked_buffers, momentum) if group["nesterov"] else stacked_buffers
            updates = newton_schulz(directions, group["ns_steps"], out_dtype=update_dtype)
        if world == 1:
            self._apply_muon_updates(group, updates)
            return None
        rows, cols = params[0].shape
        mine_updates = torch.zeros((chunk, rows, cols), dtype=update_dtype, device=params[0].device)
        if updates is not None:
            mine_updates[:len(owned)].copy_(updates)
        everything = torch.empty((chunk * world, rows, cols), dtype=update_dtype, device=params[0].device)
        if _nccl():
            return group, everything, dist.all_gather_into_tensor(everything, mine_updates, async_op=True)
        dist.all_gather(list(everything.chunk(world)), mine_updates)
        return group, everything, None

    @staticmethod
    def _apply_muon_updates(group: dict, updates: torch.Tensor) -> None:
        """Decoupled weight decay on every matrix of the group, then each -= lr * max(1, rows/cols) ** 0.5 * update."""
        params = group["params"]
        rows, cols = params[0].shape
        lr, weight_decay = group["lr"], group["weight_decay"]
        if weight_decay:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        torch._foreach_add_(params, list(updates.unbind(0)), alpha=-lr * max(1.0, rows / cols) ** 0.5)


class _BackwardReductions:
    """Gradient reductions started from post-accumulate-grad hooks during backward, in one fixed order.

    A hook marks its parameter ready; reductions then start for the longest ready prefix of `order`, so
    every rank issues the same collectives in the same order whatever order its hooks fire in. `finish()`
    starts what backward did not (a parameter without a gradient reduces zeros) and waits for everything.
    """

    def __init__(self, optimizer: MuonAdamW, order: list[torch.Tensor],
                 destinations: dict[torch.Tensor, int | None]):
        self.optimizer = optimizer
        self.order = order
        self.destinations = destinations
        self.ready: set[torch.Tensor] = set()
        self.next = 0
        self.handles: list = []

    @property
    def launched(self) -> bool:
        return self.next > 0

    def grad_ready(self, param: torch.Tensor) -> None:
        if not self.optimizer.reduce_in_backward:
            return
        self.ready.add(param)
        while self.next < len(self.order) and self.order[self.next] in self.ready:
            self._launch(self.order[self.next])

    def _launch(self, param: torch.Tensor) -> None:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        op = dist.ReduceOp.AVG if _nccl() else dist.ReduceOp.SUM
        destination = self.destinations[param]
        if destination is None:
            self.handles.append(dist.all_reduce(param.grad, op=op, async_op=True))
        else:
            self.handles.append(dist.reduce(param.grad, dst=destination, op=op, async_op=True))
        self.next += 1

    def finish(self) -> None:
        while self.next < len(self.order):
            self._launch(self.order[self.next])
        for handle in self.handles:
            handle.wait()
        self.handles.clear()
        self.ready.clear()
        self.next = 0
