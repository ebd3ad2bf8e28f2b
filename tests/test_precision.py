"""Mixed precision and the speed options: bf16 autocast trains like fp32, keeps float32 state, and stays exact
across schedules and resumption; the modes are checked; `bench speed` measures what it says."""

import json
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TINY, assert_schedules_agree

from diffusionblocks import checkpoint, compare, precision
from diffusionblocks.cli import main
from diffusionblocks.config import ConfigError
from diffusionblocks.data import load_image_data
from diffusionblocks.tasks import apply_overrides, default_config, get_task
from diffusionblocks.train import train

STEPS = ["train.steps_per_block=40", "train.log_every=5", "train.checkpoint_every=20", "train.lr_warmup_steps=5"]


def logged_losses(run) -> dict[tuple[int, int], float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(r["block"], r["step"]): r["loss"] for r in rows}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """The same tiny run trained in fp32 and in bf16 autocast."""
    out = {}
    for p in ("fp32", "bf16"):
        run = tmp_path_factory.mktemp(p) / "run"
        assert main(["train", "--out", str(run), "--no-progress", *TINY, *STEPS, f"train.precision={p}"]) == 0
        out[p] = run
    return out


def test_bf16_autocast_lowers_the_loss_and_stays_within_one_percent_of_fp32(runs):
    fp32, bf16 = logged_losses(runs["fp32"]), logged_losses(runs["bf16"])
    assert fp32.keys() == bf16.keys()
    for b in range(3):
        first, last = bf16[(b, 5)], bf16[(b, 40)]
        assert last < first, (b, first, last)
    # Over the last 20 steps of each block, the bf16 loss is within 1% of the fp32 one (measured on our CPU:
    # 0.013%, 0.002%, 0.0001% for blocks 0, 1, 2).
    for b in range(3):
        late = [(bf16[(b, s)], fp32[(b, s)]) for s in (25, 30, 35, 40)]
        mean_bf16, mean_fp32 = (sum(x) / len(x) for x in zip(*late))
        assert abs(mean_bf16 - mean_fp32) <= 0.01 * mean_fp32, (b, mean_bf16, mean_fp32)
    # The two differ: bf16 did run in bf16.
    assert any(bf16[k] != fp32[k] for k in fp32)


def test_bf16_keeps_weights_optimiser_state_and_checkpoints_in_float32(runs):
    state = checkpoint.load_train_state(runs["bf16"], 0)
    assert all(v.dtype == torch.float32 for v in state["model"].values())
    assert all(v.dtype == torch.float32 for s in state["optimizer"]["state"].values() for k, v in s.items()
               if torch.is_tensor(v) and k != "step")
    from safetensors.torch import load_file

    assert all(v.dtype == torch.float32 for v in load_file(str(checkpoint.block_weights_path(runs["bf16"], 1))).values())


def test_bf16_schedules_agree_and_resume_is_exact(tmp_path, one_thread):
    cfg = apply_overrides(default_config(), [*TINY, "train.precision=bf16"])
    data = load_image_data(cfg.data).train
    assert_schedules_agree(cfg, data)
    whole = train(get_task(cfg.task), cfg, data, None, progress=False)
    run = tmp_path / "r"
    run.mkdir()
    half = apply_overrides(cfg, ["train.steps_per_block=3"])
    train(get_task(half.task), half, data, run, progress=False)
    resumed = train(get_task(cfg.task), cfg, data, run, progress=False)  # continues each block from its checkpoint at step 3
    for b in range(3):
        saved = checkpoint.load_train_state(run, b)["model"]
        ref = whole[b].denoiser.state_dict()
        assert resumed[b].step == 6 and all(torch.equal(saved[k], ref[k]) for k in ref)


def test_precision_modes_are_resolved_and_checked():
    cpu = torch.device("cpu")
    assert precision.resolve("auto", cpu) == "fp32" and precision.resolve("bf16", cpu) == "bf16"
    with pytest.raises(ConfigError, match="tf32"):
        precision.resolve("tf32", cpu)
    with pytest.raises(ConfigError, match="train.precision='fp16' is not one of"):
        apply_overrides(default_config(), ["train.precision=fp16"])
    with pytest.raises(ConfigError, match="train.compile must be true or false"):
        apply_overrides(default_config(), ["train.compile=1"])


