"""Regression digests: what short runs of the digits presets compute, recorded per environment.

A run is described twice. Its *digests* (sha256 of every weights tensor, the logged losses' bits, the sample grid's
bytes, the evaluation) can only be compared bit for bit on the environment they were recorded on: the same torch
build, thread count, CPU instruction set and CPU, whose kernels order the arithmetic the same way. Its *values*
(each logged loss, each weights tensor's sum, norm and projection on fixed random signs, the sample grid's
pixels, the evaluation's accuracies) are compared on any other environment within tolerances set from the drift
measured between instruction sets (see `regression_digests.json`'s "tolerance" entry and `python
tests/digests.py --help`).

    python tests/digests.py record SCRATCH             # add (or replace) this environment's recording
    python tests/digests.py describe SCRATCH OUT.json  # this environment's description (say, ATEN_CPU_CAPABILITY=avx2)
    python tests/digests.py drift A.json B.json        # the largest deviation of each quantity between two descriptions
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import io
import json
import math
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from diffusionblocks.cli import main
from diffusionblocks.rundir import code_version
from diffusionblocks.tasks import config_from_dict

ROOT = Path(__file__).resolve().parents[1]
DIGESTS = Path(__file__).with_name("regression_digests.json")
THREADS = 1
SHORT = ["train.steps_per_block=60", "train.batch_size=32", "train.checkpoint_every=25", "train.log_every=10",
         "train.lr_warmup_steps=10"]
DIT_SAMPLES = ["sample.samples_per_class=2", "sample.steps=12"]
# name -> (preset, extra arguments); sequential and interleaved runs of one config must give the same files.
CASES = {
    "dit-sequential": ("digits-dit-128.json", DIT_SAMPLES),
    "dit-interleaved": ("digits-dit-128.json", ["--schedule", "interleaved", *DIT_SAMPLES]),
    "vit-fixed-sequential": ("digits-vit.json", []),
    "vit-fixed-interleaved": ("digits-vit.json", ["--schedule", "interleaved"]),
    "vit-learned_first": ("digits-vit.json", ["classify.label_embedding=learned_first"]),
    "vit-learned_joint": ("digits-vit.json", ["--schedule", "interleaved", "classify.label_embedding=learned_joint"]),
    "vit-plain": ("digits-vit.json", ["model.mode=plain", "blocks.num_blocks=1"]),
}
# The text tasks at a tiny size, on Tiny Shakespeare (the presets' relative path: the cases run from the repository).
TEXT = ["model.hidden_size=32", "model.num_heads=2", "model.seq_len=32", "sample.num=2"]
GENERATED = ["sample.new_chars=24", "sample.prompt_chars=16"]
RECURRENT = ["model.prelude=1", "model.core=1", "model.coda=1", "model.depth=3", "model.mean_recurrence=4",
             "model.bptt=2"]
# The `evaluate` options of the cases that are evaluated by the command (the text tasks), at a tiny size.
GENERATION = ["--windows", "8", "--prompts", "2", "--new", "16"]
EVALUATE = {"mdlm": ["--windows", "8", "--repeats", "2", "--strata", "4", "--num", "2", "--judge", "none"],
            "arlm": [*GENERATION, "--speed-prompts", "1", "--judge", "none"],
            "arlm-plain": [*GENERATION, "--speed-prompts", "1", "--judge", "none"],
            "recurrent": [*GENERATION, "--iterations", "1,4", "--draws", "2", "--judge", "none"],
            "recurrent-huginn": [*GENERATION, "--iterations", "1,4", "--draws", "2", "--judge", "none"]}
CASES.update({
    "mdlm": ("shakespeare-mdlm.json", [*TEXT, "model.depth=3"]),
    "arlm": ("shakespeare-arlm.json", [*TEXT, *GENERATED, "model.depth=3"]),
    "arlm-plain": ("shakespeare-arlm.json", [*TEXT, *GENERATED, "model.depth=3", "model.mode=plain",
                                             "blocks.num_blocks=1"]),
    "recurrent": ("shakespeare-recurrent.json", [*TEXT, *GENERATED, *RECURRENT]),
    "recurrent-huginn": ("shakespeare-recurrent.json", [*TEXT, *GENERATED, *RECURRENT, "model.mode=huginn"]),
})
# What the tolerant mode compares, with the unit of each deviation.
QUANTITIES = {
    "loss": "relative difference of a logged loss",
    "weights": "norm of the differences of the tensors' sums (norms, random projections) over the norm of the weights",
    "pixels": "mean absolute difference of the sample grid's pixels, in 8-bit levels",
    "accuracy": "difference of an evaluation accuracy, in held-out examples",
    "text": "fraction of the sampled characters (samples.txt, the evaluation's texts) that differ, by position",
    "figures": "difference of an evaluation's other figures (bits, sigmas) over 1 + the figure",
    "decided": "absolute difference of an evaluation figure made of top-1 or drawn choices (error rates, what each "
               "block decided, the chain's bits under the argmax and sample bridges)",
    "text_figures": "difference of a figure of generated text (distinct n-grams, repeated runs) over 1 + the figure",
}
# Figures made of top-1 or drawn choices: a token whose top two logits (or whose draw) sit across a boundary moves
# them by a step (an error rate by 1/n; a chain whose bridge feeds the choice back, in all its later steps).
ERROR_KEYS = ("chain_error", "oracle_error", "chance_error")
DECISION_TABLES = ("chain", "oracle")  # decision/<table>/<block>/...: made of the error rates along the chain
DECIDED_BRIDGES = ("argmax", "sample")  # chain/<bridge>/<step>/chain_bits
TEXT_FIGURE_KEYS = ("distinct_2", "distinct_4", "longest_run_mean", "longest_run_max")


# ---- the environment

def environment() -> dict:
    """What decides the bits a run computes: torch build, threads, the kernels' instruction set, the CPU, libc."""
    return {"torch": torch.__version__, "threads": THREADS, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "cpu": _cpu_model(), "simd": _simd_flags(),
            "libc": " ".join(platform.libc_ver())}


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpu_model() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith(("model name", "Processor", "cpu model")):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _simd_flags() -> str:
    """The CPU's vector-instruction flags (x86's avx*, amx*, fma, f16c, sse*; ARM's asimd*, sve*), sorted."""
    for line in _cpuinfo().splitlines():
        if line.startswith(("flags", "Features")):
            flags = line.split(":", 1)[1].split()
            return " ".join(sorted(f for f in flags if f.startswith(
                ("avx", "amx", "fma", "f16c", "sse", "ssse", "asimd", "sve", "fp16", "bf16", "i8mm"))))
    return ""


