"""Training: one block at a time is the unit of work; schedules order the blocks (method.md section 3).

Every random draw of block b at its step s (batch, noise level, noise, dropped labels) comes from a
generator seeded by (seed, b, s), and its initial weights from (seed, b). A block's result
therefore does not depend on the schedule that trained it, nor on where it was resumed.
What a block is, what its batches hold and what its loss takes are its task's (`tasks/`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import checkpoint, distributed, precision, rundir
from .config import ConfigError, RunConfig, TrainConfig
from .data import tensor_bytes, to_device
from .noise import Partition
from .seeding import make_generator

logger = logging.getLogger(__name__)


class Coupling:
    """What the blocks of one run hand each other, or share, while they train. The default: nothing.

    DiffusionBlocks' blocks are independent, and most tasks need none of this. One exception is the
    classifier whose label-embedding table is learned by block 0 and then frozen for the others, or
    learned jointly by all of them (`tasks/classification.py`).
    """

    # Blocks share trained parameters: after interleaved training every block's files are written
    # again, so that each holds the final values.
    rewrite_at_end: bool = False

    def attach(self, b: int, block: nn.Module) -> None:
        """Block b was just built and moved to its device: give it what it takes from other blocks.

        Runs before its optimiser is made, so a parameter put in here is trained by it.
        """

    def resumed(self, blocks: dict[int, nn.Module]) -> None:
        """The schedule has built its resident blocks and loaded whatever training state they had saved."""

    def save(self, run_dir: Path, block: nn.Module) -> None:
        """A block is being checkpointed: write what the blocks share (before the block's own files)."""


class TrainableTask(Protocol):
    """What the trainer asks of a run's task (`diffusionblocks.tasks.Task` implements it): the partition of its
    noise axis, its blocks, each block's batches and loss inputs, and what blocks hand each other."""

    noise_symbol: ClassVar[str]

    def partition(self, cfg: RunConfig) -> Partition: ...

    def build_block(self, cfg: RunConfig, b: int, generator: torch.Generator | None = None) -> nn.Module: ...

    def batch_sampler(self, cfg: RunConfig, data: Any, b: int) -> Any: ...

    def loss_inputs(self, cfg: RunConfig, partition: Partition, b: int, batch: Any,
                    generator: torch.Generator) -> dict[str, Any]: ...

    def coupling(self, cfg: RunConfig, run_dir: Path | None, device: torch.device,
                 trained: dict[int, Any]) -> Coupling: ...


@dataclass
class BlockState:
    """Everything one block's training needs: its denoiser, optimiser, optional EMA copy and step count.

    An offloaded state keeps only its counters; its weights and optimiser state are in the run directory.
    """

    b: int
    denoiser: nn.Module | None
    optimizer: torch.optim.Optimizer | None
    ema: nn.Module | None
    step: int = 0
    train_time_s: float = 0.0  # wall time spent in this block's steps, over all sessions
    ddp: nn.Module | None = None  # DenoiserLoss wrapped in DistributedDataParallel, when data-parallel
    precision: str = "fp32"       # the forward pass' arithmetic (precision.resolve of train.precision)
    loss_fn: Any = None           # denoiser.loss, compiled when train.compile is on

    @property
    def inference_module(self) -> nn.Module:
        return self.ema if self.ema is not None else self.denoiser

    @property
    def resident(self) -> bool:
        return self.denoiser is not None

    def offload(self) -> None:
        """Drops the weights, EMA and optimiser state from memory (they must have been saved)."""
        self.denoiser = self.optimizer = self.ema = self.ddp = self.loss_fn = None


class DenoiserLoss(nn.Module):
    """The per-sample loss of a block as a module's forward, so DistributedDataParallel can wrap it."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, **inputs) -> torch.Tensor:
        return self.denoiser.loss(**inputs)


def learning_rate(t: TrainConfig, s: int) -> float:
    """A block's learning rate at its step s (0-based): a linear warm-up over lr_warmup_steps, then constant, or a
    cosine or linear decay over its last lr_decay_steps (0: every step after the warm-up), from lr before them to
    lr_final * lr at the block's last step, steps_per_block - 1."""
    lr = t.lr * min(1.0, (s + 1) / t.lr_warmup_steps) if t.lr_warmup_steps > 0 else t.lr
    start = max(t.steps_per_block - t.lr_decay_steps, t.lr_warmup_steps) if t.lr_decay_steps else t.lr_warmup_steps
    if t.lr_schedule == "constant" or s < start:
        return lr
    u = min(1.0, (s - start + 1) / (t.steps_per_block - start))  # the decay's progress: 1 at the last step
    left = 0.5 * (1 + math.cos(math.pi * u)) if t.lr_schedule == "cosine" else 1 - u
    return t.lr * (t.lr_final + (1 - t.lr_final) * left)


def make_optimizer(denoiser: nn.Module, cfg: RunConfig, device: torch.device | None = None) -> torch.optim.AdamW:
    """AdamW over one block; weight decay on matrices only. The fused kernel on CUDA and on the CPU (a quarter of the
    per-op kernels' time on the CPU: 1.2 against 4.6 ms a step for the 1.8M parameters of the language preset at two
    threads, issue 26), one kernel per op elsewhere."""
    t = cfg.train
    params = [p for p in denoiser.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = torch.device(device if device is not None else "cpu").type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, fused=fused or None, foreach=None if fused else True)


def init_block_state(task: TrainableTask, cfg: RunConfig, b: int, device: torch.device, run_dir: Path | None = None,
                     init_from: Path | dict[int, Path] | None = None, coupling: Coupling | None = None) -> BlockState:
    """Block b freshly initialised from (seed, b), or resumed from its training state in run_dir.

    init_from: a trained run whose block b gives the starting weights (fine-tuning), used when run_dir
    holds no state for the block yet; the optimiser starts afresh. A dict {block: run} names it per block
    (a block it lacks starts from scratch).
    coupling: what the task's blocks hand each other (`Coupling`), attached before the optimiser.
    """
    denoiser = task.build_block(cfg, b, make_generator(cfg.train.seed, b, "init"))
    for module in denoiser.modules():
        if hasattr(module, "checkpointing"):
            module.checkpointing = cfg.train.activation_checkpointing
    if isinstance(init_from, dict):
        init_from = init_from.get(b)
    if init_from is not None and not (run_dir is not None and rundir.block_state_path(run_dir, b).is_file()):
        checkpoint.load_block_weights(init_from, b, denoiser, cfg)
    denoiser = denoiser.to(device)
    if coupling is not None:
        coupling.attach(b, denoiser)
    optimizer = make_optimizer(denoiser, cfg, device)
    ema = copy.deepcopy(denoiser).requires_grad_(False) if cfg.train.ema_halflife_steps > 0 else None
    state = BlockState(b, denoiser, optimizer, ema, precision=precision.resolve(cfg.train.precision, device),
                       loss_fn=torch.compile(denoiser.loss) if cfg.train.compile else denoiser.loss)
    saved = checkpoint.load_train_state(run_dir, b, map_location=device) if run_dir is not None else None
    if saved is not None:
        what = f"training state {str(rundir.block_state_path(run_dir, b))!r}"
        checkpoint.check_state_dict(saved["model"], denoiser.state_dict(), what)
        denoiser.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if ema is not None:
            ema.load_state_dict(saved["ema"] if saved.get("ema") is not None else saved["model"])
        state.step, state.train_time_s = int(saved["step"]), float(saved.get("train_time_s", 0.0))
    return state


def save_block_state(run_dir: Path, state: BlockState, cfg: RunConfig, coupling: Coupling | None = None) -> None:
    """Checkpoints one block: what the blocks share first, then its weights and training state as one unit."""
    if coupling is not None:
        coupling.save(run_dir, state.denoiser)
    checkpoint.commit_block(run_dir, state.b, state.inference_module.state_dict(), {
        "step": state.step, "train_time_s": state.train_time_s,
        "model": state.denoiser.state_dict(), "optimizer": state.optimizer.state_dict(),
        "ema": state.ema.state_dict() if state.ema is not None else None}, cfg)


def train_step(task: TrainableTask, state: BlockState, cfg: RunConfig, partition: Partition, sampler, device: torch.device,
               shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """One optimiser step of one block (method.md section 3); returns the batch's mean weighted loss (a 0-d tensor
    on the device: reading it waits for the step, so the loop reads it only when it logs).

    shard (i, n): this process computes part i of n of the batch, its gradients averaged with the
    other parts' by state.ddp; every process draws the whole batch, so the result equals one process's.
    """
    t = cfg.train
    b, s = state.b, state.step
    # 1-2. A batch, and this step's noise levels and noise (and the task's other draws), from (seed, b, s), drawn
    # where the batch is (on the device when the data lives there: `resident_data`).
    batch = sampler.batch(s)
    gen = make_generator(t.seed, b, s, "noise", device=device_of(batch))
    inputs = task.loss_inputs(cfg, partition, b, batch, gen)
    lr = learning_rate(t, s)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    i, k = shard
    # This process' part of the batch, (n / k, ...), on the device.
    inputs = {key: _to_device(v.chunk(k)[i] if k > 1 else v, device) if torch.is_tensor(v) else v
              for key, v in inputs.items()}
    # 3-4. The noisy target through this block only (in the run's precision); the per-sample weighted loss.
    with precision.autocast(state.precision, device):
        loss_fn = state.ddp if state.ddp is not None else (state.loss_fn or state.denoiser.loss)
        loss = loss_fn(**inputs).float().mean()
    # 5. Backpropagate into this block only.
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if t.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(state.denoiser.parameters(), t.grad_clip)
    state.optimizer.step()
    if state.ema is not None:
        decay = 0.5 ** (1 / t.ema_halflife_steps)
        with torch.no_grad():
            torch._foreach_lerp_(list(state.ema.parameters()), list(state.denoiser.parameters()), 1 - decay)
    state.step += 1
    loss = loss.detach()
    if k > 1:  # the whole batch's loss, for the log
        torch.distributed.all_reduce(loss, group=state.ddp.process_group)
        loss /= k
    return loss


def device_of(batch) -> torch.device:
    """The device of a batch's (first) tensor; the CPU if it has none."""
    for x in batch if isinstance(batch, (tuple, list)) else (batch,):
        if torch.is_tensor(x):
            return x.device
    return torch.device("cpu")


def resident_data(cfg: RunConfig, data, device: torch.device):
    """The training data where the steps will draw their batches (train.data_on_device): moved to the device once,
    or left on the host."""
    mode, device = cfg.train.data_on_device, torch.device(device)
    if mode == "off" or device.type == "cpu":
        return data
    if mode == "auto" and (device.type != "cuda" or
                           tensor_bytes(data) > torch.cuda.get_device_properties(device).total_memory / 4):
        return data
    moved = to_device(data, device)
    logger.info("training data on %s (%.1f MiB)", device, tensor_bytes(moved) / 2**20)
    return moved


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """x on the device. To a GPU through pinned memory without waiting: a plain copy from pageable memory
    would make the host wait for the GPU to finish the previous step."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


class MetricsLog:
    """Accumulates each block's losses and appends one JSON line per block and logging interval."""

    def __init__(self, path: Path | None, log_every: int):
        self.path, self.log_every = path, log_every
        self.losses: dict[int, list[torch.Tensor]] = {}
        self.times: dict[int, float] = {}

    def add(self, state: BlockState, loss: torch.Tensor, dt: float) -> None:
        self.losses.setdefault(state.b, []).append(loss)
        self.times[state.b] = self.times.get(state.b, 0.0) + dt
        if state.step % self.log_every == 0:
            self.flush(state)

    def flush(self, state: BlockState) -> None:
        losses = self.losses.pop(state.b, [])
        dt = self.times.pop(state.b, 0.0)
        if not losses or self.path is None:
            return
        row = {"block": state.b, "step": state.step, "loss": sum(x.item() for x in losses) / len(losses),
               "steps_per_s": len(losses) / dt if dt > 0 else None, "train_time_s": state.train_time_s,
               "lr": state.optimizer.param_groups[0]["lr"]}
        rundir.append_metrics(self.path, row)

    def resumed(self, state: BlockState) -> None:
        """Block state.b continues from its checkpoint: the rows it logged after it are about to be redone."""
        if self.path is not None:
            rundir.drop_metrics_after(self.path, state.b, state.step)


def train(task: TrainableTask, cfg: RunConfig, data, run_dir: Path | None, *, device: str | torch.device = "cpu",
          blocks: list[int] | None = None, progress: bool = True, init_from: Path | dict[int, Path] | None = None,
          claim: bool = True) -> dict[int, BlockState]:
    """Trains the run's blocks (all by default) with its schedule, resuming any saved state in run_dir.

    task: the run's task, resolved once from cfg by the caller (the task registry); it builds the blocks, their
    batches and loss inputs.
    data: the training split, as the task loads it (`task.load_data(cfg).train`).
    Returns the final state of each block trained. The sequential schedule keeps one block in memory:
    with a run_dir, a finished block is saved and offloaded (its returned state holds only counters)
    before the next is built. With run_dir None nothing is written and every state is returned whole.
    init_from: a trained run whose weights start the blocks that have no state in run_dir (fine-tuning), or a dict
    {block: run} naming one per block.
    claim: take each block's lock in run_dir while training it (rundir.BlockClaims), so that no other
    job trains it at the same time; False when the caller holds the locks already (the CLI does).
    Denormal floats are flushed to zero from here on (`precision.flush_denormals`: low-noise blocks make them,
    several times slower); a process with several threads calls it before its first torch operation (the CLI does).
    """
    precision.flush_denormals()
    device = torch.device(device)
    with precision.matmul_mode(precision.resolve(cfg.train.precision, device)):
        return _train(task, cfg, data, run_dir, device, blocks, progress, init_from, claim)


def _train(task: TrainableTask, cfg: RunConfig, data, run_dir: Path | None, device: torch.device, blocks: list[int] | None,
           progress: bool, init_from: Path | dict[int, Path] | None, claim: bool) -> dict[int, BlockState]:
    blocks = list(range(cfg.blocks.num_blocks)) if blocks is None else blocks
    partition = task.partition(cfg)
    data = resident_data(cfg, data, device)
    log = MetricsLog(run_dir / "metrics.jsonl" if run_dir is not None else None, cfg.train.log_every)
    states: dict[int, BlockState] = {}
    coupling = task.coupling(cfg, run_dir, device, states)
    if cfg.train.schedule == "parallel":
        return _train_parallel(task, cfg, blocks, data, run_dir, partition, device, progress, init_from, coupling, claim)
    claims = rundir.BlockClaims(run_dir) if run_dir is not None and claim else None
    try:
        for b in blocks if claims is not None else ():
            claims.claim(b)
        if cfg.train.schedule == "sequential":
            for b in blocks:
                states[b] = _train_sequential_block(task, cfg, b, data, run_dir, partition, log, device, progress,
                                                    init_from, coupling=coupling)
            return states
        return _train_interleaved(task, cfg, blocks, data, run_dir, partition, log, device, progress, init_from, coupling)
    finally:
        if claims is not None:
            claims.release()


def timed_step(task: TrainableTask, state: BlockState, cfg: RunConfig, partition: Partition, sampler, device: torch.device,
                log: MetricsLog, run_dir: Path | None, coupling: Coupling, shard: tuple[int, int] = (0, 1)) -> float:
    t0 = time.perf_counter()
    loss = train_step(task, state, cfg, partition, sampler, device, shard)
    done = state.step >= cfg.train.steps_per_block
    saving = run_dir is not None and (state.step % cfg.train.checkpoint_every == 0 or done)
    if device.type == "cuda" and (saving or state.step % cfg.train.log_every == 0):
        # The GPU runs ahead of the host between logs; waiting for it here charges its time to this interval.
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    state.train_time_s += dt
    log.add(state, loss, dt)
    if saving:
        if done:
            log.flush(state)
        save_block_state(run_dir, state, cfg, coupling)
    return loss


def _train_sequential_block(task: TrainableTask, cfg: RunConfig, b: int, data, run_dir: Path | None, partition: Partition,
                            log: MetricsLog, device: torch.device, progress: bool,
                            init_from: Path | dict[int, Path] | None = None, group=None, shard: tuple[int, int] = (0, 1),
                            leader: bool = True, coupling: Coupling | None = None) -> BlockState:
    """Trains block b to the end; with a process group, data-parallel over it (only the leader writes)."""
    coupling = coupling or Coupling()
    state = init_block_state(task, cfg, b, device, run_dir, init_from, coupling)
    coupling.resumed({b: state.denoiser})
    _note_resumed(state, cfg, log)
    if shard[1] > 1:
        state.ddp = DistributedDataParallel(DenoiserLoss(state.denoiser), process_group=group,
                                            device_ids=[device] if device.type == "cuda" else None)
    sampler = task.batch_sampler(cfg, data, b)
    total = cfg.train.steps_per_block
    lo, hi = partition.block_range(b)
    noise = task.noise_symbol
    with tqdm(total=total, initial=min(state.step, total), desc=f"block {b + 1}/{cfg.blocks.num_blocks}",
              disable=not progress, unit="step", dynamic_ncols=True) as bar:
        bar.set_postfix_str(f"{noise} [{lo:.3g}, {hi:.3g}]")
        while state.step < total:
            loss = timed_step(task, state, cfg, partition, sampler, device, log, run_dir if leader else None, coupling,
                               shard)
            bar.update(1)
            if state.step % 10 == 0 or state.step == total:
                bar.set_postfix({"loss": f"{loss:.4f}", noise: f"[{lo:.3g}, {hi:.3g}]"})
    logger.info("block %d: %d steps, %.1f s", b, state.step, state.train_time_s)
    if run_dir is not None:
        state.offload()  # saved at its last step; the next block gets the memory
    return state


def _note_resumed(state: BlockState, cfg: RunConfig, log: MetricsLog) -> None:
    """Says where a block starts, and forgets the metrics it logged after that (a killed job's last steps)."""
    if state.step > 0:
        logger.info("block %d: continuing from its checkpoint at step %d of %d", state.b, state.step,
                    cfg.train.steps_per_block)
    log.resumed(state)


def _train_parallel(task: TrainableTask, cfg: RunConfig, blocks: list[int], data, run_dir: Path | None, partition: Partition,
                    device: torch.device, progress: bool, init_from: Path | dict[int, Path] | None = None,
                    coupling: Coupling | None = None, claim: bool = True) -> dict[int, BlockState]:
    """This rank's share of block-parallel training: its group's blocks, one after the other (distributed.py)."""
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) \
        if torch.distributed.is_available() and torch.distributed.is_initialized() else (0, 1)
    a = distributed.assign(rank, world, blocks)
    groups = distributed.new_groups(a)
    if rank == 0:
        logger.info("block-parallel over %d rank(s): %s", world, a.describe())
    i, k = a.shard
    if cfg.train.batch_size % k:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} does not split evenly over the {k} ranks "
                          f"of group {a.group}")
    log = MetricsLog(run_dir / "metrics.jsonl" if run_dir is not None and a.is_leader else None, cfg.train.log_every)
    # Each group's leader holds its blocks' locks, unless the caller (the CLI's rank 0) holds them all.
    claims = rundir.BlockClaims(run_dir) if run_dir is not None and claim and a.is_leader else None
    try:
        for b in a.my_blocks if claims is not None else ():
            claims.claim(b)
        return {b: _train_sequential_block(task, cfg, b, data, run_dir, partition, log, device, progress and a.is_leader,
                                           init_from, groups[a.group], a.shard, a.is_leader, coupling)
                for b in a.my_blocks}
    finally:
        if claims is not None:
            claims.release()


