"""Reinforcement learning on GSM8K-style problems: `python -m scripts.chat_rl`, starting from the SFT model.

A simple on-policy policy gradient (GRPO without clipping or KL): each step takes `--examples-per-step`
training problems; for each, the Engine samples `--num-samples` answers at temperature 1 (calculator tool
on), a rank's problems decoded together in batches of up to `--rollout-batch-size` answers
(`Engine.generate_batches`). An answer earns reward 1 when its final number (after `####`, else its last number) equals the
reference. Advantage = reward - the mean reward of that problem's samples, and the loss is
-sum(advantage * log-prob of each sampled assistant token) divided by the number of those tokens over the
step (tool outputs and the prompt are not trained on; a problem whose samples all score the same gives no
signal and is skipped). Learning rates start at `--init-lr-frac` of the SFT
ones and decay linearly to 0. GSM8K test pass@1 (greedy) is measured every `--eval-every` steps.

Writes chatrl_checkpoints/<tag>/ (atomic, meta with the model config), resumes by itself, saves and exits 75
on SIGUSR1/SIGUSR2/SIGTERM, exits 3 on a non-finite loss. Report section `chat_rl` with `reward_history`
([[step, mean reward]]) and `gsm8k_history` ([[step, pass@1]]).
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from nanochat import checkpoint as ckpt
from nanochat.chat_eval_runner import evaluate_task
from nanochat.configargs import EXIT_OK, UsageError, require, run_stage
from nanochat.engine import Engine, batch_decode_path
from nanochat.gpt import GPT
from nanochat.optim import OptimizerFlags
from nanochat.paths import base_dir, checkpoint_dir, tokenizer_dir
from nanochat.report import write_section
from nanochat.runtime import print0, print0_before_setup, setup_runtime, teardown_runtime
from nanochat.step_loop import (
    StepSchedule,
    require_same_run,
    restore_rng_and_optimizer,
    rng_and_optimizer_state,
    run_steps,
    start_over,
    step_to_resume,
)
from nanochat.stopping import StopRequest
from nanochat.tasks import GSM8K, require_available
from nanochat.tasks.gsm8k import final_number
from nanochat.tokenizer import Tokenizer
from nanochat.training_loop import finished_step, resolve_source, source_model_config

SOURCE_PHASE = "chatsft"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass
class ChatRLConfig(OptimizerFlags):
    """Policy-gradient fine-tuning of the SFT model on GSM8K-style train problems."""

    model_tag: str | None = field(default=None, metadata={
        "help": "tag of the SFT checkpoint, also the output folder (default: the newest SFT tag)"})
    step: int | None = field(default=None, metadata={"help": "SFT checkpoint step (default: its latest)"})
    num_iterations: int = field(default=-1, metadata={"help": "optimizer steps; -1: one pass over the problems"})
    examples_per_step: int = field(default=16, metadata={"help": "problems per step over all devices"})
    num_samples: int = field(default=16, metadata={"help": "sampled answers per problem"})
    max_new_tokens: int = field(default=256, metadata={"help": "longest sampled answer"})
    temperature: float = 1.0
    top_k: int | None = 50
    device_batch_size: int = field(default=8, metadata={"help": "sequences per forward/backward pass"})
    rollout_batch_size: int = field(default=256, metadata={
        "help": "most answers sampled in one batch (whole problems of --num-samples each); its KV cache holds "
                "this many rows of prompt + --max-new-tokens positions"})
    init_lr_frac: float = field(default=0.05, metadata={"help": "learning rates start at this share of the SFT ones"})
    eval_every: int = field(default=60, metadata={"help": "steps between GSM8K pass@1 checks (-1: only at the end)"})
    eval_examples: int = field(default=400, metadata={"help": "GSM8K test problems per check"})
    save_every: int = field(default=60, metadata={
        "help": "steps between checkpoints (0 or less: none in between); one is always written at the end"})
    keep_checkpoints: int = field(default=2, metadata={
        "help": "checkpoints kept while training, the newest ones (0 or less: all)"})
    resume: bool = field(default=True, metadata={"help": "continue from the latest complete checkpoint of this tag"})
    force: bool = field(default=False, metadata={
        "help": "start this tag over (its checkpoints are replaced), even if finished; the same command "
                "again resumes a stopped --force run"})
    seed: int = 42
    device_type: str = field(default="auto", metadata={"help": "auto, cuda, mps or cpu"})
    precision: Literal["auto", "bf16", "fp32"] = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("examples_per_step", "num_samples", "max_new_tokens", "device_batch_size", "eval_examples",
                     "rollout_batch_size"):
            require(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        require(self.num_samples > 1, "--num-samples must be at least 2: advantages compare samples of a problem")
        require(self.rollout_batch_size >= self.num_samples,
                f"--rollout-batch-size {self.rollout_batch_size} must be at least --num-samples {self.num_samples}: "
                "a problem's samples are decoded in one batch")
        require(self.num_iterations == -1 or self.num_iterations > 0, "--num-iterations must be positive or -1")
        require(self.eval_every == -1 or self.eval_every > 0, "--eval-every must be positive or -1")
        require(math.isfinite(self.temperature) and self.temperature > 0,
                f"--temperature must be a finite number > 0 (on-policy RL needs sampling), got {self.temperature}")
        require(self.top_k is None or self.top_k > 0, "--top-k must be positive (or none)")
        require(0 < self.init_lr_frac <= 1, "--init-lr-frac must be in (0, 1]")
        require(self.device_type in ("auto", "cuda", "mps", "cpu"), "--device-type must be auto, cuda, mps or cpu")


def answer_number(text: str) -> str | None:
    """The number after the last `####`, else the last number in the text (thousands separators removed)."""
    number = final_number(text)
    if number is not None:
        return number
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    number = numbers[-1].replace(",", "")
    return number.rstrip("0").rstrip(".") if "." in number else number


def reward(example: dict[str, Any], completion: str) -> float:
    return 1.0 if answer_number(completion) == example["answer"] else 0.0


def rollout_sequences(engine: Engine, tokenizer: Tokenizer, examples: list[dict[str, Any]], config: ChatRLConfig,
                      seed: int) -> list[tuple[list[list[int]], list[list[int]], list[float]]]:
    """Sample answers to several problems, decoded together: per problem, (prompt + answer token lists,
    their training masks, rewards).

    The mask is 1 on sampled answer tokens and 0 on the prompt and on tool outputs. An answer that ended
    before the token limit gets its `<|assistant_end|>` back (trained on), so the model learns to stop.
    """
    prompts = [tokenizer.render_for_completion(example) for example in examples]
    generated = engine.generate_batches(prompts, num_samples=config.num_samples, max_tokens=config.max_new_tokens,
                                        temperature=config.temperature, top_k=config.top_k, seed=seed)
    return [_scored(engine, tokenizer, example, prompt, answers, masks, config)
            for example, prompt, (answers, masks) in zip(examples, prompts, generated)]


def _scored(engine, tokenizer, example, prompt, answers, masks, config):
    """One problem's sequences, masks and rewards (see rollout_sequences)."""
    end = tokenizer.special_id("<|assistant_end|>")
    sequences, sequence_masks, rewards = [], [], []
    for answer, mask in zip(answers, masks):
        rewards.append(reward(example, tokenizer.decode(answer)))
        stopped = len(answer) < config.max_new_tokens and len(prompt) + len(answer) < engine.max_context
        sequences.append(prompt + answer + ([end] if stopped else []))
        sequence_masks.append([0] * len(prompt) + mask + ([1] if stopped else []))
    return sequences, sequence_masks, rewards


