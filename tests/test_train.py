import json
import subprocess
import sys
import textwrap

import pytest
import torch

from diffusionblocks import checkpoint, pretrained, rundir
from diffusionblocks.config import ConfigError
from diffusionblocks.data import BatchSampler, load_image_data
from diffusionblocks.pilot import pilot_config
from diffusionblocks.runs import train_config
from diffusionblocks.seeding import make_generator
from diffusionblocks.tasks import apply_overrides, get_task
from diffusionblocks.train import init_block_state, learning_rate, train


@pytest.fixture(scope="module")
def digits():
    from diffusionblocks.data import DataConfig

    return load_image_data(DataConfig()).train


def fixed_loss(cfg, state, data):
    """The block's loss on a fixed batch, noise levels and noise (independent of the training streams)."""
    y, labels = BatchSampler(data, 64, seed=99, stream=0).batch(0)
    g = make_generator(99, "eval")
    sigma = get_task(cfg.task).partition(cfg).sample(state.b, 64, generator=g).float()
    noise = torch.randn(y.shape, generator=g)
    with torch.no_grad():
        return state.denoiser.loss(y, sigma, noise, class_labels=labels).mean().item()


def weights(states):
    return {b: {k: v.clone() for k, v in s.denoiser.state_dict().items()} for b, s in states.items()}


def weights_on_disk(run, blocks):
    """The training weights each block saved in run (what an offloaded block leaves behind)."""
    return {b: checkpoint.load_train_state(run, b)["model"] for b in blocks}


def assert_same(w1, w2):
    assert w1.keys() == w2.keys()
    for b in w1:
        for k in w1[b]:
            assert torch.equal(w1[b][k], w2[b][k]), (b, k)


def test_short_training_lowers_each_blocks_loss(tiny_cfg, digits):
    cfg = apply_overrides(tiny_cfg, ["train.steps_per_block=60", "train.lr=2e-3", "train.batch_size=32"])
    before = {b: fixed_loss(cfg, init_block_state(get_task(cfg.task), cfg, b, torch.device("cpu")), digits) for b in range(3)}
    states = train(get_task(cfg.task), cfg, digits, None, progress=False)
    for b in range(3):
        after = fixed_loss(cfg, states[b], digits)
        assert after < 0.95 * before[b], (b, before[b], after)


def test_sequential_and_interleaved_give_identical_weights(tiny_cfg, digits):
    seq = train(get_task(tiny_cfg.task), apply_overrides(tiny_cfg, ["train.schedule=sequential"]), digits, None, progress=False)
    inter = train(get_task(tiny_cfg.task), apply_overrides(tiny_cfg, ["train.schedule=interleaved"]), digits, None, progress=False)
    assert all(s.step == tiny_cfg.train.steps_per_block for s in inter.values())
    assert_same(weights(seq), weights(inter))
    # A block trained alone equals the same block trained among the others.
    alone = train(get_task(tiny_cfg.task), tiny_cfg, digits, None, blocks=[1], progress=False)
    assert_same({1: weights(seq)[1]}, weights(alone))


def test_data_on_the_device_trains_the_same_weights(tiny_cfg, digits):
    """train.data_on_device=on: the data moved to the device once, batches and draws made there. On the CPU the
    device is the host, so the weights equal the host path's, for either schedule (CUDA draws differ by design)."""
    from diffusionblocks.data import tensor_bytes, to_device
    from diffusionblocks.train import resident_data

    host = train(get_task(tiny_cfg.task), tiny_cfg, digits, None, progress=False)
    for schedule in ("sequential", "interleaved"):
        cfg = apply_overrides(tiny_cfg, [f"train.schedule={schedule}", "train.data_on_device=on"])
        assert_same(weights(host), weights(train(get_task(cfg.task), cfg, digits, None, progress=False)))
    moved = to_device(digits, "cpu")
    assert torch.equal(moved.images, digits.images) and moved.labels is digits.labels and moved.name == digits.name
    assert tensor_bytes(digits) == digits.images.nbytes + digits.labels.nbytes
    assert resident_data(tiny_cfg, digits, torch.device("cpu")) is digits  # nothing to move on the CPU
    assert to_device(torch.ones(2), "cpu").shape == (2,)  # not a container: returned as it is
    with pytest.raises(ConfigError, match="train.data_on_device"):
        apply_overrides(tiny_cfg, ["train.data_on_device=gpu"])


def test_resume_continues_exactly(tiny_cfg, digits, tmp_path):
    full = train(get_task(tiny_cfg.task), tiny_cfg, digits, None, progress=False)
    for schedule in ("sequential", "interleaved"):
        cfg = apply_overrides(tiny_cfg, [f"train.schedule={schedule}"])
        run = tmp_path / schedule
        run.mkdir()
        rundir.save_config(run, cfg)
        # Interrupted after the first checkpoint (step 3 of 6): train 3 steps and stop.
        train(get_task(cfg.task), apply_overrides(cfg, ["train.steps_per_block=3"]), digits, run, progress=False)
        assert checkpoint.block_step(run, 0) == 3
        resumed = train(get_task(cfg.task), cfg, digits, run, progress=False)
        assert_same(weights(full), weights_on_disk(run, range(3)))
        assert all(not s.resident for s in resumed.values()) == (schedule == "sequential")
        assert checkpoint.block_step(run, 2) == 6


