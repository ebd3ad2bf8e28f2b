"""`diffusionblocks bench memory`: peak training memory and step time, end-to-end vs DiffusionBlocks, measured.

Each configuration runs in a fresh process (so one's allocations cannot hide another's), on random
data of the model's shape (`--model`, a DiT size) or on the data of any task's config (`--config`), and
measures the peak memory of its training (CUDA: max_memory_allocated; CPU: the peak resident set size
above the process' size just before training, and, in a second fresh process, the peak of the bytes
PyTorch's CPU allocator handed out, the CPU's counterpart of CUDA's measure) next to the analytic
breakdown of method.md section 6: parameters P, gradients P, AdamW state 2P of the blocks resident,
and the activations one forward pass saves for backward (counted exactly with saved-tensor hooks).

Configurations: end-to-end (B=1), end-to-end with activation checkpointing, and for each B:
interleaved (every block and optimiser resident, as in the reference code), sequential with the
inactive blocks offloaded to disk, and that with checkpointing.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from . import precision
from .config import BlocksConfig, ConfigError, RunConfig, TrainConfig, even_split
from .data import ImageData
from .memory import CPU_MEASURES, PeakMemory
from .seeding import make_generator
from .tasks import config_from_dict, get_task
from .tasks.image_generation import DiTModelConfig, GenerationConfig
from .train import BlockState, init_block_state, save_block_state, train_step

logger = logging.getLogger(__name__)

MODEL_SIZES = {  # DiT presets (Peebles & Xie 2023, Table 1) and a tiny one for tests
    "dit-s2": dict(hidden_size=384, depth=12, num_heads=6, patch_size=2),
    "dit-b2": dict(hidden_size=768, depth=12, num_heads=12, patch_size=2),
    "tiny": dict(hidden_size=32, depth=12, num_heads=2, patch_size=2),
}


@dataclasses.dataclass(frozen=True)
class MemCase:
    """One configuration: mode "e2e", "interleaved" or "sequential" with B blocks, with or without checkpointing."""

    mode: str
    num_blocks: int
    checkpointing: bool = False

    @property
    def name(self) -> str:
        base = "end-to-end" if self.mode == "e2e" else f"B={self.num_blocks} {self.mode}"
        if self.mode == "sequential":
            base += " offloaded"
        return base + (" + ckpt" if self.checkpointing else "")


def memory_cases(num_blocks: list[int]) -> list[MemCase]:
    cases = [MemCase("e2e", 1), MemCase("e2e", 1, True)]
    for B in num_blocks:
        cases += [MemCase("interleaved", B), MemCase("sequential", B), MemCase("sequential", B, True)]
    return cases


def model_config(size: str, image_size: int, channels: int, batch: int) -> RunConfig:
    """The class-conditional DiT of a named size (`--model`)."""
    if size not in MODEL_SIZES:
        raise ConfigError(f"--model {size!r} is not one of {', '.join(MODEL_SIZES)}")
    model = DiTModelConfig(image_size=image_size, in_channels=channels, num_classes=10, **MODEL_SIZES[size])
    return GenerationConfig(name=f"membench-{size}", model=model, train=TrainConfig(batch_size=batch))


def case_config(base: RunConfig, case: MemCase) -> RunConfig:
    """base with the case's B (layers split as evenly as possible), schedule and checkpointing."""
    L, B = base.model.depth, case.num_blocks
    split = even_split(L, B)
    train = dataclasses.replace(base.train, schedule="sequential" if case.mode != "interleaved" else "interleaved",
                                lr_warmup_steps=0, grad_clip=0.0, activation_checkpointing=case.checkpointing)
    cfg = get_task(base.task).comparison_config(dataclasses.replace(
        base, blocks=dataclasses.replace(base.blocks, num_blocks=B, layers_per_block=split), train=train))
    cfg.validate()
    return cfg


def bench_data(cfg: RunConfig, random_images: bool):
    """The training data: random images of the model's shape, or the config's own data."""
    if not random_images:
        return get_task(cfg.task).load_data(cfg).train
    m, n = cfg.model, max(cfg.train.batch_size, 64)
    g = make_generator(0, "membench-data")
    return ImageData(torch.randn(n, m.in_channels, m.image_size, m.image_size, generator=g).clamp(-1, 1),
                     torch.randint(10, (n,), generator=g), 10, "random")


