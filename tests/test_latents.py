"""Latent diffusion: a tiny random AutoencoderKL (saved with save_pretrained, nothing downloaded), its cached latents,
blocks trained on digits latents, decoded samples and evaluation, resume, and the bad-input messages."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import TINY
from diffusers import AutoencoderKL, UNet2DModel
from safetensors.torch import load_file, save_file

from diffusionblocks.compose import compose_run
from diffusionblocks.config import ConfigError
from diffusionblocks.data import DataConfig, load_image_data
from diffusionblocks.latents import RUN_FILE, LatentDataConfig, encode_splits, load_vae
from diffusionblocks.rundir import block_weights_path
from diffusionblocks.runs import evaluate_run, sample_run, train_run
from diffusionblocks.tasks import apply_overrides, default_config

os.environ["HF_HUB_OFFLINE"] = "1"


def save_tiny_vae(path, seed=0, latent_channels=4, scaling=0.7, shift=0.1):
    """A random 1-channel AutoencoderKL of two down blocks (8x8 -> 4x4), saved into path."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=latent_channels,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=8,
                            scaling_factor=scaling, shift_factor=shift)
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    return save_tiny_vae(root / "a"), save_tiny_vae(root / "b", seed=1)


@pytest.fixture(scope="module")
def digits():
    return load_image_data(DataConfig())


def latent_overrides(vae, cache):
    return [*TINY, f"data.vae={vae}", f"data.latent_cache={cache}", "model.in_channels=4", "model.image_size=4",
            "model.patch_size=1", "noise.sigma_data=1.0"]


def test_encode_and_decode_apply_the_vaes_scaling_and_shift(vaes, digits, one_thread):
    space = load_vae(str(vaes[0]))
    assert (space.latent_channels, space.downsample, space.scaling_factor, space.shift_factor) == (4, 2, 0.7, 0.1)
    x = digits.test.images[:5]
    z = space.encode(x)
    assert z.shape == (5, 4, 4, 4)
    with torch.no_grad():
        mu = space.vae.encode(x).latent_dist.mean
        torch.testing.assert_close(z, (mu - 0.1) * 0.7)
        torch.testing.assert_close(space.decode(z), space.vae.decode(mu).sample, atol=1e-5, rtol=1e-5)
    assert space.decode(z).shape == x.shape
    space.batch_size = 2  # the batches do not change the latents
    torch.testing.assert_close(space.encode(x), z, atol=1e-6, rtol=0)


def test_the_cache_is_reused_and_keyed_by_the_vae_and_the_latent(vaes, digits, tmp_path, one_thread):
    cfg = LatentDataConfig(vae=str(vaes[0]), latent_cache=str(tmp_path))
    first, where = encode_splits(load_vae(cfg.vae), cfg, digits)
    again, where_again = encode_splits(load_vae(cfg.vae), cfg, digits)
    assert (where["cached"], where_again["cached"], where["path"]) == (False, True, where_again["path"])
    assert torch.equal(first.train.images, again.train.images) and torch.equal(first.test.labels, digits.test.labels)
    other, where_other = encode_splits(load_vae(str(vaes[1])), LatentDataConfig(vae=str(vaes[1]),
                                                                               latent_cache=str(tmp_path)), digits)
    assert not where_other["cached"] and where_other["path"] != where["path"]
    assert not torch.allclose(other.train.images, first.train.images)
    sampled = LatentDataConfig(vae=str(vaes[0]), latent_cache=str(tmp_path), vae_latent="sample")
    s1, w1 = encode_splits(load_vae(cfg.vae), sampled, digits)
    os.remove(w1["path"])
    s2, w2 = encode_splits(load_vae(cfg.vae), sampled, digits)  # encoded again: the same seeded draw
    assert not w2["cached"] and torch.equal(s1.train.images, s2.train.images)
    assert not torch.allclose(s1.train.images, first.train.images)


