"""Where the plain language model's step time beyond a textbook GPT's goes: a cost per step that the batch does not
change against the work on the batch's tokens (issue 26).

The plain model (`CausalLM` of presets/shakespeare-arlm.json with B=1: 6 layers, width 128, 4 heads, sequences of 64)
and the textbook GPT of benchmarks/trunk_speed.py, built as trunk_speed builds them, timed side by side in one process
at several batch sizes: interleaved rounds (each model's turn after one untimed step), medians; a step is the forward,
the backward and the trainer's fused AdamW. A line fitted to each model's median step time against the batch,
t(b) = t0 + b t1 (least squares), splits the step into t0, what does not grow with the batch (launching each
operation: Python, the dispatcher, autograd's bookkeeping, the small tensors of weights and per-token statistics),
and t1, the work per sequence (matrix products, attention, element-wise passes). The ATen operations each model
dispatches in one step are counted (forward, backward, optimizer; views included), and the plain model's extra t0
divided by its extra operations gives what one operation costs on this machine. `--ablate` also times and counts
trunk_speed's ablations (the plain model with its rotation, modulated RMSNorms, learned modulation or SwiGLU swapped
for the GPT's part): the plain model's line minus each ablation's is what that part costs, fixed and per sequence.

    python benchmarks/trunk_overhead.py --threads 2 --batches 1 4 16 32 64 --repeats 11 --json out.json
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from trunk_speed import _cpu_model, _device_name, _load_average, adamw, make_variants, time_rounds

from diffusionblocks import precision

MODELS = ("gpt", "plain_after")


class _CountOps(TorchDispatchMode):
    """Counts the ATen operations dispatched while active, by name."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_ops(model: torch.nn.Module, loss, opt: torch.optim.Optimizer) -> dict[str, int]:
    """ATen operations in one training step: forward (to the mean loss), backward, optimizer (with zero_grad)."""
    counts = {}
    with _CountOps() as c:
        value = loss().mean()
    counts["forward"] = sum(c.ops.values())
    with _CountOps() as c:
        value.backward()
    counts["backward"] = sum(c.ops.values())
    with _CountOps() as c:
        opt.step()
        opt.zero_grad(set_to_none=True)
    counts["optimizer"] = sum(c.ops.values())
    counts["step"] = counts["forward"] + counts["backward"] + counts["optimizer"]
    return counts


def time_batch(batch: int, device: torch.device, repeats: int, steps: int, warmup: int,
               ablate: bool) -> dict[str, list[float]]:
    """Seconds per step of each model at this batch, one entry per interleaved round (one untimed step before each
    model's turn)."""
    variants, _ = make_variants(None, 16, device, ablate=ablate, batch=batch)
    variants = {k: v for k, v in variants.items() if k in MODELS or k.startswith("plain_without_")}
    opts = {k: adamw(m, device) for k, (m, _, _) in variants.items()}
    return time_rounds(variants, opts, device, repeats, steps, warmup, rewarm=1)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 32, 64], help="sequences per step")
    ap.add_argument("--repeats", type=int, default=11, help="interleaved rounds per batch size")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model first, at each batch size")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="glibc's allocator keeps freed memory (as `train --keep-freed-memory`)")
    ap.add_argument("--ablate", action="store_true", help="also time and count trunk_speed's ablations")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    if len(set(args.batches)) < 2 or min(args.batches) < 1:
        ap.error("--batches: at least two different sizes, each at least 1")
    precision.flush_denormals()  # as training does, before torch's worker threads start
    if args.keep_freed_memory and not precision.keep_freed_memory():
        ap.error("--keep-freed-memory: the C library is not glibc")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    variants, _ = make_variants(None, 16, device, ablate=args.ablate, batch=min(args.batches))
    ops = {}
    for name in (*MODELS, *(k for k in variants if k.startswith("plain_without_"))):
        model, loss, _ = variants[name]
        opt = adamw(model, device)
        loss().mean().backward()  # the first step makes the optimizer's state; count a later one
        opt.step()
        opt.zero_grad(set_to_none=True)
        ops[name] = count_ops(model, loss, opt)
    print("ATen operations per step:\n" + "\n".join(f"  {k}: {v['step']} ({v['forward']} forward, {v['backward']} "
                                                    f"backward, {v['optimizer']} optimizer)" for k, v in ops.items()),
          flush=True)

    rows = []
    for batch in args.batches:
        times = time_batch(batch, device, args.repeats, args.steps, args.warmup, args.ablate)
        med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        rounds = statistics.median(a / b for a, b in zip(times["plain_after"], times["gpt"]))
        rows.append({"batch": batch, "median_step_ms": med, "steps_per_s": {k: 1e3 / v for k, v in med.items()},
                     "ratio": med["plain_after"] / med["gpt"], "ratio_median_of_rounds": rounds})
        print(f"batch {batch:4d}: GPT {med['gpt']:7.1f} ms ({1e3 / med['gpt']:5.1f} steps/s), plain "
              f"{med['plain_after']:7.1f} ms ({1e3 / med['plain_after']:5.1f} steps/s), plain / GPT "
              f"{rows[-1]['ratio']:.3f} (median of rounds {rounds:.3f})", flush=True)

    x = [r["batch"] for r in rows]
    fits = {}
    for k in rows[0]["median_step_ms"]:
        slope, intercept = statistics.linear_regression(x, [r["median_step_ms"][k] for r in rows])
        fits[k] = {"fixed_ms": intercept, "per_sequence_ms": slope}
    extra_fixed = fits["plain_after"]["fixed_ms"] - fits["gpt"]["fixed_ms"]
    extra_ops = ops["plain_after"]["step"] - ops["gpt"]["step"]
    for other in list(fits):  # what the plain model adds to the GPT, and what each swapped part costs it
        if other != "plain_after":
            name = "plain_minus_gpt" if other == "gpt" else "part_" + other.removeprefix("plain_without_")
            fits[name] = {k: fits["plain_after"][k] - fits[other][k] for k in ("fixed_ms", "per_sequence_ms")}
    for k, f in fits.items():
        print(f"{k}: t(b) = {f['fixed_ms']:.2f} ms + b x {f['per_sequence_ms']:.3f} ms")
    per_op_us = 1e3 * extra_fixed / extra_ops if extra_ops > 0 else None
    if per_op_us is not None:
        print(f"the plain model's extra fixed time per extra operation: {per_op_us:.1f} us")
    out = {"machine": {"cpu": _cpu_model(), "torch": torch.__version__, "threads": args.threads,
                       "device": _device_name(device), "load_average_after": _load_average()},
           "kept_freed_memory": precision.kept_freed_memory, "repeats": args.repeats, "steps_per_repeat": args.steps,
           "aten_ops_per_step": ops, "batches": rows, "fit": fits, "extra_fixed_us_per_extra_op": per_op_us}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
