"""`diffusionblocks bench speed`: training throughput end to end and per block, for each precision and compile mode.

For every mode it times two things on the same model and device:
- the loop's step: `train.timed_step` as training runs it (the batch and the noise drawn from
  (seed, block, step), the step, the loss kept for the log), without checkpoints;
- the bare step: forward, backward and AdamW on one batch prepared in advance, nothing else.
Their ratio is the loop's overhead. The end-to-end model (B=1) and each block of B blocks are measured,
so that B x (block step) / (end-to-end step) shows what splitting costs or saves. Times are medians of
several timed windows after warm-up (which includes compiling, when on).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from . import precision as precision_mode
from .config import PRECISIONS, ConfigError, RunConfig
from .membench import MemCase, bench_data, case_config, write_results
from .seeding import make_generator
from .tasks import get_task
from .train import Coupling, MetricsLog, device_of, init_block_state, resident_data, timed_step

logger = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_step_s(run_steps, steps: int, windows: int, device: torch.device) -> float:
    """Median over `windows` timed windows of `steps` steps each, of the seconds per step."""
    times = []
    for _ in range(windows):
        _sync(device)
        t0 = time.perf_counter()
        run_steps(steps)
        _sync(device)
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def measure_block(cfg: RunConfig, b: int, data, device: torch.device, steps: int, warmup: int,
                  windows: int) -> dict[str, float]:
    """Seconds per step of block b: the loop's step and the bare step."""
    task = get_task(cfg.task)
    partition = task.partition(cfg)
    sampler = task.batch_sampler(cfg, data, b)
    state = init_block_state(task, cfg, b, device)
    log = MetricsLog(None, cfg.train.log_every)

    def loop(n: int) -> None:
        for _ in range(n):
            timed_step(task, state, cfg, partition, sampler, device, log, None, Coupling())

    loop(warmup)
    loop_s = _median_step_s(loop, steps, windows, device)

    bare = init_block_state(task, cfg, b, device)
    batch = sampler.batch(0)
    inputs = task.loss_inputs(cfg, partition, b, batch, make_generator(cfg.train.seed, b, 0, "noise",
                                                                        device=device_of(batch)))
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}

    def bare_steps(n: int) -> None:
        for _ in range(n):
            with precision_mode.autocast(bare.precision, device):
                loss = bare.loss_fn(**inputs).float().mean()
            bare.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            bare.optimizer.step()

    bare_steps(warmup)
    bare_s = _median_step_s(bare_steps, steps, windows, device)
    return {"loop_s": loop_s, "bare_s": bare_s}


def run_speed_benchmark(base: RunConfig, random_images: bool, num_blocks: int, precisions: list[str],
                        compiles: list[bool], device: torch.device, steps: int, warmup: int, windows: int,
                        out_dir: Path | None, title: str) -> list[dict[str, Any]]:
    """Every (precision, compile) mode: the end-to-end step and each block's, loop and bare; a table and JSON."""
    modes = [(p, c) for p in precisions for c in compiles]
    configs = {}
    for p, c in modes:
        precision_mode.resolve(p, device)  # refused before anything runs
        train = dataclasses.replace(base.train, precision=p, compile=c)
        configs[p, c] = {B: case_config(dataclasses.replace(base, train=train), MemCase("sequential", B))
                         for B in (1, num_blocks)}
    data = resident_data(base, bench_data(base, random_images), device)  # where the training loop would keep it
    results = []
    for (p, c), by_B in configs.items():
        logger.info("measuring precision %s, compile %s ...", p, "on" if c else "off")
        with precision_mode.matmul_mode(precision_mode.resolve(p, device)):
            e2e = measure_block(by_B[1], 0, data, device, steps, warmup, windows)
            blocks = [measure_block(by_B[num_blocks], b, data, device, steps, warmup, windows)
                      for b in range(num_blocks)]
        results.append({"precision": p, "compile": c, "device": str(device), "batch": base.train.batch_size,
                        "num_blocks": num_blocks, "kept_freed_memory": precision_mode.kept_freed_memory,
                        "end_to_end": e2e, "blocks": blocks,
                        "split_ratio_loop": sum(r["loop_s"] for r in blocks) / e2e["loop_s"],
                        "split_ratio_bare": sum(r["bare_s"] for r in blocks) / e2e["bare_s"]})
    write_results(out_dir, "speed", results, format_table(results, title))
    return results


def format_table(results: list[dict[str, Any]], title: str) -> str:
    n = results[0]["batch"]
    B = results[0]["num_blocks"]
    lines = [f"Training speed, {title}, {results[0]['device']}: examples/s = batch {n} / step time; loop = the "
             "training loop's step, bare = forward + backward + AdamW on a prepared batch.", "",
             f"| precision | compile | end-to-end loop ms | end-to-end bare ms | examples/s loop (bare) | loop / bare | "
             f"block steps loop ms (B={B}) | block loop / bare | B blocks / end-to-end, loop (bare) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        e, blocks = r["end_to_end"], r["blocks"]
        block_ratio = statistics.median(b["loop_s"] / b["bare_s"] for b in blocks)
        block_ms = " / ".join(f"{1e3 * b['loop_s']:.1f}" for b in blocks)
        lines.append(
            f"| {r['precision']} | {'on' if r['compile'] else 'off'} | {1e3 * e['loop_s']:.1f} | {1e3 * e['bare_s']:.1f} | "
            f"{n / e['loop_s']:.0f} ({n / e['bare_s']:.0f}) | {e['loop_s'] / e['bare_s']:.2f} | "
            f"{block_ms} | {block_ratio:.2f} | "
            f"{r['split_ratio_loop']:.2f} ({r['split_ratio_bare']:.2f}) |")
    return "\n".join(lines)


def parse_modes(precisions: str, compiles: str) -> tuple[list[str], list[bool]]:
    ps = [p.strip() for p in precisions.split(",") if p.strip()]
    bad = [p for p in ps if p not in PRECISIONS]
    if bad or not ps:
        raise ConfigError(f"--precisions {precisions!r}: each must be one of {', '.join(PRECISIONS)}")
    words = {"off": False, "on": True}
    cs = [c.strip() for c in compiles.split(",") if c.strip()]
    if not cs or any(c not in words for c in cs):
        raise ConfigError(f"--compile {compiles!r}: a comma-separated list of off and on")
    return ps, [words[c] for c in cs]