def test_a_file_of_the_users_in_the_cache_place_is_never_overwritten(vaes, digits, tmp_path, one_thread):
    cfg = LatentDataConfig(vae=str(vaes[0]), latent_cache=str(tmp_path))
    _, where = encode_splits(load_vae(cfg.vae), cfg, digits)
    save_file({"x": torch.zeros(1)}, where["path"], metadata={"format": "mine"})
    with pytest.raises(ConfigError, match="not a latents cache"):
        encode_splits(load_vae(cfg.vae), cfg, digits)


def test_bad_vae_directories_and_shapes_get_one_message(vaes, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        load_vae(str(tmp_path / "empty"))
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), norm_num_groups=4,
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).save_pretrained(tmp_path / "u")
    with pytest.raises(ConfigError, match="holds a UNet2DModel .* not an AutoencoderKL"):
        load_vae(str(tmp_path / "u"))
    base = latent_overrides(vaes[0], tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"has 4 latent channels but model.in_channels=1"):
        train_run(out=tmp_path / "r", overrides=[*base, "model.in_channels=1"], progress=False)
    with pytest.raises(ConfigError, match=r"makes 4x4 latents .* but model.image_size=8"):
        train_run(out=tmp_path / "r", overrides=[*base, "model.image_size=8", "model.patch_size=2"], progress=False)
    with pytest.raises(ConfigError, match="data.hflip"):
        apply_overrides(default_config(), [*base, "data.hflip=true"])
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_train_sample_evaluate_and_resume_on_digits_latents(vaes, tmp_path, one_thread):
    base = latent_overrides(vaes[0], tmp_path / "cache")
    whole = train_run(out=tmp_path / "whole", overrides=base, progress=False)
    assert json.loads((whole / RUN_FILE).read_text())["vae"] == str(vaes[0])
    assert (whole / "samples.png").is_file()
    # Stopped after 3 steps, resumed to 6: the same blocks, bit for bit (the cached latents are read again).
    part = train_run(out=tmp_path / "part", overrides=[*base, "train.steps_per_block=3"], progress=False)
    train_run(resume=part, overrides=["train.steps_per_block=6"], progress=False)
    for b in range(3):
        a, c = (load_file(block_weights_path(r, b)) for r in (whole, part))
        assert all(torch.equal(a[k], c[k]) for k in a)
    png = sample_run(whole, out=str(tmp_path / "s.png"), num=10, steps=4)
    npz = sample_run(whole, out=str(tmp_path / "s.npz"), num=10, steps=4)
    assert png.is_file()
    images = np.load(npz)["images"]
    assert images.shape == (10, 1, 8, 8) and images.min() >= -1 and images.max() <= 1  # decoded pixels
    r = evaluate_run(whole, num=20, steps=4, progress=False).result
    assert 0 <= r["conditional_accuracy"] <= 1 and r["fd"] > 0 and r["fd_vae_floor"] > 0
    assert r["chain"]["per_block"] and r["vae"] == str(vaes[0])
    # Fine-tuning with another VAE is refused: the blocks were trained in the first one's latents.
    with pytest.raises(ConfigError, match="is not the VAE the blocks"):
        train_run(from_=whole, blocks=[1], out=tmp_path / "other", overrides=[f"data.vae={vaes[1]}"], progress=False)
    # A composed run carries its sources' VAE record; blocks of runs in different latent spaces do not chain.
    compose_run({0: whole, 1: part, 2: whole}, tmp_path / "composed")
    assert (tmp_path / "composed" / RUN_FILE).read_bytes() == (whole / RUN_FILE).read_bytes()
    assert sample_run(tmp_path / "composed", out=str(tmp_path / "c.png"), num=10, steps=4).is_file()
    other = train_run(out=tmp_path / "b", overrides=[*latent_overrides(vaes[1], tmp_path / "cache"),
                                                     "sample.samples_per_class=1"], progress=False)
    with pytest.raises(ConfigError, match="latents of another VAE"):
        compose_run({0: whole, 1: other, 2: whole}, tmp_path / "mixed")
