"""One block resident: offloaded training, kill and resume, per-block retraining, streamed inference."""

import torch
from conftest import TINY, kill_training_once

from diffusionblocks import checkpoint, pretrained, rundir
from diffusionblocks.cli import main
from diffusionblocks.data import DataConfig, load_image_data
from diffusionblocks.generate import generate
from diffusionblocks.tasks import apply_overrides, get_task
from diffusionblocks.train import train


def disk_weights(run, B):
    return {b: checkpoint.load_train_state(run, b)["model"] for b in range(B)}


def assert_same(w1, w2, atol=0.0):
    for b in w1:
        for k in w1[b]:
            if atol:
                assert torch.allclose(w1[b][k], w2[b][k], atol=atol), (b, k)
            else:
                assert torch.equal(w1[b][k], w2[b][k]), (b, k)


def test_offloaded_and_resident_sequential_training_give_identical_weights(tiny_cfg, tmp_path):
    data = load_image_data(DataConfig()).train
    resident = train(get_task(tiny_cfg.task), tiny_cfg, data, None, progress=False)
    rundir.save_config(tmp_path, tiny_cfg)
    offloaded = train(get_task(tiny_cfg.task), tiny_cfg, data, tmp_path, progress=False)
    assert all(s.resident for s in resident.values()) and not any(s.resident for s in offloaded.values())
    assert_same({b: s.denoiser.state_dict() for b, s in resident.items()}, disk_weights(tmp_path, 3))


def test_activation_checkpointing_gives_the_same_training(tiny_cfg):
    data = load_image_data(DataConfig()).train
    plain = train(get_task(tiny_cfg.task), tiny_cfg, data, None, progress=False)
    ckpt = train(get_task(tiny_cfg.task), apply_overrides(tiny_cfg, ["train.activation_checkpointing=true"]), data, None, progress=False)
    assert_same({b: s.denoiser.state_dict() for b, s in plain.items()},
                {b: s.denoiser.state_dict() for b, s in ckpt.items()}, atol=1e-6)


def test_run_killed_mid_block_resumes_to_the_uninterrupted_weights(tmp_path):
    args = [*TINY, "train.steps_per_block=60", "train.checkpoint_every=10", "sample.steps=2"]
    ref = tmp_path / "ref"
    assert main(["train", "--out", str(ref), "--no-progress", *args]) == 0
    run = tmp_path / "killed"
    # Kill it once block 1 has a checkpoint but has not finished.
    step = kill_training_once(run, args, block=1, min_step=10)
    assert step is not None and 10 <= step < 60, step
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert_same(disk_weights(ref, 3), disk_weights(run, 3))


def test_retraining_one_block_leaves_the_others_byte_identical(tmp_path, capsys):
    src = tmp_path / "src"
    assert main(["train", "--out", str(src), "--no-progress", *TINY]) == 0
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    for mode in ([], ["--reinit"]):
        new = tmp_path / f"new{len(mode)}"
        assert main(["train", "--from", str(src), "--blocks", "1", "--out", str(new), "--no-progress",
                     "train.steps_per_block=4", "train.lr=5e-4", *mode]) == 0
        for b in (0, 2):
            for path in (checkpoint.block_weights_path, checkpoint.block_state_path):
                assert path(new, b).read_bytes() == path(src, b).read_bytes()
        assert checkpoint.block_weights_path(new, 1).read_bytes() != checkpoint.block_weights_path(src, 1).read_bytes()
        assert checkpoint.block_step(new, 1) == 4 and (new / "samples.png").is_file()
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # the source run is untouched
    code = main(["train", "--from", str(src), "--blocks", "1", "model.depth=6", "--out", str(tmp_path / "x")])
    assert code == 2 and "would change what the run" in capsys.readouterr().err


def test_fine_tuning_starts_from_the_trained_weights(tmp_path):
    src = tmp_path / "src"
    assert main(["train", "--out", str(src), "--no-progress", *TINY]) == 0
    new = tmp_path / "ft"
    # Zero learning rate: fine-tuning must leave block 1 exactly as trained.
    assert main(["train", "--from", str(src), "--blocks", "1", "--out", str(new), "--no-progress",
                 "train.steps_per_block=2", "train.lr=1e-12", "train.weight_decay=0"]) == 0
    a, b = checkpoint.load_train_state(src, 1)["model"], checkpoint.load_train_state(new, 1)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-9) for k in a)


def test_training_only_some_blocks(tmp_path):
    run = tmp_path / "part"
    assert main(["train", "--out", str(run), "--blocks", "2", "--no-progress", *TINY]) == 0
    assert [checkpoint.block_step(run, b) for b in range(3)] == [None, None, 6]
    assert not (run / "samples.png").exists()
    assert main(["train", "--resume", str(run), "--blocks", "0,1", "--no-progress"]) == 0
    assert (run / "samples.png").is_file()


def test_streamed_inference_equals_resident_and_loads_each_block_once(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--no-progress", *TINY]) == 0
    labels = torch.arange(10)
    kw = dict(image_shape=(1, 8, 8), num_classes=10, steps=12, guidance=2.0)
    resident, _ = pretrained.from_pretrained(run)
    streamed, _ = pretrained.from_pretrained(run, stream=True)
    assert torch.equal(generate(resident, labels, **kw), generate(streamed, labels, **kw))
    assert streamed.blocks.loads == 3
    streamed_heun, _ = pretrained.from_pretrained(run, stream=True)
    assert torch.equal(generate(resident, labels, sampler="heun", **kw), generate(streamed_heun, labels, sampler="heun", **kw))
    assert streamed_heun.blocks.loads == 3