def test_tf32_on_a_cpu_is_refused_before_the_run_directory_exists(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "--device", "cpu", *TINY, "train.precision=tf32"]) == 2
    assert "precision 'tf32' is a CUDA matmul mode" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_sampling_in_bf16_is_close_to_fp32(runs, tmp_path, capsys):
    import numpy as np

    images = {}
    for p in ("fp32", "bf16"):
        out = tmp_path / f"{p}.npz"
        assert main(["sample", str(runs["fp32"]), "--num", "10", "--steps", "6", "--precision", p, "--out", str(out),
                     "--no-progress"]) == 0
        images[p] = np.load(out)["images"]
    diff = np.abs(images["fp32"] - images["bf16"])
    assert 0 < diff.max() and diff.mean() < 0.05  # the same samples, up to bf16 rounding (images in [-1, 1])


def test_bench_speed_times_the_loop_and_the_bare_step(tmp_path, capsys, one_thread):
    out = tmp_path / "speed"
    assert main(["bench", "speed", "--model", "tiny", "--image-size", "8", "--channels", "1", "--batch", "8",
                 "--num-blocks", "3", "--precisions", "fp32,bf16,tf32", "--compile", "off", "--steps", "2",
                 "--windows", "1", "--warmup", "1", "--device", "cpu", "--out", str(out)]) == 0
    results = json.loads((out / "speed.json").read_text())
    assert [(r["precision"], r["compile"]) for r in results] == [("fp32", False), ("bf16", False)]  # no tf32 on CPU
    for r in results:
        assert len(r["blocks"]) == 3 and r["end_to_end"]["loop_s"] > 0 and r["end_to_end"]["bare_s"] > 0
    assert "| fp32 | off |" in (out / "speed.md").read_text()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
@pytest.mark.parametrize("keep", [False, True])
def test_kept_freed_memory_stays_resident_for_the_next_step(keep, tmp_path):
    """A freed 48 MiB tensor leaves the resident set under glibc's defaults (a block that size is its own mapping,
    unmapped when freed) and stays in it, to be reused, after `keep_freed_memory`; `bench speed
    --keep-freed-memory` sets it and records it. In a fresh process: the setting is process-wide."""
    flag = ["--keep-freed-memory"] if keep else []
    script = textwrap.dedent(f"""
        import json, sys, torch
        from diffusionblocks.cli import main
        from diffusionblocks.memory import current_rss_bytes
        x = torch.ones(12 << 20)  # 48 MiB, before any setting: glibc's defaults
        del x
        code = main(["bench", "speed", "--model", "tiny", "--image-size", "8", "--channels", "1", "--batch", "4",
                     "--num-blocks", "2", "--precisions", "fp32", "--compile", "off", "--steps", "1", "--windows", "1",
                     "--warmup", "0", "--device", "cpu", "--out", sys.argv[1], *{flag!r}])
        x = torch.ones(12 << 20)
        before = current_rss_bytes()
        del x
        print(json.dumps({{"code": code, "drop": before - current_rss_bytes()}}))
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "speed")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["code"] == 0
    if keep:
        assert got["drop"] < 8 << 20, got
    else:
        assert got["drop"] > 40 << 20, got
    recorded = {r["kept_freed_memory"] for r in json.loads((tmp_path / "speed" / "speed.json").read_text())}
    assert recorded == {256 << 20 if keep else 0}


@pytest.mark.parametrize("kept", [0, 256 << 20])
def test_compare_trains_its_runs_with_the_allocator_setting_it_has(kept, tmp_path, monkeypatch):
    """`compare` trains each run in a fresh process: `compare --keep-freed-memory` passes the flag on to them."""
    commands = []
    monkeypatch.setattr(precision, "kept_freed_memory", kept)
    monkeypatch.setattr(compare.subprocess, "run",
                        lambda cmd: commands.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    compare._train(default_config(), tmp_path / "run", tmp_path / "config.json", None, False)
    assert commands and ("--keep-freed-memory" in commands[0]) == bool(kept)
