"""Bit-for-bit regression: short runs of the digits presets reproduce the digests recorded before the task refactor.

`regression_digests.json` was written by `python tests/test_regression.py --record` on commit fe85824 (before
the task interface existed), with torch 2.13.0+cpu and one intra-op thread. Each case trains through the CLI and
records, for every file a run writes that depends on the numerics: the sha256 of the weights' tensors (names,
dtypes, shapes and bytes), the weights-file metadata, the loss of every logged step, the sample grid (image
generation) and the held-out evaluation (classification). The whole weights file cannot be compared: its
metadata holds the block's training wall time, which differs from run to run.

Floating-point results depend on the torch build and the CPU kernels it picks, so on another torch version the
test skips with the reason.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from diffusionblocks.cli import main

ROOT = Path(__file__).resolve().parents[1]
DIGESTS = Path(__file__).with_name("regression_digests.json")
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
    "vit-plain": ("digits-vit.json", ["classify.mode=plain", "blocks.num_blocks=1"]),
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_digest(path: Path) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        for key in sorted(f.keys()):
            t = f.get_tensor(key).contiguous()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    meta.pop("train_time_s", None)  # wall time
    return meta


def describe_run(run: Path) -> dict:
    """What a run's numerics determine, in a form that can be compared across code versions."""
    out: dict = {"files": {}}
    for path in sorted(run.glob("*.safetensors")):
        meta = metadata(path)
        out["files"][path.name] = {"tensors_sha256": tensor_digest(path),
                                   "metadata": {k: v for k, v in meta.items() if k != "config"},
                                   "config": json.loads(meta["config"]) if "config" in meta else None}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out["losses"] = sorted([r["block"], r["step"], r["loss"].hex()] for r in rows)
    if (run / "samples.png").is_file():
        out["samples_png_sha256"] = sha256((run / "samples.png").read_bytes())
    summary = json.loads((run / "train_summary.json").read_text())
    if "evaluation" in summary:
        ev = dict(summary["evaluation"])
        ev.pop("inference_s", None)
        ev.pop("run", None)
        out["evaluation"] = ev
    return out


def train_case(name: str, out: Path) -> Path:
    preset, extra = CASES[name]
    run = out / name
    args = ["train", "--config", str(ROOT / "presets" / preset), "--out", str(run), "--no-progress", *extra, *SHORT]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    return run


def record(out: Path) -> None:  # (run on fe85824: the configs then still held what DROPPED lists)
    result = {"torch": torch.__version__, "threads": 1, "short": SHORT,
              "cases": {name: describe_run(train_case(name, out)) for name in CASES}}
    DIGESTS.write_text(json.dumps(result, indent=1) + "\n")


# What the task refactor removed from the configs (and so from the config in each weights file's metadata): the
# sections and fields a run's task never read. Every other field keeps its recorded value.
DROPPED = {"generate": ["classify"], "classify": ["sample", "model.class_dropout"]}
# Fields added since, with the value every recorded run implicitly had (on a CPU, "auto" is fp32 and data on the host).
ADDED = {"train.precision": "auto", "train.compile": False, "train.data_on_device": "auto"}


def without(config: dict, paths: list[str]) -> dict:
    config = json.loads(json.dumps(config))
    for path in paths:
        *parents, last = path.split(".")
        node = config
        for p in parents:
            node = node[p]
        del node[last]
    return config


def current_form(config: dict) -> dict:
    """A recorded config as today's code writes it: DROPPED removed, ADDED set to its recorded behaviour."""
    config = without(config, DROPPED[config["task"]])
    for path, value in ADDED.items():
        section, field = path.split(".")
        config[section][field] = value
    return config


def as_refactored(recorded: dict) -> dict:
    """A recorded case with each weights file's config as the refactored code writes it."""
    recorded = json.loads(json.dumps(recorded))
    for f in recorded["files"].values():
        if f["config"] is not None:
            f["config"] = current_form(f["config"])
    return recorded


def _recorded() -> dict:
    return json.loads(DIGESTS.read_text()) if DIGESTS.is_file() else {"torch": None}


@pytest.mark.skipif(_recorded()["torch"] != torch.__version__,
                    reason=f"digests recorded with torch {_recorded()['torch']}, this is {torch.__version__}")
@pytest.mark.parametrize("name", list(CASES))
def test_runs_reproduce_recorded_digests(name, tmp_path):
    expected = as_refactored(_recorded()["cases"][name])
    got = describe_run(train_case(name, tmp_path))
    assert got == expected


def test_configs_written_before_the_refactor_load():
    """Every recorded config (the old form, with the sections DROPPED lists) loads as its task's config."""
    from diffusionblocks.config import RunConfig

    for case in _recorded()["cases"].values():
        for f in case["files"].values():
            if f["config"] is None:  # label_embedding.safetensors
                continue
            cfg = RunConfig.from_dict(f["config"])
            assert json.loads(cfg.to_json()) == current_form(f["config"])
            assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_a_run_directory_of_the_old_form_samples_resumes_and_shows_status(tmp_path, tiny_cfg, capsys):
    from diffusionblocks.data import load_image_data
    from diffusionblocks.train import train

    run = tmp_path / "run"
    run.mkdir()
    old = {**tiny_cfg.to_dict(), "classify": {"mode": "diffusion", "label_embedding": "fixed",
                                              "loss_weighting": "per_sample", "inference_steps": 0}}
    (run / "config.json").write_text(json.dumps(old, indent=2))
    train(tiny_cfg, load_image_data(tiny_cfg.data).train, run, progress=False)
    assert main(["status", str(run)]) == 0 and "3/3 trained" in capsys.readouterr().out
    assert main(["sample", str(run), "--num", "4", "--steps", "3", "--out", str(tmp_path / "x.npz")]) == 0
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["--record"] or len(sys.argv) != 3:
        sys.exit("usage: python tests/test_regression.py --record SCRATCH_DIR")
    record(Path(sys.argv[2]))