# ---- describing a run

def train_case(name: str, out: Path, extra: list[str] = ()) -> Path:
    """Trains case `name` (with `extra` overrides) on THREADS intra-op threads into out/name, and evaluates it into
    out/name/evaluation when EVALUATE names it."""
    preset, args = CASES[name]
    run = out / name
    argv = ["train", "--config", str(ROOT / "presets" / preset), "--out", str(run), "--no-progress", *args, *SHORT,
            *extra]
    threads, cwd = torch.get_num_threads(), os.getcwd()
    torch.set_num_threads(THREADS)
    os.chdir(ROOT)
    try:
        assert main(argv) == 0
        if name in EVALUATE:
            assert main(["evaluate", str(run), "--out", str(run / "evaluation"), "--no-progress", *EVALUATE[name]]) == 0
    finally:
        torch.set_num_threads(threads)
        os.chdir(cwd)
    return run


def _signs(n: int) -> np.ndarray:
    """n fixed random signs (+1 / -1), the same on every machine."""
    return np.random.default_rng(20261130).integers(0, 2, n).astype(np.float64) * 2 - 1


def tensor_values(t: torch.Tensor) -> list:
    """[dtype, shape, sum, L2 norm, projection on fixed random signs], the sums in float64."""
    w = t.detach().to(torch.float64).reshape(-1).numpy()
    return [str(t.dtype), list(t.shape), float(w.sum()), float(np.linalg.norm(w)), float(w @ _signs(w.size))]


