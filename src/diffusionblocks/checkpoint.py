"""Run directories and checkpoints: config.json plus one safetensors file per block.

    RUN/config.json                the full RunConfig
    RUN/block_00.safetensors       block 0's inference weights (EMA weights when EMA is on); metadata: step, config
    RUN/block_00.state.pt          block 0's training state for resuming: weights, EMA, AdamW state, step, time
    RUN/metrics.jsonl              one JSON line per logging interval and block

Blocks share no parameter, so each block's files can be written by a different process or machine.
Every file is written to a temporary name and renamed, so a killed process never leaves half a file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ConfigError, RunConfig

FORMAT = "diffusionblocks/1"


def block_weights_path(run_dir: Path, b: int) -> Path:
    return Path(run_dir) / f"block_{b:02d}.safetensors"


def block_state_path(run_dir: Path, b: int) -> Path:
    return Path(run_dir) / f"block_{b:02d}.state.pt"


def _atomic_replace(tmp: Path, path: Path) -> None:
    """Moves a fully written temporary file into place, with the permissions a plain new file would get."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def new_run_dir(root: str | Path, name: str) -> Path:
    """A new directory root/NNNNN-name, numbered after the highest existing run (EDM's convention)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ids = [int(m.group(1)) for p in root.iterdir() if (m := re.match(r"^(\d{5})-", p.name))]
    while True:
        path = root / f"{max(ids, default=-1) + 1:05d}-{name}"
        try:
            path.mkdir()
            return path
        except FileExistsError:  # another process took the number
            ids.append(max(ids, default=-1) + 1)


def save_config(run_dir: Path, cfg: RunConfig) -> None:
    path = Path(run_dir) / "config.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(cfg.to_json() + "\n")
    _atomic_replace(tmp, path)


def join_run(run_dir: Path, cfg: RunConfig) -> None:
    """Writes config.json unless another job already did; then it must be the same config.

    Several independent jobs (one per block) may call this at once on one directory: the config is
    published with a hard link, which fails atomically when the file exists.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.json"
    tmp = run_dir / f".config.{os.getpid()}.tmp"
    tmp.write_text(cfg.to_json() + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        existing = read_config(run_dir)
        if existing != cfg:
            raise ConfigError(f"{str(path)!r} holds a different config than this job's; a job joining a run "
                              "must use the run's config") from None
    finally:
        tmp.unlink()


def read_config(run_dir: str | Path) -> RunConfig:
    """The RunConfig of a run directory, with a clear error when it is not one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {str(run_dir)!r} does not exist")
    path = run_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a run directory: it has no config.json")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{str(path)!r} is not valid JSON: {e}") from None
    try:
        return RunConfig.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{str(path)!r}: {e}") from None


def save_block(run_dir: Path, b: int, state_dict: dict[str, torch.Tensor], step: int, cfg: RunConfig,
               train_time_s: float = 0.0) -> None:
    """Writes block b's inference weights with its step, training time and the run's config as metadata."""
    path = block_weights_path(run_dir, b)
    tmp = path.with_suffix(".safetensors.tmp")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    metadata = {"format": FORMAT, "block": str(b), "step": str(step), "train_time_s": repr(float(train_time_s)),
                "config": json.dumps(cfg.to_dict())}
    save_file(tensors, str(tmp), metadata=metadata)
    _atomic_replace(tmp, path)


def block_info(run_dir: Path, b: int) -> dict[str, Any] | None:
    """Block b's weights-file metadata (step, train_time_s), read without loading weights; None when missing."""
    path = block_weights_path(run_dir, b)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return {"block": b, "step": int(meta.get("step", "0")), "train_time_s": float(meta.get("train_time_s", "0"))}
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"checkpoint {str(path)!r} is corrupt or not a safetensors file: {e}") from None


def block_step(run_dir: Path, b: int) -> int | None:
    """The training step recorded in block b's weights file, or None when the file is missing."""
    info = block_info(run_dir, b)
    return None if info is None else info["step"]


def check_state_dict(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    """Raises ConfigError naming the first missing, unexpected or mis-shaped tensor."""
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    if missing:
        raise ConfigError(f"{what} does not match the config: tensor {missing[0]!r} is missing "
                          f"({len(missing)} missing in all)")
    if unexpected:
        raise ConfigError(f"{what} does not match the config: unexpected tensor {unexpected[0]!r}")
    for k, v in expected.items():
        if tuple(loaded[k].shape) != tuple(v.shape):
            raise ConfigError(f"{what} does not match the config: {k!r} has shape {tuple(loaded[k].shape)}, "
                              f"the config needs {tuple(v.shape)}")


def load_block_weights(run_dir: Path, b: int, module: torch.nn.Module) -> int:
    """Loads block b's inference weights into `module`; returns the step they were saved at."""
    path = block_weights_path(run_dir, b)
    if not path.is_file():
        raise ConfigError(f"block {b} has no weights: {str(path)!r} is missing (train it first)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"checkpoint {str(path)!r} is corrupt or not a safetensors file: {e}") from None
    check_state_dict(tensors, module.state_dict(), f"checkpoint {str(path)!r}")
    module.load_state_dict(tensors)
    return block_step(run_dir, b) or 0


def save_tensor_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Writes a small safetensors file atomically."""
    tmp = path.with_suffix(".safetensors.tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
    _atomic_replace(tmp, path)


def load_tensor_file(path: Path, key: str) -> torch.Tensor:
    try:
        return load_file(str(path))[key]
    except (SafetensorError, OSError, KeyError) as e:
        raise ConfigError(f"{str(path)!r} is corrupt or lacks {key!r}: {e}") from None


def load_block_tensor(run_dir: Path, b: int, key: str) -> torch.Tensor:
    """One tensor of block b's weights file."""
    return load_tensor_file(block_weights_path(run_dir, b), key)


def save_train_state(run_dir: Path, b: int, state: dict[str, Any]) -> None:
    path = block_state_path(run_dir, b)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    _atomic_replace(tmp, path)


def load_train_state(run_dir: Path, b: int, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """Block b's training state, or None when it has none yet."""
    path = block_state_path(run_dir, b)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for a damaged archive
        raise ConfigError(f"training state {str(path)!r} is corrupt: {e}") from None


def from_pretrained(run_dir: str | Path, device: str | torch.device = "cpu", stream: bool = False):
    """Loads a trained run as a BlockwiseDenoiser in eval mode; returns (model, config).

    stream: keep one block in memory at a time, loading each from disk when the sampler reaches it.
    """
    from .blocks import BlockwiseDenoiser, StreamingBlocks, build_block, build_partition

    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    missing = [b for b in range(cfg.blocks.num_blocks) if not block_weights_path(run_dir, b).is_file()]
    if missing:
        raise ConfigError(f"run {str(run_dir)!r} is missing the weights of block(s) {', '.join(map(str, missing))} "
                          f"of {cfg.blocks.num_blocks}")

    def load(b: int) -> torch.nn.Module:
        block = build_block(cfg, b)
        load_block_weights(run_dir, b, block)
        return block.to(device).eval()

    if stream:
        for b in range(cfg.blocks.num_blocks):
            block_step(run_dir, b)  # a corrupt file fails now, not halfway through sampling
        return BlockwiseDenoiser(StreamingBlocks(cfg.blocks.num_blocks, load), build_partition(cfg)), cfg
    model = BlockwiseDenoiser([load(b) for b in range(cfg.blocks.num_blocks)], build_partition(cfg)).eval()
    return model, cfg