def saved_activation_bytes(state: BlockState, cfg: RunConfig, batch, device: torch.device | str = "cpu") -> int:
    """Bytes of the tensors one training forward pass of the block saves for backward (unique storages)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    task = get_task(cfg.task)
    inputs = task.loss_inputs(cfg, task.partition(cfg), state.b, batch, make_generator(0, "membench"))
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    params = {p.untyped_storage().data_ptr() for p in state.denoiser.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = state.denoiser.loss(**inputs).mean()
    del loss
    return sum(n for ptr, n in seen.items() if ptr not in params)


def _warm_up(cfg: RunConfig, data, device: torch.device) -> None:
    """One step of a one-layer model at batch 2, so that lazily loaded kernels, thread pools and allocator
    pools are in place before the measurement starts and are not counted as training memory."""
    small = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, depth=1),
                                blocks=BlocksConfig(num_blocks=1), train=dataclasses.replace(cfg.train, batch_size=2))
    task = get_task(cfg.task)
    small = task.comparison_config(small)
    s = init_block_state(task, small, 0, device)
    train_step(task, s, small, task.partition(small), task.batch_sampler(small, data, 99), device)
    with tempfile.TemporaryDirectory() as tmp:
        save_block_state(Path(tmp), s, small)
    del s
    gc.collect()


def run_case(base: RunConfig, random_images: bool, steps: int, case: MemCase, device: torch.device,
             cpu_measure: str = "rss") -> dict[str, Any]:
    """Trains `steps` steps of every block of the case, measuring peak memory (by `cpu_measure` on the CPU) and
    step times."""
    cfg = case_config(base, case)
    task = get_task(cfg.task)
    data = bench_data(cfg, random_images)
    partition = task.partition(cfg)
    B = case.num_blocks
    step_times: dict[int, list[float]] = {b: [] for b in range(B)}
    params = [0] * B

    def step(state: BlockState, sampler) -> None:
        t0 = time.perf_counter()
        train_step(task, state, cfg, partition, sampler, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_times[state.b].append(time.perf_counter() - t0)

    samplers = {b: task.batch_sampler(cfg, data, b) for b in range(B)}
    _warm_up(cfg, data, device)
    with tempfile.TemporaryDirectory() as tmp, PeakMemory(device, cpu_measure) as mem:
        run_dir = Path(tmp)
        if case.mode == "interleaved":
            states = [init_block_state(task, cfg, b, device) for b in range(B)]
            for s in states:
                params[s.b] = sum(p.numel() for p in s.denoiser.parameters())
            for _ in range(steps):
                for s in states:
                    step(s, samplers[s.b])
        else:
            for b in range(B):
                s = init_block_state(task, cfg, b, device)
                params[b] = sum(p.numel() for p in s.denoiser.parameters())
                for _ in range(steps):
                    step(s, samplers[b])
                save_block_state(run_dir, s, cfg)  # the block waits on disk while the others train
                s.offload()
                del s
                gc.collect()
    # Activations of the largest block's forward pass (after the measurement, so it cannot disturb it).
    b_max = max(range(B), key=lambda b: params[b])
    act_bytes = saved_activation_bytes(init_block_state(task, cfg, b_max, device), cfg, samplers[b_max].batch(0), device)
    resident_params = sum(params) if case.mode == "interleaved" else max(params)
    return {
        "case": case.name, "mode": case.mode, "num_blocks": B, "checkpointing": case.checkpointing,
        "layers_per_block": list(cfg.layer_split()), "params_per_block": params,
        "peak_bytes": mem.peak_bytes, "measure": mem.kind, "peaks": {mem.kind: mem.peak_bytes}, "device": str(device),
        "analytic": {"params": 4 * resident_params, "grads": 4 * resident_params, "adam": 8 * resident_params,
                     "activations": act_bytes},
        "step_s_median_per_block": [statistics.median(t[1:] or t) for t in step_times.values()],
    }


def run_case_in_subprocess(args: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "diffusionblocks", "bench", "memory", "--child", json.dumps(args)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise ConfigError(f"memory benchmark case {args['case']} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_main(spec: str) -> None:
    """Entry point of the measuring subprocess: runs one case and prints its result as one JSON line."""
    a = json.loads(spec)
    case = MemCase(**a["case"])
    torch.set_num_threads(a.get("threads") or torch.get_num_threads())
    if a.get("keep_freed_memory"):
        precision.keep_freed_memory(a["keep_freed_memory"])
    r = run_case(config_from_dict(a["config"]), a["random_images"], a["steps"], case, torch.device(a["device"]),
                 a.get("cpu_measure", "rss"))
    print(json.dumps({**r, "kept_freed_memory": precision.kept_freed_memory}))


def run_benchmark(base: RunConfig, random_images: bool, steps: int, num_blocks: list[int], device: str,
                  out_dir: Path | None, title: str, cpu_measures: tuple[str, ...] = CPU_MEASURES) -> list[dict[str, Any]]:
    """Measures every case of memory_cases(num_blocks) for the base config, each in a fresh process per measure
    (on the CPU, each of `cpu_measures`; the first gives `peak_bytes` and the step times, as the profiler behind
    "allocated" slows the steps)."""
    unknown = [m for m in cpu_measures if m not in CPU_MEASURES]
    if unknown or not cpu_measures:
        raise ConfigError(f"--cpu-measure {','.join(cpu_measures)!r}: give one or more of {', '.join(CPU_MEASURES)}")
    if torch.device(device).type != "cpu":
        cpu_measures = cpu_measures[:1]  # a GPU has one measure, its allocator's
    for case in memory_cases(num_blocks):
        case_config(base, case)  # validates before anything runs
    if not random_images:
        get_task(base.task).load_data(base)  # and the data
    results = []
    for case in memory_cases(num_blocks):
        logger.info("measuring %s ...", case.name)
        spec = {"case": dataclasses.asdict(case), "config": base.to_dict(), "random_images": random_images,
                "steps": steps, "device": device, "keep_freed_memory": precision.kept_freed_memory}
        r = run_case_in_subprocess({**spec, "cpu_measure": cpu_measures[0]})
        for m in cpu_measures[1:]:
            r["peaks"].update(run_case_in_subprocess({**spec, "cpu_measure": m})["peaks"])
        results.append(r)
    write_results(out_dir, "memory", results, format_table(results, title))
    if out_dir is not None:
        plot_memory(results, out_dir / "memory.png", f"{title}, {device}")
    return results


def write_results(out_dir: Path | None, stem: str, results: list[dict[str, Any]], text: str) -> None:
    """Prints a benchmark's table; with out_dir, writes it as STEM.md and the results as STEM.json."""
    print(text)
    if out_dir is None:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(text + "\n")
    logger.info("wrote %s/%s.md and %s.json", out_dir, stem, stem)