def policy_gradient_batches(sequences, masks, advantages, batch_size: int, pad_id: int, device):
    """(inputs, targets, advantages) micro-batches; targets are -1 where the mask is 0 or on padding."""
    for start in range(0, len(sequences), batch_size):
        chunk = range(start, min(start + batch_size, len(sequences)))
        width = max(len(sequences[i]) for i in chunk) - 1
        inputs = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        targets = torch.full((len(chunk), width), -1, dtype=torch.long)
        for row, i in enumerate(chunk):
            ids = torch.tensor(sequences[i], dtype=torch.long)
            keep = torch.tensor(masks[i][1:], dtype=torch.bool)
            inputs[row, :len(ids) - 1] = ids[:-1]
            targets[row, :len(ids) - 1] = torch.where(keep, ids[1:], torch.full_like(ids[1:], -1))
        yield (inputs.to(device), targets.to(device),
               torch.tensor([advantages[i] for i in chunk], dtype=torch.float32, device=device))


def main(config: ChatRLConfig) -> int:
    source = resolve_source(SOURCE_PHASE, config)  # a missing checkpoint is found before any dataset fetch
    train_task, test_task = GSM8K("train"), GSM8K("test")
    require_available([train_task, test_task])
    model_config = source_model_config(source)
    out_dir = checkpoint_dir("chatrl", source.tag)
    done = finished_step(out_dir)
    if done is not None and not config.force:
        print0_before_setup(f"chat_rl: {out_dir} already holds the finished run (step {done}); nothing to do "
                            "(--force trains again)")
        return EXIT_OK
    tokenizer = Tokenizer.load(tokenizer_dir())
    require(tokenizer.vocab_size == model_config.vocab_size,
            f"the tokenizer has {tokenizer.vocab_size} tokens but the SFT model expects {model_config.vocab_size}")
    try:
        runtime = setup_runtime(config.device_type, seed=config.seed, precision=config.precision)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    try:
        require(config.examples_per_step % runtime.world_size == 0,
                f"--examples-per-step {config.examples_per_step} must be a multiple of the number of processes "
                f"({runtime.world_size})")
        return _train(config, runtime, source, model_config, tokenizer, train_task, test_task, out_dir)
    finally:
        teardown_runtime(runtime)


