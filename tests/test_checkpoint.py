import pytest
import torch

from diffusionblocks import checkpoint, pretrained, rundir
from diffusionblocks.config import ConfigError
from diffusionblocks.seeding import make_generator
from diffusionblocks.tasks import apply_overrides, config_from_dict, get_task
from diffusionblocks.train import init_block_state, save_block_state


def trained_run(cfg, run):
    """A run directory whose blocks have random (non-initial) weights."""
    rundir.save_config(run, cfg)
    states = []
    for b in range(cfg.blocks.num_blocks):
        s = init_block_state(get_task(cfg.task), cfg, b, torch.device("cpu"))
        with torch.no_grad():
            for p in s.denoiser.parameters():
                p.add_(torch.randn(p.shape, generator=make_generator(b, "perturb")) * 0.1)
        s.step = 7
        save_block_state(run, s, cfg)
        states.append(s)
    return states


def test_save_load_gives_identical_outputs(tiny_cfg, tmp_path):
    states = trained_run(tiny_cfg, tmp_path)
    model, cfg = pretrained.from_pretrained(tmp_path)
    assert cfg == tiny_cfg
    x = torch.randn(6, 1, 8, 8)
    sigma = torch.tensor([50.0, 2.0, 0.4, 0.2, 0.05, 0.003])
    labels = torch.tensor([0, 1, 2, 3, 4, 10])
    from diffusionblocks.blocks import BlockwiseDenoiser

    original = BlockwiseDenoiser([s.denoiser for s in states], get_task(tiny_cfg.task).partition(tiny_cfg)).eval()
    with torch.no_grad():
        assert torch.equal(model(x, sigma, class_labels=labels), original(x, sigma, class_labels=labels))
    assert checkpoint.block_step(tmp_path, 1) == 7


def test_missing_block_is_named(tiny_cfg, tmp_path):
    trained_run(tiny_cfg, tmp_path)
    checkpoint.block_weights_path(tmp_path, 1).unlink()
    with pytest.raises(ConfigError, match=r"missing the weights of block\(s\) 1 of 3"):
        pretrained.from_pretrained(tmp_path)


def test_corrupt_checkpoint_is_named(tiny_cfg, tmp_path):
    trained_run(tiny_cfg, tmp_path)
    path = checkpoint.block_weights_path(tmp_path, 2)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ConfigError, match="block_02.safetensors.*corrupt"):
        pretrained.from_pretrained(tmp_path)
    state = checkpoint.block_state_path(tmp_path, 0)
    state.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="block_00.state.pt.*corrupt"):
        init_block_state(get_task(tiny_cfg.task), tiny_cfg, 0, torch.device("cpu"), tmp_path)


def test_mismatched_checkpoint_is_named(tiny_cfg, tmp_path):
    trained_run(tiny_cfg, tmp_path)
    wider = apply_overrides(tiny_cfg, ["model.hidden_size=64"])
    rundir.save_config(tmp_path, wider)
    # The metadata names the field; a block file without a config in its metadata is checked tensor by tensor.
    with pytest.raises(ConfigError, match=r"another model.hidden_size \(32, not 64\)"):
        pretrained.from_pretrained(tmp_path)
    block = get_task(wider.task).build_block(wider, 0)
    with pytest.raises(ConfigError, match="does not match the config: .* has shape"):
        checkpoint.load_block_weights(tmp_path, 0, block)


def test_not_a_run_directory(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        pretrained.from_pretrained(tmp_path / "nope")
    with pytest.raises(ConfigError, match="has no config.json"):
        pretrained.from_pretrained(tmp_path)


def test_new_run_dirs_are_numbered_and_never_reused(tmp_path):
    a = rundir.new_run_dir(tmp_path, "x")
    (a / "keep").write_text("mine")
    b = rundir.new_run_dir(tmp_path, "x")
    assert (a.name, b.name) == ("00000-x", "00001-x")
    assert (a / "keep").read_text() == "mine"


def test_block_file_carries_its_config(tiny_cfg, tmp_path):
    import json

    from safetensors import safe_open

    trained_run(tiny_cfg, tmp_path)
    with safe_open(str(checkpoint.block_weights_path(tmp_path, 0)), framework="pt") as f:
        meta = f.metadata()
    assert config_from_dict(json.loads(meta["config"])) == tiny_cfg and meta["block"] == "0"