def describe_run(run: Path) -> dict:
    """{"digests": what is compared bit for bit, "values": what is compared within tolerances}."""
    digests: dict = {"files": {}}
    values: dict = {"weights": {}}
    for path in sorted(run.glob("*.safetensors")):
        h = hashlib.sha256()
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key).contiguous() for key in sorted(f.keys())}
        for key, t in tensors.items():  # sha256 over every tensor's name, dtype, shape and bytes, in name order
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        meta.pop("train_time_s", None)  # wall time
        digests["files"][path.name] = {"tensors_sha256": h.hexdigest(),
                                       "metadata": {k: v for k, v in meta.items() if k != "config"},
                                       "config": json.loads(meta["config"]) if "config" in meta else None}
        values["weights"][path.name] = {key: tensor_values(t) for key, t in tensors.items()}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    digests["losses"] = sorted([r["block"], r["step"], r["loss"].hex()] for r in rows)
    if (run / "samples.png").is_file():
        png = (run / "samples.png").read_bytes()
        digests["samples_png_sha256"] = hashlib.sha256(png).hexdigest()
        values["samples_png"] = base64.b64encode(png).decode()
    if (run / "samples.txt").is_file():
        text = (run / "samples.txt").read_bytes()
        digests["samples_txt_sha256"] = hashlib.sha256(text).hexdigest()
        values["samples_txt"] = text.decode()
    summary = json.loads((run / "train_summary.json").read_text())
    evaluated = run / "evaluation" / "evaluation.json"
    evaluation = json.loads(evaluated.read_text()) if evaluated.is_file() else summary.get("evaluation")
    if evaluation is not None:
        digests["evaluation"] = _without_timing(evaluation)
    return {"digests": digests, "values": values}


def _without_timing(node):
    """An evaluation without its wall times and speeds (keys ending in _s or holding per_s), the run's path and the
    commit that evaluated it."""
    if isinstance(node, dict):
        return {k: _without_timing(v) for k, v in node.items()
                if not (k in ("run", "code") or k.endswith("_s") or "per_s" in k)}
    return [_without_timing(v) for v in node] if isinstance(node, list) else node


# ---- old recordings in today's form

def current_form(config: dict) -> dict:
    """A recorded config as today's code writes it: read through its task's config class (its upgrade_config turns
    older forms into today's; fields added since take their defaults, the values earlier recordings implicitly had)."""
    return json.loads(config_from_dict(config).to_json())


def expected_digests(case: dict) -> dict:
    """A recorded case's digests with each weights file's config in today's form."""
    digests = json.loads(json.dumps(case["digests"]))
    for f in digests["files"].values():
        if f["config"] is not None:
            f["config"] = current_form(f["config"])
    return digests


# ---- the tolerant comparison

def _losses(case: dict) -> dict[tuple[int, int], float]:
    return {(b, s): float.fromhex(x) for b, s, x in case["digests"]["losses"]}


def _pixels(case: dict) -> np.ndarray | None:
    png = case.get("values", {}).get("samples_png")
    return None if png is None else np.asarray(Image.open(io.BytesIO(base64.b64decode(png))), dtype=np.float64)


def _leaves(node, path: str = "") -> dict[str, object]:
    """An evaluation's values by path ("per_step/0/chain_accuracy")."""
    if isinstance(node, dict):
        return {k: v for key, child in node.items() for k, v in _leaves(child, f"{path}/{key}").items()}
    if isinstance(node, list):
        return {k: v for i, child in enumerate(node) for k, v in _leaves(child, f"{path}/{i}").items()}
    return {path.lstrip("/"): node}


