"""diffusers' DiTTransformer2DModel as the layers of a block (model.arch="diffusers-dit"): the raw output against
diffusers' own forward for the same weights, import of a saved model as an end-to-end run and its conversion into
blocks that own their copies, training, sampling and resuming, and the refusals. Tiny random models; nothing
downloads."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

from diffusionblocks import checkpoint
from diffusionblocks.cli import main
from diffusionblocks.config import ConfigError
from diffusionblocks.convert import convert_run, import_run
from diffusionblocks.models.diffusers_dit import DiffusersDiT, diffusers_timestep
from diffusionblocks.pretrained import from_pretrained
from diffusionblocks.tasks import apply_overrides, config_from_dict, default_config, get_task, read_config

os.environ["HF_HUB_OFFLINE"] = "1"
diffusers = pytest.importorskip("diffusers")

L = 3
TINY_DIFFUSERS = {"num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 1, "num_layers": L,
                  "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 10}
ARCH = ["model.arch=diffusers-dit", "model.hidden_size=32", "model.num_heads=2", f"model.depth={L}"]


def tiny_args(**overrides) -> list[str]:
    d = {**TINY_DIFFUSERS, **overrides}
    return [*TINY, *ARCH, f"model.diffusers={json.dumps(d)}"]


def saved_model(path, **overrides):
    """A random DiTTransformer2DModel (diffusers' own initialisation: nothing is zero) saved by save_pretrained."""
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(**{**TINY_DIFFUSERS, **overrides})
    model.save_pretrained(path)
    return model.eval()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddit") / "model"
    return path, saved_model(path)


@pytest.fixture(scope="module")
def imported(pretrained, tmp_path_factory):
    """The saved model imported as an end-to-end run (B=1)."""
    path, _ = pretrained
    run = tmp_path_factory.mktemp("ddit") / "e2e"
    cfg = apply_overrides(default_config(), [*TINY, "model.arch=diffusers-dit", f"model.pretrained={path}",
                                             "blocks.num_blocks=1"])
    import_run(cfg, run)
    return run


def weights(run, b):
    return load_file(str(checkpoint.block_weights_path(run, b)))


def sample(run, path):
    assert main(["sample", str(run), "--num", "10", "--seed", "3", "--out", str(path), "--no-progress"]) == 0
    return np.load(path)["images"]


def inputs(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    sigma = torch.exp(torch.randn(n, generator=g) * 1.5)
    labels = torch.tensor([0, 3, 9, 10, 4])[:n]  # 10: the null class
    return x, torch.log(sigma) / 4, labels


def test_the_config_is_read_from_the_directory_and_our_fields_are_derived(pretrained):
    path, _ = pretrained
    cfg = config_from_dict({"task": "generate", "model": {"arch": "diffusers-dit", "pretrained": str(path)}})
    m = cfg.model
    assert (m.image_size, m.in_channels, m.patch_size, m.hidden_size, m.depth, m.num_heads, m.num_classes) == \
        (8, 1, 2, 32, L, 2, 10)
    assert m.diffusers["_class_name"] == "DiTTransformer2DModel" and m.diffusers["num_layers"] == L


@pytest.mark.parametrize("out_channels", [None, 2])
def test_raw_output_is_diffusers_forward_for_the_same_weights(tmp_path, out_channels):
    model = saved_model(tmp_path / "m", out_channels=out_channels)
    cfg = config_from_dict({"task": "generate", "model": {"arch": "diffusers-dit", "pretrained": str(tmp_path / "m")},
                            "blocks": {"num_blocks": 1}})
    net = get_task("generate").build_block(cfg, 0, torch.Generator().manual_seed(0)).inner_model.eval()
    x, c_noise, labels = inputs()
    with torch.no_grad():
        ours = net(x, c_noise, class_labels=labels)
        theirs = model(x, timestep=diffusers_timestep(c_noise), class_labels=labels).sample
    assert ours.shape == x.shape and theirs.shape[1] == (out_channels or 1)
    assert (ours - theirs[:, :1]).abs().max() <= 1e-6


@pytest.fixture(scope="module")
def imported_vp(pretrained, tmp_path_factory):
    """The saved model imported as an end-to-end run in DDPM's own parameterization (vp-eps)."""
    path, _ = pretrained
    run = tmp_path_factory.mktemp("ddit") / "e2e-vp"
    cfg = apply_overrides(default_config(), [*TINY, "model.arch=diffusers-dit", f"model.pretrained={path}",
                                             "blocks.num_blocks=1", "noise.parameterization=vp-eps"])
    import_run(cfg, run)
    return run


def test_vp_eps_import_predicts_diffusers_epsilon(imported_vp, pretrained):
    _, model = pretrained
    block = from_pretrained(imported_vp)[0].blocks[0]
    x, _, labels = inputs()
    t = torch.tensor([0.0, 10.0, 250.0, 640.0, 999.0])
    sigma = block.schedule.sigma(t).float()
    with torch.no_grad():
        ours = block.epsilon(x, sigma, class_labels=labels)
        theirs = model(x, timestep=t, class_labels=labels).sample
    assert (ours - theirs).abs().max() <= 1e-6


def test_vp_eps_copy_conversion_samples_exactly_what_the_import_samples(imported_vp, tmp_path):
    out = tmp_path / "copy"
    convert_run(imported_vp, 3, "copy", out)
    assert np.array_equal(sample(out, tmp_path / "c.npz"), sample(imported_vp, tmp_path / "s.npz"))


def test_timesteps_span_diffusers_range_and_grow_with_sigma():
    sigma = torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0])
    t = diffusers_timestep(torch.log(sigma) / 4)
    assert torch.all(t[1:] > t[:-1]) and 0 <= t[0] < 1 and 900 < t[-1] < 999