def test_ema_weights_are_saved_for_inference(tiny_cfg, digits, tmp_path):
    cfg = apply_overrides(tiny_cfg, ["train.ema_halflife_steps=2"])
    rundir.save_config(tmp_path, cfg)
    states = train(get_task(cfg.task), cfg, digits, tmp_path, progress=False)
    model, _ = pretrained.from_pretrained(tmp_path)
    assert not states[0].resident  # sequential: saved, then offloaded
    ema = checkpoint.load_train_state(tmp_path, 0)["ema"]
    raw = checkpoint.load_train_state(tmp_path, 0)["model"]
    loaded = model.blocks[0].state_dict()
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)


@pytest.mark.parametrize("task, overrides", [
    ("generate", ["data.hflip=true", "data.crop_padding=1"]),
    ("classify", []),
    ("mdlm", []),
    ("arlm", []),
    ("recurrent", ["model.mode=huginn"]),
    ("recurrent", []),
])
def test_every_draw_of_a_step_is_made_where_its_generator_is(task, overrides, monkeypatch):
    """With the data on a GPU, each step's batch and draws come from generators of that device; a draw that names
    the generator but not its device would go to the CPU and fail there. No GPU here: every random draw with a
    generator is watched, and must name the generator's device (the batch sampler's and the task's)."""
    from pathlib import Path

    from diffusionblocks.tasks import default_config, get_task

    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
    cfg = default_config(task)
    text = ["data.path=" + str(shared)] if task in ("mdlm", "arlm", "recurrent") else []
    cfg = apply_overrides(cfg, [*text, *overrides, "train.batch_size=4"])
    t = get_task(task)
    data = t.load_data(cfg).train
    sampler = t.batch_sampler(cfg, data, 0)
    calls = []

    def watched(fn):
        def draw(*args, **kwargs):
            if kwargs.get("generator") is not None:
                calls.append((fn.__name__, kwargs.get("device"), kwargs["generator"].device))
            return fn(*args, **kwargs)
        return draw

    for name in ("rand", "randn", "randint", "randperm"):  # (poisson and multinomial draw where their input is)
        monkeypatch.setattr(torch, name, watched(getattr(torch, name)))
    batch = sampler.batch(0)
    t.loss_inputs(cfg, get_task(cfg.task).partition(cfg), 0, batch, make_generator(0, 0, 0, "noise"))
    monkeypatch.undo()
    assert calls
    missing = [name for name, device, at in calls if torch.device(device or "meta") != at]
    assert not missing, f"{task}: draws that do not name their generator's device: {missing}"


@pytest.mark.parametrize("first", [True, False])
def test_a_flush_after_torchs_workers_started_is_reported(first):
    """torch's worker threads take the flush mode they start with: flushing first reaches them (a product of
    denormals spread over two threads is 0), flushing after parallel work does not, and flush_denormals says so."""
    script = textwrap.dedent(f"""
        import logging, torch
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        torch.set_num_threads(2)
        if not {first}:
            torch.ones(1 << 20).sum()  # parallel work: the workers start unflushed
        from diffusionblocks import precision
        precision.flush_denormals()
        print("everywhere:", precision._flushed_everywhere())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"everywhere: {first}" in out.stdout
    assert ("not in torch's worker threads" in out.stderr) is not first


def test_the_library_flushes_denormal_floats_as_the_cli_does(tmp_path):
    """A script calling train_run or evaluate_run computes as `diffusionblocks train` does: denormal floats (which
    the lowest-noise blocks make, several times slower on x86) flushed to zero. In a fresh process: this one's
    conftest flushes them already."""
    script = textwrap.dedent(f"""
        import torch
        from diffusionblocks.runs import evaluate_run, train_run
        from diffusionblocks.tasks import apply_overrides, default_config

        def flushed():
            print("flushed:", torch.tensor(1e-39).item() == 0.0)

        cfg = apply_overrides(default_config(), ["task=classify", "model.arch=vit", "model.hidden_size=16",
                                                 "model.num_heads=2", "model.depth=3", "train.steps_per_block=2",
                                                 "train.batch_size=8"])
        flushed()
        run = train_run(cfg, out={str(tmp_path / "run")!r}, progress=False)
        flushed()
        torch.set_flush_denormal(False)
        evaluate_run(run, progress=False)
        flushed()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("flushed:")]
    assert seen == ["False", "True", "True"]


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_the_learning_rate_warms_up_then_follows_its_schedule_to_the_last_step(tiny_cfg, schedule):
    cfg = apply_overrides(tiny_cfg, ["train.steps_per_block=21", "train.lr_warmup_steps=5", "train.lr=2e-3",
                                     f"train.lr_schedule={schedule}", "train.lr_final=0.25"])
    t = cfg.train
    lrs = [learning_rate(t, s) for s in range(t.steps_per_block)]
    assert lrs[:5] == pytest.approx([2e-3 * (s + 1) / 5 for s in range(5)])  # the warm-up, whatever the schedule
    if schedule == "constant":
        assert lrs[5:] == [2e-3] * 16
        return
    # Decay over steps 5..20 (16 steps, progress k / 16 at step 4 + k): below lr from step 5 on, lr_final * lr at the
    # last step (20), halfway at step 12.
    assert lrs[4] == pytest.approx(2e-3) and lrs[5] < lrs[4] and lrs[-1] == pytest.approx(0.25 * 2e-3)
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    if schedule == "linear":
        assert lrs[12] == pytest.approx(2e-3 * (0.25 + 0.75 / 2))
        assert lrs[5] == pytest.approx(2e-3 * (0.25 + 0.75 * 15 / 16))
    else:  # cosine: symmetric about the decay's middle, (x - lr_final lr) at one end mirrors (lr - x) at the other
        assert lrs[7] - 0.5e-3 == pytest.approx(2e-3 - lrs[17])


