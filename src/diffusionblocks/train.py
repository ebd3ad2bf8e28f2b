"""Training: one block at a time is the unit of work; schedules order the blocks (method.md section 3).

Every random draw of block b at its step s (batch, sigma, noise, dropped labels) comes from a
generator seeded by (seed, b, s), and its initial weights from (seed, b). A block's result
therefore does not depend on the schedule that trained it, nor on where it was resumed.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint
from .config import ConfigError, RunConfig
from .data import BatchSampler, ImageData, make_generator
from .models import build_block, build_partition, run_label_embedding
from .noise import Partition
from .precond import Denoiser

logger = logging.getLogger(__name__)


@dataclass
class BlockState:
    """Everything one block's training needs: its denoiser, optimiser, optional EMA copy and step count.

    An offloaded state keeps only its counters; its weights and optimiser state are in the run directory.
    """

    b: int
    denoiser: Denoiser | None
    optimizer: torch.optim.Optimizer | None
    ema: Denoiser | None
    step: int = 0
    train_time_s: float = 0.0  # wall time spent in this block's steps, over all sessions
    ddp: nn.Module | None = None  # DenoiserLoss wrapped in DistributedDataParallel, when data-parallel

    @property
    def inference_module(self) -> Denoiser:
        return self.ema if self.ema is not None else self.denoiser

    @property
    def resident(self) -> bool:
        return self.denoiser is not None

    def offload(self) -> None:
        """Drops the weights, EMA and optimiser state from memory (they must have been saved)."""
        self.denoiser = self.optimizer = self.ema = self.ddp = None


class DenoiserLoss(nn.Module):
    """The per-sample loss of a block as a module's forward, so DistributedDataParallel can wrap it."""

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, **inputs) -> torch.Tensor:
        return self.denoiser.loss(**inputs)


