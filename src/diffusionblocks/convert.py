"""Blocks from a trained model: an end-to-end run (B=1) converted into a run of B blocks (method.md section 8), and
a pretrained model (a diffusers DiT saved by save_pretrained) imported as such an end-to-end run.

    depth   block b is the source's layers [b L/B, (b+1) L/B) with its own copies of the input embedding, the
            noise and condition embedders and the head: an ordinary B-block run of L/B layers per block, whose
            layers start far from the source's quality (they expect the outputs of the layers before them)
    copy    every block is the whole source network (eDiff-I's experts); the config records L layers per block
            (model.depth = B L): each block is then fine-tuned on its own noise range, sampling costs what the
            source's does, and training memory is not reduced

The converted run is a run like any: `train --from NEW` fine-tunes its blocks (each from its converted weights,
on its own noise range), and `sample`, `evaluate`, `status`, `compose` and `--resume` take it. Its blocks are the
result of the source's training: each weights file records the source's step, and composition.json records where
it came from (role "converted": the source run, its step, the layers taken, the sha256 of the source's weights and
of the block written, checked like a copied block's). Its train.teacher names the source, so that fine-tuning
with train.distill_weight > 0 learns the source's denoised output too. The run is written beside NEW and renamed
into place in one step, as compose writes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, rundir
from .changes import FROM, changeable, refused_overrides
from .compose import check_free, copy_vocabulary, publish, staging
from .config import ConfigError, RunConfig
from .seeding import make_generator
from .tasks import Task, apply_overrides, get_task, read_config

logger = logging.getLogger(__name__)

INITS = ("depth", "copy")


def source_layers(src_cfg: RunConfig, source: Path, num_blocks: int, init: str) -> list[tuple[int, int]]:
    """The layers [first, last) of the end-to-end run `source` (config src_cfg) that each block starts from, after
    refusing a conversion that cannot be made: a source of several blocks, fewer than 2 blocks, or a depth split
    that does not divide the layers (method.md section 2: no silently dropped remainder)."""
    if init not in INITS:
        raise ConfigError(f"--init {init!r} is not one of {', '.join(map(repr, INITS))}")
    if src_cfg.blocks.num_blocks != 1:
        raise ConfigError(f"{str(source)!r} is a run of B={src_cfg.blocks.num_blocks} blocks: convert takes an "
                          "end-to-end run (blocks.num_blocks=1); `train --from` fine-tunes a block-wise run's blocks")
    if num_blocks < 2:
        raise ConfigError(f"--num-blocks must be at least 2, got {num_blocks}")
    L = src_cfg.model.depth
    if init == "copy":
        return [(0, L)] * num_blocks
    if num_blocks > L:
        raise ConfigError(f"--num-blocks {num_blocks} is more than the {L} layers of {str(source)!r}: a depth "
                          "split gives every block at least one layer")
    if L % num_blocks:
        raise ConfigError(f"the {L} layers of {str(source)!r} do not split evenly into --num-blocks {num_blocks} "
                          "for --init depth")
    k = L // num_blocks
    return [(b * k, (b + 1) * k) for b in range(num_blocks)]


def converted_config(src_cfg: RunConfig, source: Path, num_blocks: int, init: str,
                     overrides: list[str] = ()) -> RunConfig:
    """The config of the B-block run converted from `source` by `init`, with the overrides `train --from` allows
    (name, train.*, data.*, sample.*); its train.teacher is the source."""
    bad = refused_overrides(src_cfg, list(overrides), FROM)
    if bad:
        raise ConfigError(f"override {bad[0]!r}: a converted run may set {', '.join(changeable(FROM, src_cfg))}; "
                          "its model and noise are its source's")
    L = src_cfg.model.depth
    shape = ["blocks.layers_per_block=null"] if init == "depth" else \
        [f"model.depth={num_blocks * L}", f"blocks.layers_per_block={[L] * num_blocks}"]
    name = f"{src_cfg.name}-{init}-B{num_blocks}"
    return apply_overrides(src_cfg, [f"blocks.num_blocks={num_blocks}", *shape, f"name={name}",
                                     f"train.teacher={source.resolve()}", *overrides])


def split_source(task: Task, src_cfg: RunConfig, source: Path,
                 layers: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
    """Each block's weights: the source's layers [first, last) and its own copies of the rest (the task's
    `split_weights`, which refuses a run it cannot convert)."""
    block = task.build_block(src_cfg, 0)
    checkpoint.load_block_weights(source, 0, block, src_cfg)  # checks its metadata (and a copy's sha256)
    weights = block.state_dict()
    return [task.split_weights(src_cfg, weights, first, last) for first, last in layers]


def convert_run(source: str | Path, num_blocks: int, init: str, out: str | Path,
                overrides: list[str] = ()) -> RunConfig:
    """Writes the run `out` (new, or an empty directory) of `num_blocks` blocks converted from the end-to-end run
    `source` by `init` ("depth" or "copy"); returns its config. Everything is checked before anything is written."""
    source, out = Path(source), Path(out)
    src_cfg = read_config(source)
    layers = source_layers(src_cfg, source, num_blocks, init)
    info = checkpoint.block_info(source, 0)
    if info is None:
        raise ConfigError(f"{str(source)!r} has no weights (block 0 is not trained yet)")
    task = get_task(src_cfg.task)
    blocks = split_source(task, src_cfg, source, layers)
    cfg = converted_config(src_cfg, source, num_blocks, init, overrides)
    for b, (first, last) in enumerate(layers):
        checkpoint.check_state_dict(blocks[b], task.build_block(cfg, b).state_dict(),
                                    f"block {b} converted from layers {first}-{last - 1} of {str(source)!r}")
    task.load_run_data(cfg, source)  # the data it will be fine-tuned and evaluated on, as its source reads it
    if info["step"] < src_cfg.train.steps_per_block:
        logger.warning("%s is partly trained (step %d of %d): converting it as it is", source, info["step"],
                       src_cfg.train.steps_per_block)
    check_free(out)
    with staging(out) as target:
        try:
            write_converted_run(target, source, src_cfg, cfg, init, blocks, layers, info)
        except (OSError, rundir.CheckpointWriteError) as e:
            reason = e.reason if isinstance(e, rundir.CheckpointWriteError) else e.strerror or str(e)
            raise ConfigError(f"could not write the converted run {str(out)!r}: {reason}; nothing of it was left "
                              "behind") from None
        publish(target, out)
    return cfg


def import_run(cfg: RunConfig, out: str | Path) -> RunConfig:
    """Writes the run `out` (new, or an empty directory): the end-to-end run (B=1) of config cfg whose block is the
    pretrained model it names (`Task.pretrained`: model.pretrained of a diffusers DiT or a transformers Llama), saved
    as trained (at step train.steps_per_block), so that sample, evaluate, convert and train --from take it. Everything
    is checked before anything is written."""
    out = Path(out)
    task = get_task(cfg.task)
    if cfg.blocks.num_blocks != 1:
        raise ConfigError(f"import makes an end-to-end run: blocks.num_blocks must be 1, got {cfg.blocks.num_blocks} "
                          "(convert the imported run into blocks afterwards)")
    source = task.pretrained(cfg)
    if source is None:
        raise ConfigError("import needs a pretrained model with weights: the config names none (model.pretrained, a "
                          "directory written by save_pretrained with its weights: a diffusers DiT for "
                          "model.arch='diffusers-dit', a transformers Llama for model.backbone='transformers')")
    data = task.load_data(cfg)
    task.check_after_training(cfg, data)
    weights = task.build_block(cfg, 0, make_generator(cfg.train.seed, 0, "init")).state_dict()  # as train builds it
    check_free(out)
    with staging(out) as target:
        try:
            task.prepare_run(cfg, target, data)
            checkpoint.save_block(target, 0, weights, cfg.train.steps_per_block, cfg, 0.0)
            rundir.save_config(target, cfg)
        except (OSError, rundir.CheckpointWriteError) as e:
            reason = e.reason if isinstance(e, rundir.CheckpointWriteError) else e.strerror or str(e)
            raise ConfigError(f"could not write the imported run {str(out)!r}: {reason}; nothing of it was left "
                              "behind") from None
        publish(target, out)
    logger.info("imported %s as block 0 of %s", source, out)
    return cfg


def write_converted_run(target: Path, source: Path, src_cfg: RunConfig, cfg: RunConfig, init: str,
                        blocks: list[dict[str, torch.Tensor]], layers: list[tuple[int, int]],
                        info: dict[str, Any]) -> None:
    """Writes into the empty directory `target` the converted blocks, config.json, the source's vocabulary (text
    tasks) and composition.json, which records each block's source."""
    source_sha256 = checkpoint.sha256_file(rundir.block_weights_path(source, 0))
    rows = []
    for b, (weights, (first, last)) in enumerate(zip(blocks, layers)):
        checkpoint.save_block(target, b, weights, info["step"], cfg, info["train_time_s"])
        rows.append({"block": b, "run": str(source.resolve()), "run_name": src_cfg.name,
                     "data": src_cfg.to_dict().get("data"), "step": info["step"],
                     "steps_per_block": src_cfg.train.steps_per_block, "role": "converted", "init": init,
                     "source_block": 0, "layers": [first, last], "source_sha256": source_sha256,
                     "sha256": checkpoint.sha256_file(rundir.block_weights_path(target, b))})
    copy_vocabulary({0: source}, target)
    rundir.save_config(target, cfg)
    checkpoint.save_composition(target, rows)