def test_a_cool_down_keeps_the_rate_until_its_last_steps(tiny_cfg):
    """lr_decay_steps: warm-up, stable, then the decay over the last steps only (a cool-down)."""
    cfg = apply_overrides(tiny_cfg, ["train.steps_per_block=30", "train.lr_warmup_steps=0", "train.lr=1e-3",
                                     "train.lr_schedule=linear", "train.lr_final=0", "train.lr_decay_steps=11"])
    lrs = [learning_rate(cfg.train, s) for s in range(30)]
    assert lrs[:19] == [1e-3] * 19  # steps 0..18 stable, the 11 steps 19..29 decay, to 0 at the last
    assert lrs[19:] == pytest.approx([1e-3 * (1 - k / 11) for k in range(1, 12)])
    one = apply_overrides(cfg, ["train.lr_decay_steps=1"]).train  # a decay of one step: the last one
    assert [learning_rate(one, s) for s in (27, 28, 29)] == [1e-3, 1e-3, 0.0]
    tight = apply_overrides(cfg, ["train.lr_warmup_steps=29", "train.lr_decay_steps=0"]).train  # one step after it
    assert learning_rate(tight, 28) == pytest.approx(1e-3) and learning_rate(tight, 29) == 0.0


def test_a_decaying_schedule_trains_as_logged_and_fixes_the_budget_of_its_run(tiny_cfg, digits, tmp_path):
    cfg = apply_overrides(tiny_cfg, ["train.lr_schedule=cosine", "train.log_every=1", "blocks.num_blocks=1",
                                     "model.depth=1"])
    run = tmp_path / "run"
    run.mkdir()
    rundir.save_config(run, cfg)
    train(get_task(cfg.task), cfg, digits, run, progress=False)
    rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert [r["lr"] for r in rows] == pytest.approx([learning_rate(cfg.train, r["step"] - 1) for r in rows])
    assert rows[-1]["lr"] == pytest.approx(cfg.train.lr_final * cfg.train.lr)
    with pytest.raises(ConfigError, match="its 6 steps are fixed"):
        train_config(resume=run, overrides=["train.steps_per_block=12"])
    assert train_config(resume=run, overrides=["train.log_every=2"]).train.steps_per_block == 6
    constant = tmp_path / "constant"
    constant.mkdir()
    rundir.save_config(constant, tiny_cfg)
    assert train_config(resume=constant, overrides=["train.steps_per_block=12"]).train.steps_per_block == 12
    for bad, message in (("train.lr_schedule=step", "train.lr_schedule"), ("train.lr_final=1.5", "in \\[0, 1\\]"),
                         ("train.lr_warmup_steps=6", "leaves none")):
        with pytest.raises(ConfigError, match=message):
            apply_overrides(cfg, [bad])


def test_the_pilot_of_a_decaying_run_warms_up_within_its_own_steps(tiny_cfg):
    """A balanced partition's pilot trains a quarter of the steps: a decay keeps at most a quarter of them for its
    warm-up (its config would not validate otherwise); a constant rate keeps the run's warm-up, as before."""
    cfg = apply_overrides(tiny_cfg, ["blocks.partition=balanced", "train.lr_schedule=cosine",
                                     "train.steps_per_block=400", "train.lr_warmup_steps=100"])
    pilot = pilot_config(cfg)
    assert pilot.train.steps_per_block == 100 and pilot.train.lr_warmup_steps == 25
    assert apply_overrides(pilot, []).train == pilot.train  # it validates
    assert pilot_config(apply_overrides(cfg, ["train.lr_schedule=constant"])).train.lr_warmup_steps == 100