def test_a_block_without_layer_0_conditions_its_head_on_its_own_copy():
    net = DiffusersDiT(TINY_DIFFUSERS, 1, has_first_layer=False)
    keys = net.state_dict().keys()
    assert any(k.startswith("head_emb.") for k in keys)
    assert not any(k.startswith("head_emb.") for k in DiffusersDiT(TINY_DIFFUSERS, 1).state_dict())
    assert all(e.class_embedder.embedding_table.num_embeddings == 11 for e in net.embeddings())  # 10 + null


def test_the_import_is_a_trained_end_to_end_run_of_the_saved_model(imported, pretrained, capsys):
    _, model = pretrained
    theirs = {f"inner_model.{k}": v for k, v in model.state_dict().items()}
    ours = weights(imported, 0)
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert main(["status", str(imported)]) == 0
    assert "1/1 trained" in capsys.readouterr().out


def test_depth_blocks_hold_exactly_the_source_layer_tensors(imported, tmp_path):
    out = tmp_path / "depth"
    cfg = convert_run(imported, 3, "depth", out)
    assert cfg.layer_split() == (1, 1, 1)
    theirs = weights(imported, 0)
    layer = "inner_model.transformer_blocks."
    emb = f"{layer}0.norm1.emb."
    emb0 = {k[len(emb):]: v for k, v in theirs.items() if k.startswith(emb)}
    used = set()
    for b in range(3):
        ours = weights(out, b)
        for k, v in ours.items():
            if k.startswith(layer):
                i, rest = k[len(layer):].split(".", 1)
                assert i == "0" and torch.equal(v, theirs[f"{layer}{b}.{rest}"])
                used.add(f"{layer}{b}.{rest}")
            elif k.startswith("inner_model.head_emb."):
                assert b > 0 and torch.equal(v, emb0[k[len("inner_model.head_emb."):]])
            else:
                assert torch.equal(v, theirs[k])  # patch embedding and head: copies
        assert any(k.startswith("inner_model.head_emb.") for k in ours) == (b > 0)
    assert used == {k for k in theirs if k.startswith(layer)}  # every layer tensor in exactly one block
    # A B=3 run built afresh from the directory starts from the same weights as the conversion.
    fresh = apply_overrides(read_config(imported), ["blocks.num_blocks=3"])
    for b in range(3):
        built = get_task("generate").build_block(fresh, b, torch.Generator().manual_seed(b)).state_dict()
        assert sorted(built) == sorted(weights(out, b))
        assert all(torch.equal(built[k], weights(out, b)[k]) for k in built)