def _kind(path: str, value) -> str:
    """How an evaluation's value is compared in the tolerant mode: as an accuracy, a figure, a decided figure, a
    figure of generated text, generated text, not at all ("derived": a decision table's shares, each block's
    `removed` over the chain's total of a few tokens, compared through the error rates they are made of), or
    exactly (counts, flags, names, the prompts drawn from the data)."""
    parts = path.split("/")
    key = parts[-1] if not parts[-1].isdigit() else parts[-2]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and key in TEXT_FIGURE_KEYS:
        return "text_figures"
    if isinstance(value, float):
        if key in ("top1", "top5", "composition_gap") or key.endswith("accuracy"):
            return "accuracy"
        table = parts[0] == "decision" and len(parts) == 4 and parts[1] in DECISION_TABLES
        if table and key == "share":
            return "derived"
        bridge = parts[1] if len(parts) == 4 and parts[0] == "chain" else None  # chain/<bridge>/<step>/<figure>
        if key in ERROR_KEYS or table and key in ("bits_in", "bits_out", "removed") or \
                bridge in DECIDED_BRIDGES and key == "chain_bits":
            return "decided"
        return "figures"
    return "text" if isinstance(value, str) and key in ("texts", "samples") else "exact"


def _by_kind(case: dict) -> dict[str, dict[str, object]]:
    """A case's evaluation values by path, grouped by how the tolerant mode compares them (`_kind`)."""
    groups: dict[str, dict[str, object]] = {}
    for path, value in _leaves(case["digests"].get("evaluation") or {}).items():
        groups.setdefault(_kind(path, value), {})[path] = value
    return groups


def _differing_chars(a: str, b: str) -> int:
    return sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))


def structure(case: dict) -> dict:
    """What must match exactly in every mode: files, their metadata and configs, tensor names, dtypes and shapes,
    the logged steps, which samples there are, the evaluation's fields and its counts, flags and names."""
    digests = expected_digests(case)
    files = {name: {"metadata": f["metadata"], "config": f["config"]} for name, f in digests["files"].items()}
    weights = case.get("values", {}).get("weights")
    tensors = None if weights is None else {name: {k: v[:2] for k, v in w.items()} for name, w in weights.items()}
    evaluation = digests.get("evaluation")
    return {"files": files, "tensors": tensors, "logged": sorted(_losses(case)),
            "samples": [k for k in ("samples_png_sha256", "samples_txt_sha256") if k in digests],
            "evaluation": sorted(_leaves(evaluation or {})), "evaluation_exact": _by_kind(case).get("exact", {})}


def _largest(deviations) -> float:
    """The largest of some deviations, infinite where one is NaN (a NaN where the reference has a number; max() would
    drop it); 0 for none."""
    return max((math.inf if d != d else d for d in deviations), default=0.0)


def _deviation(a: float, b: float, scale: float) -> float:
    """|a - b| / scale; 0 where both are NaN (a figure undefined in both, such as a share of nothing)."""
    return 0.0 if a != a and b != b else abs(a - b) / scale


def deviations(got: dict, ref: dict) -> dict[str, float]:
    """The largest deviation of each quantity (QUANTITIES) of run description `got` from `ref`; quantities `ref`
    does not hold are left out."""
    out: dict[str, float] = {}
    a, b = _losses(got), _losses(ref)
    out["loss"] = _largest(_deviation(a[k], b[k], max(abs(b[k]), 1e-30)) for k in b)
    if "values" in ref and "values" in got:
        files = []
        for name, tensors in ref["values"]["weights"].items():
            # (tensors, 3): sum, norm and projection of each tensor; the file's deviation of each statistic is the
            # norm of its differences over the norm of the file's weights (one tensor's noise, such as the key
            # bias, whose gradient is zero but for rounding, weighs what its size does).
            r = np.array([v[2:] for v in tensors.values()])
            g = np.array([got["values"]["weights"][name][k][2:] for k in tensors])
            scale = np.linalg.norm(r[:, 1])
            files.append(_largest(np.linalg.norm(g - r, axis=0) / scale) if scale > 0 else
                         (0.0 if np.array_equal(g, r) else math.inf))
        out["weights"] = _largest(files)
        pa, pb = _pixels(got), _pixels(ref)
        if pb is not None:
            out["pixels"] = _largest([float(np.abs(pa - pb).mean())])
    texts = [(got["values"]["samples_txt"], ref["values"]["samples_txt"])] if "samples_txt" in ref.get("values", {}) \
        else []
    kinds_a, kinds_b = _by_kind(got), _by_kind(ref)
    ta, tb = kinds_a.get("text", {}), kinds_b.get("text", {})
    texts += [(ta[k], tb[k]) for k in tb]
    if texts:
        out["text"] = sum(_differing_chars(a, b) for a, b in texts) / max(sum(len(b) for _, b in texts), 1)
    aa, ab = kinds_a.get("accuracy", {}), kinds_b.get("accuracy", {})
    if ab:
        out["accuracy"] = _largest(_deviation(aa[k], ab[k], 1) for k in ab) * ref["digests"]["evaluation"]["num_test"]
    for kind in ("figures", "decided", "text_figures"):
        fa, fb = kinds_a.get(kind, {}), kinds_b.get(kind, {})
        if fb:
            out[kind] = _largest(_deviation(fa[k], fb[k], 1 if kind == "decided" else 1 + abs(fb[k])) for k in fb)
    return out