MEASURE_LABELS = {"cuda_max_memory_allocated": "CUDA allocated", "cpu_peak_rss_above_start": "RSS",
                  "cpu_peak_allocated_above_start": "CPU allocated"}


def format_table(results: list[dict[str, Any]], title: str) -> str:
    e2e = next(r for r in results if r["mode"] == "e2e" and not r["checkpointing"])
    kinds = list(e2e["peaks"])
    mib = 2 ** 20
    lines = [f"Peak training memory, {title}, {e2e['device']} ({', '.join(kinds)}). Analytic: 4 bytes x "
             "(P params + P grads + 2P AdamW) of the resident blocks, plus the activations one forward pass saves "
             "(largest block).", "",
             "| configuration | layers | " + " | ".join(f"{MEASURE_LABELS.get(k, k)} MiB | / end-to-end" for k in kinds)
             + " | analytic MiB (params+grads+adam+act) | step s per block (median) | B x block step / e2e step |",
             "|---|---|" + "---|---|" * len(kinds) + "---|---|---|"]
    for r in results:
        a = r["analytic"]
        total = sum(a.values())
        measured = " | ".join(f"{r['peaks'][k] / mib:.0f} | {r['peaks'][k] / e2e['peaks'][k]:.3f}" for k in kinds)
        step = r["step_s_median_per_block"]
        rel = sum(step) / e2e["step_s_median_per_block"][0]
        lines.append(f"| {r['case']} | {'/'.join(map(str, r['layers_per_block']))} | {measured} | "
                     f"{total / mib:.0f} = {a['params'] / mib:.0f}+{a['grads'] / mib:.0f}+{a['adam'] / mib:.0f}+"
                     f"{a['activations'] / mib:.0f} | {' / '.join(f'{t:.3f}' for t in step)} | {rel:.3f} |")
    return "\n".join(lines)


def plot_memory(results: list[dict[str, Any]], path: Path, title: str) -> None:
    mib = 2 ** 20
    names = [r["case"] for r in results]
    kinds = list(results[0]["peaks"])
    width = 0.8 / (len(kinds) + 1)
    fig = Figure(figsize=(max(7, 0.65 * len(results)), 4.2))
    ax = fig.subplots()
    x = range(len(results))
    for j, k in enumerate(kinds):
        ax.bar([i - 0.4 + (j + 0.5) * width for i in x], [r["peaks"][k] / mib for r in results], width=width,
               label=f"measured: {MEASURE_LABELS.get(k, k)}")
    bottom = [0.0] * len(results)
    for n, k in enumerate(["params", "grads", "adam", "activations"]):
        h = [r["analytic"][k] / mib for r in results]
        ax.bar([i + 0.4 - width / 2 for i in x], h, width=width, bottom=bottom, color=f"C{len(kinds) + n}", alpha=0.7,
               label=f"analytic: {k}")
        bottom = [b + v for b, v in zip(bottom, h)]
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