def _train_interleaved(task: TrainableTask, cfg: RunConfig, blocks: list[int], data, run_dir: Path | None,
                       partition: Partition, log: MetricsLog, device: torch.device,
                       progress: bool, init_from: Path | dict[int, Path] | None = None,
                       coupling: Coupling | None = None) -> dict[int, BlockState]:
    """Each step trains a uniformly random unfinished block (the paper's schedule); all blocks resident.

    Blocks that share a trained parameter (the task's coupling) each update it with their own optimiser
    when they run; at the end every block's files are written again with its final value.
    """
    coupling = coupling or Coupling()
    states = {b: init_block_state(task, cfg, b, device, run_dir, init_from, coupling) for b in blocks}
    coupling.resumed({b: s.denoiser for b, s in states.items()})
    for state in states.values():
        _note_resumed(state, cfg, log)
    samplers = {b: task.batch_sampler(cfg, data, b) for b in blocks}
    total = cfg.train.steps_per_block
    losses: dict[int, float] = {}
    done_steps = sum(min(s.step, total) for s in states.values())
    with tqdm(total=total * len(blocks), initial=done_steps, desc=f"{len(blocks)} blocks interleaved",
              disable=not progress, unit="step", dynamic_ncols=True) as bar:
        while True:
            unfinished = [b for b in blocks if states[b].step < total]
            if not unfinished:
                break
            # The choice at global step t depends only on (seed, t): a resumed run makes the same choices.
            t = sum(states[b].step for b in blocks)
            g = make_generator(cfg.train.seed, "schedule", t)
            b = unfinished[int(torch.randint(len(unfinished), (1,), generator=g))]
            losses[b] = timed_step(task, states[b], cfg, partition, samplers[b], device, log, run_dir, coupling)
            bar.update(1)
            if t % 10 == 0:
                bar.set_postfix_str(" ".join(f"b{k}={v:.4f}" for k, v in sorted(losses.items())))
    if coupling.rewrite_at_end and run_dir is not None:
        for state in states.values():  # every block's file gets the final shared values
            save_block_state(run_dir, state, cfg, coupling)
    return states