def tolerant_failures(got: dict, ref: dict, tolerance: dict[str, float]) -> list[str]:
    """What of run description `got` falls outside the tolerances around `ref` (an empty list when nothing does)."""
    sa, sb = structure(got), structure(ref)
    if sb["tensors"] is None:
        sa["tensors"] = None
    wrong = [f"{k} differs: {sa[k]} != {sb[k]}" for k in sb if sa[k] != sb[k]]
    if wrong:
        return wrong
    return [f"{q}: deviation {d:.3g} > tolerance {tolerance[q]:.3g} ({QUANTITIES[q]})"
            for q, d in deviations(got, ref).items() if not d <= tolerance[q]]


# ---- the file

def load() -> dict:
    return json.loads(DIGESTS.read_text())


def recording_for(env: dict, digests: dict | None = None) -> dict | None:
    """The recording made on environment `env`, or None."""
    digests = load() if digests is None else digests
    return next((r for r in digests["recordings"] if r["environment"] == env), None)


def reference(digests: dict | None = None) -> dict:
    """The recording the tolerant mode compares with."""
    digests = load() if digests is None else digests
    return next(r for r in digests["recordings"] if r["environment"] == digests["tolerance"]["reference"])


def describe_all(out: Path) -> dict:
    return {"environment": environment(), "code": code_version(ROOT / "presets"),
            "recorded": datetime.date.today().isoformat(),
            "cases": {name: describe_run(train_case(name, out)) for name in CASES}}


def record(out: Path) -> None:
    """Adds this environment's recording to the file, replacing an earlier one of the same environment only."""
    digests = load()
    new = describe_all(out)
    others = [r for r in digests["recordings"] if r["environment"] != new["environment"]]
    digests["recordings"] = others + [new]
    DIGESTS.write_text(json.dumps(digests, indent=1) + "\n")
    print(f"recorded {len(CASES)} cases for {new['environment']}; {len(others)} other recording(s) kept")


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python tests/digests.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("record", help="train every case here and add this environment's recording to the file")
    p.add_argument("scratch", type=Path)
    p = sub.add_parser("describe", help="train every case here and write the description to a JSON file")
    p.add_argument("scratch", type=Path)
    p.add_argument("out", type=Path)
    p = sub.add_parser("drift", help="the largest deviation of each quantity between two descriptions")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    if args.command == "record":
        record(args.scratch)
    elif args.command == "describe":
        args.out.write_text(json.dumps(describe_all(args.scratch), indent=1) + "\n")
    else:
        a, b = (json.loads(p.read_text()) for p in (args.a, args.b))
        print(f"{args.a} ({a['environment'].get('cpu_capability')}) against {args.b} "
              f"({b['environment'].get('cpu_capability')})")
        worst: dict[str, float] = {}
        for name in [n for n in CASES if n in a["cases"] and n in b["cases"]]:
            d = deviations(a["cases"][name], b["cases"][name])
            worst.update({q: max(v, worst.get(q, 0.0)) for q, v in d.items()})
            print(f"{name:22s} " + "  ".join(f"{q} {v:.3g}" for q, v in d.items()))
        print(f"{'largest':22s} " + "  ".join(f"{q} {v:.3g}" for q, v in worst.items()))


if __name__ == "__main__":
    _main(sys.argv[1:])