def _train(config, runtime, source, model_config, tokenizer, train_task, test_task, out_dir) -> int:
    device = runtime.device
    if runtime.is_master:
        ckpt.remove_stale_temporaries(out_dir)
    runtime.barrier()
    start_step = step_to_resume(out_dir, dataclasses.asdict(config), config.resume, config.force)
    meta = ckpt.read_meta(out_dir, start_step) if start_step is not None else None
    source_meta = {"phase": source.phase, "tag": source.tag, "step": source.step, "directory": str(source.directory)}
    problems = len(train_task)
    num_iterations = config.num_iterations if config.num_iterations > 0 else max(1, problems // config.examples_per_step)
    run_settings = {"num_iterations": num_iterations, "examples_per_step": config.examples_per_step,
                    "num_samples": config.num_samples, "max_new_tokens": config.max_new_tokens,
                    "temperature": config.temperature, "top_k": config.top_k, "init_lr_frac": config.init_lr_frac,
                    "seed": config.seed, **config.optimizer_kwargs()}
    if meta is not None:
        require(meta["world_size"] == runtime.world_size,
                f"the checkpoint at step {start_step} in {out_dir} was written by {meta['world_size']} processes; "
                f"resume with the same number (now {runtime.world_size}) or pass --force")
        require(meta["source"]["step"] == source.step,
                f"the checkpoint in {out_dir} continues SFT step {meta['source']['step']}, not {source.step}; "
                "pass --force to start over")
        require_same_run(meta, run_settings, f"the checkpoint at step {start_step} in {out_dir}")
        model_state, optim_state, meta = ckpt.load_checkpoint(out_dir, start_step, device, rank=runtime.rank)
    else:
        model_state, optim_state, _ = ckpt.load_checkpoint(source.directory, source.step, device,
                                                           load_optimizer=False)
    with torch.device("meta"):
        model = GPT(model_config)
    model.to_empty(device=device)
    model.init_weights()
    model.load_state_dict(model_state)
    del model_state
    optimizer = model.setup_optimizer(**config.optimizer_kwargs())
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"] * config.init_lr_frac
    loop: dict[str, Any] = {"step": 0, "training_seconds": 0.0, "reward_history": [], "gsm8k_history": [],
                            "samples_seen": 0}
    if meta is not None:
        restore_rng_and_optimizer(optimizer, optim_state, runtime)
        loop = meta["loop_state"]
        print0(runtime, f"resumed from {out_dir} at step {start_step}")
    else:
        print0(runtime, f"starting from {source.phase} checkpoint {source.directory} step {source.step}")

    order = list(range(problems))
    random.Random(config.seed).shuffle(order)
    engine = Engine(model, tokenizer, decode=batch_decode_path(device))
    stop = StopRequest().install()
    print0(runtime, f"chat_rl: {problems:,} train problems, {num_iterations} steps of {config.examples_per_step} "
                    f"problems x {config.num_samples} samples, decoded on the {engine.decode!r} path")

    def evaluate(step: int) -> None:
        model.eval()
        score = evaluate_task("GSM8K", test_task, model, tokenizer, device, max_per_task=config.eval_examples,
                              max_new_tokens=config.max_new_tokens, temperature=0.0, rank=runtime.rank,
                              world_size=runtime.world_size, keep_samples=0)
        loop["gsm8k_history"].append([step, score.accuracy])
        print0(runtime, f"step {step:06d} | GSM8K test pass@1 {score.accuracy:.4f} ({score.correct}/{score.total})")

    def save(step: int, finished: bool) -> None:
        if finished and runtime.is_master:  # before the meta that marks the run finished (see run_finetune)
            _write_report(config, runtime, source_meta, num_iterations, loop)
        optim_out = rng_and_optimizer_state(optimizer, runtime)
        meta_out = {"model_config": dataclasses.asdict(model_config), "user_config": dataclasses.asdict(config),
                    "source": source_meta, "num_iterations": num_iterations, "run_settings": run_settings,
                    "loop_state": {**loop, "step": step}, "finished": finished}
        ckpt.save_checkpoint(out_dir, step, model.state_dict(), optim_out, meta_out, rank=runtime.rank,
                             world_size=runtime.world_size, barrier=runtime.barrier,
                             keep=0 if finished else config.keep_checkpoints)
        print0(runtime, f"step {step:06d} | checkpoint saved to {out_dir}")

    def train_step(step: int) -> bool:
        t0 = time.perf_counter()
        stats = _rl_step(config, runtime, model, engine, tokenizer, train_task, order, step, num_iterations,
                         optimizer)
        if not math.isfinite(stats["loss"]):
            print0(runtime, f"step {step:06d} | loss is {stats['loss']}: training diverged. The last good checkpoint "
                            f"in {out_dir} is kept; lower --init-lr-frac and resume.")
            return False
        dt = time.perf_counter() - t0
        step += 1
        loop["training_seconds"] += dt
        loop["samples_seen"] += config.examples_per_step * config.num_samples
        loop["reward_history"].append([step, stats["reward"]])
        print0(runtime, f"step {step:06d}/{num_iterations:06d} | mean reward {stats['reward']:.4f} | loss "
                        f"{stats['loss']:+.5f} | sampled tokens {stats['tokens']:,} | samples with a signal "
                        f"{stats['active']} | lr x{stats['lr_mult']:.3f} "
                        f"| dt {dt:.1f} s")
        return True

    if meta is None:
        start_over(out_dir, runtime)
    return run_steps(loop["step"], StepSchedule(num_iterations, config.eval_every, config.save_every), stop, runtime,
                     train_step=train_step, evaluate=evaluate, save=save, evaluations=loop["gsm8k_history"])


def _rl_step(config, runtime, model, engine, tokenizer, train_task, order, step, num_iterations,
             optimizer) -> dict[str, float]:
    """Sample, score and take one policy-gradient step; statistics are summed over ranks."""
    device = runtime.device
    first = step * config.examples_per_step
    mine = range(first + runtime.rank, first + config.examples_per_step, runtime.world_size)
    sequences, masks, advantages, rewards = [], [], [], []
    model.eval()
    for seqs, seq_masks, seq_rewards in _rollouts(config, engine, tokenizer, train_task, order, mine):
        mean = sum(seq_rewards) / len(seq_rewards)
        sequences += seqs
        masks += seq_masks
        rewards += seq_rewards
        advantages += [r - mean for r in seq_rewards]
    model.train()
    # Samples whose advantage is 0 (every sample of their problem scored the same) carry no gradient: they
    # count in the token normalisation but are not run through the model.
    active = [i for i, advantage in enumerate(advantages) if advantage != 0]
    counts = torch.tensor([sum(sum(m[1:]) for m in masks), sum(rewards), len(rewards), len(active)],
                          dtype=torch.float64, device=device)
    if runtime.distributed:
        dist.all_reduce(counts)
    trained_tokens, reward_sum, samples, active_samples = counts.tolist()
    denominator = max(trained_tokens, 1.0) / runtime.world_size
    lr_mult = 1.0 - step / num_iterations
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_mult
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    batches = policy_gradient_batches([sequences[i] for i in active], [masks[i] for i in active],
                                      [advantages[i] for i in active], config.device_batch_size, tokenizer.bos_id,
                                      device)
    for inputs, targets, batch_advantages in batches:
        with runtime.autocast():
            token_nll = model(inputs, targets, loss_reduction="none")  # 0 where targets are -1
        objective = ((-token_nll).sum(dim=1) * batch_advantages).sum()
        loss = -objective / denominator
        loss.backward()
        loss_sum += loss.detach().double()
    if runtime.distributed:
        dist.all_reduce(loss_sum)
    loss_value = (loss_sum / runtime.world_size).item()
    if active_samples > 0 and math.isfinite(loss_value):
        for param in model.parameters():  # a rank without active samples still joins the gradient all-reduce
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return {"loss": loss_value, "reward": reward_sum / max(samples, 1.0), "tokens": int(trained_tokens),
            "active": int(active_samples), "lr_mult": lr_mult}


def _rollouts(config, engine, tokenizer, train_task, order, positions):
    """Each problem's (sequences, masks, rewards), problems decoded in chunks of up to --rollout-batch-size
    answers; a chunk samples with the seed config.seed + the position of its first problem."""
    positions = list(positions)
    per_chunk = config.rollout_batch_size // config.num_samples
    for first in range(0, len(positions), per_chunk):
        chunk = positions[first:first + per_chunk]
        examples = [train_task[order[position % len(order)]] for position in chunk]
        yield from rollout_sequences(engine, tokenizer, examples, config, seed=config.seed + chunk[0])


def _write_report(config, runtime, source_meta, num_iterations, loop) -> None:
    rewards, evals = loop["reward_history"], loop["gsm8k_history"]
    write_section("chat_rl", {
        "settings": dataclasses.asdict(config),
        "source": f"{source_meta['phase']}_checkpoints/{source_meta['tag']} step {source_meta['step']}",
        "device": str(runtime.device) if runtime.device_type != "cuda" else torch.cuda.get_device_name(),
        "world_size": runtime.world_size,
        "num_iterations": num_iterations,
        "samples_seen": loop["samples_seen"],
        "seconds": loop["training_seconds"],
        "final_mean_reward": rewards[-1][1] if rewards else None,
        "first_gsm8k_pass1": evals[0][1] if evals else None,
        "final_gsm8k_pass1": evals[-1][1] if evals else None,
        "reward_history": rewards,
        "gsm8k_history": evals,
    }, root=base_dir())


def cli(argv=None) -> int:
    return run_stage(main, ChatRLConfig, argv, prog="python -m scripts.chat_rl")


if __name__ == "__main__":
    sys.exit(cli())