def make_optimizer(denoiser: Denoiser, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW over one block; weight decay on matrices only."""
    t = cfg.train
    params = [p for p in denoiser.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas)


def init_block_state(cfg: RunConfig, b: int, device: torch.device, run_dir: Path | None = None,
                     init_from: Path | None = None, label_table: torch.Tensor | None = None,
                     shared_embedding: nn.Parameter | None = None) -> BlockState:
    """Block b freshly initialised from (seed, b), or resumed from its training state in run_dir.

    init_from: a trained run whose block b gives the starting weights (fine-tuning), used when run_dir
    holds no state for the block yet; the optimiser starts afresh.
    label_table / shared_embedding (classification): the label embedding learned by block 0, to copy
    into this block ("learned_first"), or the one parameter all blocks learn ("learned_joint").
    """
    denoiser = build_block(cfg, b, make_generator(cfg.train.seed, b, "init"))
    for module in denoiser.modules():
        if hasattr(module, "checkpointing"):
            module.checkpointing = cfg.train.activation_checkpointing
    if init_from is not None:
        checkpoint.load_block_weights(init_from, b, denoiser)
    denoiser = denoiser.to(device)
    if shared_embedding is not None:
        denoiser.label_embedding = shared_embedding
    elif label_table is not None:
        with torch.no_grad():
            denoiser.label_embedding.copy_(label_table)
    optimizer = make_optimizer(denoiser, cfg)
    ema = copy.deepcopy(denoiser).requires_grad_(False) if cfg.train.ema_halflife_steps > 0 else None
    state = BlockState(b, denoiser, optimizer, ema)
    saved = checkpoint.load_train_state(run_dir, b, map_location=device) if run_dir is not None else None
    if saved is not None:
        what = f"training state {str(checkpoint.block_state_path(run_dir, b))!r}"
        checkpoint.check_state_dict(saved["model"], denoiser.state_dict(), what)
        denoiser.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if ema is not None:
            ema.load_state_dict(saved["ema"] if saved.get("ema") is not None else saved["model"])
        state.step, state.train_time_s = int(saved["step"]), float(saved.get("train_time_s", 0.0))
    return state


JOINT_LABEL_FILE = "label_embedding.safetensors"  # the shared table of "learned_joint" runs


def save_block_state(run_dir: Path, state: BlockState, cfg: RunConfig) -> None:
    """Checkpoints one block: training state first, then the inference weights (and a shared label table)."""
    if _label_mode(cfg) == "learned_joint":
        checkpoint.save_tensor_file(run_dir / JOINT_LABEL_FILE,
                                    {"label_embedding": state.denoiser.label_embedding.detach()})
    checkpoint.save_train_state(run_dir, state.b, {
        "step": state.step, "train_time_s": state.train_time_s,
        "model": state.denoiser.state_dict(), "optimizer": state.optimizer.state_dict(),
        "ema": state.ema.state_dict() if state.ema is not None else None})
    checkpoint.save_block(run_dir, state.b, state.inference_module.state_dict(), state.step, cfg, state.train_time_s)


def loss_inputs(cfg: RunConfig, partition: Partition, b: int, images: torch.Tensor, labels: torch.Tensor,
                g: torch.Generator) -> dict:
    """The keyword arguments of block b's `loss` for one batch (method.md section 3, step 2), drawn from g.

    Image generation: the image y is denoised, conditioned on its label (dropped to the null class with
    probability model.class_dropout). Classification: the label's embedding is denoised, conditioned on
    the image; the plain end-to-end classifier needs no noise.
    """
    n = images.shape[0]
    if cfg.task == "classify":
        if cfg.classify.mode == "plain":
            return {"images": images, "labels": labels}
        sigma = partition.sample(b, n, generator=g).float()
        noise = torch.randn(n, cfg.model.hidden_size, generator=g)
        return {"images": images, "labels": labels, "sigma": sigma, "noise": noise,
                "weighting": cfg.classify.loss_weighting}
    sigma = partition.sample(b, n, generator=g).float()
    noise = torch.randn(images.shape, generator=g)
    inputs = {"y": images, "sigma": sigma, "noise": noise}
    if cfg.model.num_classes > 0:
        drop = torch.rand(n, generator=g) < cfg.model.class_dropout
        inputs["class_labels"] = torch.where(drop, cfg.model.num_classes, labels)
    return inputs


def train_step(state: BlockState, cfg: RunConfig, partition: Partition, sampler: BatchSampler,
               device: torch.device, shard: tuple[int, int] = (0, 1)) -> float:
    """One optimiser step of one block (method.md section 3); returns the batch's mean weighted loss.

    shard (i, n): this process computes part i of n of the batch, its gradients averaged with the
    other parts' by state.ddp; every process draws the whole batch, so the result equals one process's.
    """
    t = cfg.train
    b, s = state.b, state.step
    # 1-2. A batch, and this step's noise levels, noise and dropped labels, from (seed, b, s).
    images, labels = sampler.batch(s)
    inputs = loss_inputs(cfg, partition, b, images, labels, make_generator(t.seed, b, s, "noise"))
    lr = t.lr * min(1.0, (s + 1) / t.lr_warmup_steps) if t.lr_warmup_steps > 0 else t.lr
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    i, k = shard
    # This process' part of the batch, (n / k, ...), on the device.
    inputs = {key: (v.chunk(k)[i] if k > 1 else v).to(device) if torch.is_tensor(v) else v
              for key, v in inputs.items()}
    # 3-4. z = y + sigma eps through this block only; the per-sample weighted loss.
    loss = (state.ddp(**inputs) if state.ddp is not None else state.denoiser.loss(**inputs)).mean()
    # 5. Backpropagate into this block only.
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if t.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(state.denoiser.parameters(), t.grad_clip)
    state.optimizer.step()
    if state.ema is not None:
        decay = 0.5 ** (1 / t.ema_halflife_steps)
        with torch.no_grad():
            for p_ema, p in zip(state.ema.parameters(), state.denoiser.parameters()):
                p_ema.lerp_(p, 1 - decay)
    state.step += 1
    loss = loss.detach()
    if k > 1:  # the whole batch's loss, for the log
        torch.distributed.all_reduce(loss, group=state.ddp.process_group)
        loss /= k
    return loss.item()


class MetricsLog:
    """Accumulates each block's losses and appends one JSON line per block and logging interval."""

    def __init__(self, path: Path | None, log_every: int):
        self.path, self.log_every = path, log_every
        self.losses: dict[int, list[float]] = {}
        self.times: dict[int, float] = {}

    def add(self, state: BlockState, loss: float, dt: float) -> None:
        self.losses.setdefault(state.b, []).append(loss)
        self.times[state.b] = self.times.get(state.b, 0.0) + dt
        if state.step % self.log_every == 0:
            self.flush(state)

    def flush(self, state: BlockState) -> None:
        losses = self.losses.pop(state.b, [])
        dt = self.times.pop(state.b, 0.0)
        if not losses or self.path is None:
            return
        row = {"block": state.b, "step": state.step, "loss": sum(losses) / len(losses),
               "steps_per_s": len(losses) / dt if dt > 0 else None, "train_time_s": state.train_time_s,
               "lr": state.optimizer.param_groups[0]["lr"]}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def train(cfg: RunConfig, data: ImageData, run_dir: Path | None, *, device: str | torch.device = "cpu",
          blocks: list[int] | None = None, progress: bool = True, init_from: Path | None = None) -> dict[int, BlockState]:
    """Trains the run's blocks (all by default) with its schedule, resuming any saved state in run_dir.

    Returns the final state of each block trained. The sequential schedule keeps one block in memory:
    with a run_dir, a finished block is saved and offloaded (its returned state holds only counters)
    before the next is built. With run_dir None nothing is written and every state is returned whole.
    init_from: a trained run whose weights start the blocks that have no state in run_dir (fine-tuning).
    On CPU, call torch.set_flush_denormal(True) at the start of the process (the CLI does): low-noise
    blocks produce denormal floats, which are several times slower.
    """
    device = torch.device(device)
    blocks = list(range(cfg.blocks.num_blocks)) if blocks is None else blocks
    partition = build_partition(cfg)
    log = MetricsLog(run_dir / "metrics.jsonl" if run_dir is not None else None, cfg.train.log_every)
    if cfg.train.schedule == "sequential":
        states: dict[int, BlockState] = {}
        for b in blocks:
            table = _first_block_label_table(cfg, b, run_dir, states)
            states[b] = _train_sequential_block(cfg, b, data, run_dir, partition, log, device, progress, init_from,
                                                label_table=table)
        return states
    if cfg.train.schedule == "parallel":
        return _train_parallel(cfg, blocks, data, run_dir, partition, device, progress, init_from)
    return _train_interleaved(cfg, blocks, data, run_dir, partition, log, device, progress, init_from)


def _label_mode(cfg: RunConfig) -> str | None:
    """The label-embedding mode of a label-denoising run, else None."""
    if cfg.task == "classify" and cfg.classify.mode == "diffusion":
        return cfg.classify.label_embedding
    return None


def _first_block_label_table(cfg: RunConfig, b: int, run_dir: Path | None,
                             states: dict[int, BlockState]) -> torch.Tensor | None:
    """For "learned_first": block 0's trained label embedding, which blocks after it use frozen."""
    if _label_mode(cfg) != "learned_first" or b == 0:
        return None
    if 0 in states and states[0].resident:
        return states[0].denoiser.label_embedding.detach().clone()
    if run_dir is not None and checkpoint.block_step(run_dir, 0) == cfg.train.steps_per_block:
        return checkpoint.load_block_tensor(run_dir, 0, "label_embedding")
    raise ConfigError(f"classify.label_embedding='learned_first': block 0 learns the label embedding, so it must be "
                      f"trained to the end before block {b}")


def _sampler(cfg: RunConfig, data: ImageData, b: int) -> BatchSampler:
    return BatchSampler(data, cfg.train.batch_size, seed=cfg.train.seed, stream=b, hflip=cfg.data.hflip,
                        crop_padding=cfg.data.crop_padding)


def _timed_step(state: BlockState, cfg: RunConfig, partition: Partition, sampler: BatchSampler,
                device: torch.device, log: MetricsLog, run_dir: Path | None, shard: tuple[int, int] = (0, 1)) -> float:
    t0 = time.perf_counter()
    loss = train_step(state, cfg, partition, sampler, device, shard)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    state.train_time_s += dt
    log.add(state, loss, dt)
    done = state.step >= cfg.train.steps_per_block
    if run_dir is not None and (state.step % cfg.train.checkpoint_every == 0 or done):
        if done:
            log.flush(state)
        save_block_state(run_dir, state, cfg)
    return loss


def _train_sequential_block(cfg: RunConfig, b: int, data: ImageData, run_dir: Path | None, partition: Partition,
                            log: MetricsLog, device: torch.device, progress: bool,
                            init_from: Path | None = None, group=None, shard: tuple[int, int] = (0, 1),
                            leader: bool = True, label_table: torch.Tensor | None = None) -> BlockState:
    """Trains block b to the end; with a process group, data-parallel over it (only the leader writes)."""
    state = init_block_state(cfg, b, device, run_dir, init_from, label_table=label_table)
    if shard[1] > 1:
        from torch.nn.parallel import DistributedDataParallel

        state.ddp = DistributedDataParallel(DenoiserLoss(state.denoiser), process_group=group,
                                            device_ids=[device] if device.type == "cuda" else None)
    sampler = _sampler(cfg, data, b)
    total = cfg.train.steps_per_block
    lo, hi = partition.block_range(b)
    with tqdm(total=total, initial=min(state.step, total), desc=f"block {b + 1}/{cfg.blocks.num_blocks}",
              disable=not progress, unit="step", dynamic_ncols=True) as bar:
        bar.set_postfix_str(f"sigma [{lo:.3g}, {hi:.3g}]")
        while state.step < total:
            loss = _timed_step(state, cfg, partition, sampler, device, log, run_dir if leader else None, shard)
            bar.update(1)
            if state.step % 10 == 0 or state.step == total:
                bar.set_postfix(loss=f"{loss:.4f}", sigma=f"[{lo:.3g}, {hi:.3g}]")
    logger.info("block %d: %d steps, %.1f s", b, state.step, state.train_time_s)
    if run_dir is not None:
        state.offload()  # saved at its last step; the next block gets the memory
    return state


def _train_parallel(cfg: RunConfig, blocks: list[int], data: ImageData, run_dir: Path | None, partition: Partition,
                    device: torch.device, progress: bool, init_from: Path | None = None) -> dict[int, BlockState]:
    """This rank's share of block-parallel training: its group's blocks, one after the other (distributed.py)."""
    from . import distributed

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
    return {b: _train_sequential_block(cfg, b, data, run_dir, partition, log, device, progress and a.is_leader,
                                       init_from, groups[a.group], a.shard, a.is_leader)
            for b in a.my_blocks}


def _train_interleaved(cfg: RunConfig, blocks: list[int], data: ImageData, run_dir: Path | None,
                       partition: Partition, log: MetricsLog, device: torch.device,
                       progress: bool, init_from: Path | None = None) -> dict[int, BlockState]:
    """Each step trains a uniformly random unfinished block (the paper's schedule); all blocks resident.

    With classify.label_embedding="learned_joint" the blocks share one label-embedding parameter, which
    each block's optimiser updates when that block runs (the reference code's sharing).
    """
    shared = None
    if _label_mode(cfg) == "learned_joint":
        shared = nn.Parameter(run_label_embedding(cfg).to(device))
    states = {b: init_block_state(cfg, b, device, run_dir, init_from, shared_embedding=shared) for b in blocks}
    if shared is not None and run_dir is not None and (run_dir / JOINT_LABEL_FILE).is_file():
        with torch.no_grad():  # the blocks' files hold older snapshots; the run's file holds the latest
            shared.copy_(checkpoint.load_tensor_file(run_dir / JOINT_LABEL_FILE, "label_embedding"))
    samplers = {b: _sampler(cfg, data, b) for b in blocks}
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
            losses[b] = _timed_step(states[b], cfg, partition, samplers[b], device, log, run_dir)
            bar.update(1)
            if t % 10 == 0:
                bar.set_postfix_str(" ".join(f"b{k}={v:.4f}" for k, v in sorted(losses.items())))
    if shared is not None and run_dir is not None:
        for state in states.values():  # every block's file gets the final shared table
            save_block_state(run_dir, state, cfg)
    return states