def test_a_copy_conversion_samples_exactly_what_the_import_samples(imported, tmp_path):
    out = tmp_path / "copy"
    cfg = convert_run(imported, 2, "copy", out)
    assert cfg.model.depth == 2 * L and cfg.layer_split() == (L, L)

    assert np.array_equal(sample(out, tmp_path / "c.npz"), sample(imported, tmp_path / "s.npz"))


def test_train_sample_and_resume(tmp_path, one_thread):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", "--out", str(straight), "--no-progress", *tiny_args()]) == 0
    assert main(["train", "--out", str(resumed), "--no-progress", *tiny_args(), "train.steps_per_block=3"]) == 0
    assert main(["train", "--resume", str(resumed), "--no-progress", "train.steps_per_block=6"]) == 0
    for b in range(3):
        a, c = weights(straight, b), weights(resumed, b)
        assert sorted(a) == sorted(c) and all(torch.equal(a[k], c[k]) for k in a)
    assert (straight / "samples.png").is_file()
    assert main(["sample", str(straight), "--num", "10", "--class", "7", "--out", str(tmp_path / "s.npz"),
                 "--no-progress"]) == 0
    images = np.load(tmp_path / "s.npz")["images"]
    assert images.shape == (10, 1, 8, 8) and np.isfinite(images).all()


def test_blocks_train_from_the_pretrained_weights(pretrained, tmp_path, one_thread):
    path, _ = pretrained
    run = tmp_path / "ft"
    assert main(["train", "--out", str(run), "--no-progress", *TINY, "model.arch=diffusers-dit",
                 f"model.pretrained={path}", "blocks.num_blocks=1", "train.steps_per_block=2"]) == 0
    assert np.isfinite(json.loads((run / "train_summary.json").read_text())["blocks"][0]["steps_per_s"])


def refusal(args) -> str:
    with pytest.raises(ConfigError) as e:
        apply_overrides(default_config(), [*TINY, *args])
    return str(e.value)


def test_refusals(tmp_path, pretrained):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no config.json" in refusal(["model.arch=diffusers-dit", f"model.pretrained={empty}"])
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 8}))
    assert "is a 'UNet2DModel'" in refusal(["model.arch=diffusers-dit", f"model.pretrained={unet}"])
    assert "is a 'PixArtTransformer2DModel'" in refusal(
        tiny_args(_class_name="PixArtTransformer2DModel"))
    assert refusal([*tiny_args(), "model.depth=4"]).startswith(
        "model.depth=4 but model.diffusers gives 3 (num_layers)")
    assert refusal([*tiny_args(), "model.depth=6"]).startswith(
        "model.depth=6 is not the diffusers model's num_layers=3")
    assert refusal([*tiny_args(), "model.hidden_size=64"]).startswith(
        "model.hidden_size=64 but model.diffusers gives 32")
    assert "unknown key 'nope'" in refusal(tiny_args(nope=1))
    assert "dropout=0.1 must be 0" in refusal(tiny_args(dropout=0.1))
    assert "out_channels=3" in refusal(tiny_args(out_channels=3))
    assert "needs the model's config" in refusal(["model.arch=diffusers-dit"])
    assert "model.pretrained is for model.arch='diffusers-dit'" in refusal([f"model.pretrained={empty}"])
    cfg = apply_overrides(default_config(), tiny_args())
    with pytest.raises(ConfigError, match="import needs a pretrained model with weights"):
        import_run(apply_overrides(cfg, ["blocks.num_blocks=1"]), tmp_path / "x")
    path, _ = pretrained
    with pytest.raises(ConfigError, match="blocks.num_blocks must be 1"):
        import_run(apply_overrides(cfg, [f"model.pretrained={path}"]), tmp_path / "x")
    assert not (tmp_path / "x").exists()
