"""Classification by label denoising: the ViT block, routing, label-embedding modes, training, save/load."""

import pytest
import torch
from conftest import assert_schedules_agree

from diffusionblocks import checkpoint, pretrained, rundir
from diffusionblocks.cli import main
from diffusionblocks.config import ConfigError
from diffusionblocks.data import DataConfig, load_image_data
from diffusionblocks.precond import get_scalings
from diffusionblocks.tasks import apply_overrides, default_config, get_task, read_config
from diffusionblocks.tasks.classification import chain_logits, evaluate_classifier
from diffusionblocks.train import train

TINY = ["task=classify", "model.arch=vit", "model.hidden_size=32", "model.num_heads=2", "model.depth=3",
        "blocks.num_blocks=3", "train.batch_size=32", "train.steps_per_block=6", "train.log_every=3",
        "train.checkpoint_every=3", "train.lr_warmup_steps=2"]


@pytest.fixture
def cfg():
    return apply_overrides(default_config(), TINY)


@pytest.fixture(scope="module")
def digits():
    return load_image_data(DataConfig())


def test_vit_block_at_init_is_the_skip_path_through_the_head(cfg):
    """adaLN-Zero: at init every layer is the identity, so the CLS output is c_in z itself and
    D = c_skip z + c_out LN(c_in z); the logits are that D through the final adaLN and the zero head."""
    block = get_task(cfg.task).build_block(cfg, 1, torch.Generator().manual_seed(0))
    z = torch.randn(4, 32)
    sigma = torch.tensor([0.01, 0.2, 1.0, 20.0])
    images = torch.randn(4, 1, 8, 8)
    c_skip, c_out, c_in, c_noise = (c[:, None] for c in get_scalings(sigma, 0.5))
    expected_D = c_skip * z + c_out * torch.nn.functional.layer_norm(c_in * z, (32,), eps=1e-6)
    D, logits = block.denoise(z, sigma, images)
    assert torch.allclose(D, expected_D, atol=1e-6)
    assert torch.equal(logits, torch.zeros(4, 10))  # zero-initialised head
    # The image does not reach D at init: every path from it crosses a zero gate.
    assert torch.allclose(block.denoise(z, sigma, torch.randn(4, 1, 8, 8))[0], D, atol=1e-6)
    with torch.no_grad():
        block.head.weight.normal_(generator=torch.Generator().manual_seed(1))
    _, logits = block.denoise(z, sigma, images)
    c = block.t_embedder(c_noise.flatten())
    shift, scale = block.adaLN_final(c).chunk(2, dim=1)
    assert torch.equal(shift, torch.zeros_like(shift)) and torch.equal(scale, torch.zeros_like(scale))
    assert torch.allclose(logits, block.head(block.norm_final(expected_D)), atol=1e-5)


def test_label_table_is_normalised_and_shared_by_fixed_blocks(cfg):
    E = [get_task(cfg.task).build_block(cfg, b, torch.Generator().manual_seed(b)).E for b in range(3)]
    assert torch.equal(E[0], E[1]) and torch.equal(E[1], E[2])
    # Orthonormal rows (K=10 <= D=32).
    assert torch.allclose(E[0] @ E[0].T, torch.eye(10), atol=1e-5)


class Counting(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block, self.calls = block, []

    def denoise(self, z, sigma, images):
        self.calls.append(float(sigma[0]))
        return self.block.denoise(z, sigma, images)

    @property
    def E(self):
        return self.block.E

    @property
    def label_embedding(self):
        return self.block.label_embedding


def test_inference_runs_each_block_once_highest_noise_first(cfg):
    from diffusionblocks.blocks import BlockwiseDenoiser

    blocks = [Counting(get_task(cfg.task).build_block(cfg, b, torch.Generator().manual_seed(b))) for b in range(3)]
    model = BlockwiseDenoiser(blocks, get_task(cfg.task).partition(cfg))
    logits = chain_logits(model, torch.randn(5, 1, 8, 8))
    assert len(logits) == 3 and logits[-1].shape == (5, 10)
    assert [len(b.calls) for b in blocks] == [1, 1, 1]
    assert blocks[0].calls[0] == 80 and blocks[2].calls[0] == pytest.approx(0.002)


def test_more_steps_than_blocks_on_the_block_grid_run_each_block_at_its_own_levels(cfg):
    """6 steps on the per-block grid: each block twice, inside its own range, the last step above sigma_min."""
    from diffusionblocks.blocks import BlockwiseDenoiser

    blocks = [Counting(get_task(cfg.task).build_block(cfg, b, torch.Generator().manual_seed(b))) for b in range(3)]
    model = BlockwiseDenoiser(blocks, get_task(cfg.task).partition(cfg))
    logits = chain_logits(model, torch.randn(5, 1, 8, 8), 6, "blocks")
    assert len(logits) == 6 and [len(b.calls) for b in blocks] == [2, 2, 2]
    for b, block in enumerate(blocks):
        lo, hi = model.partition.block_range(b)
        assert all(lo < s <= hi for s in block.calls) and len(set(block.calls)) == 2
    assert blocks[0].calls[0] == 80 and min(blocks[2].calls) > 0.002


def test_sequential_and_interleaved_give_identical_blocks(cfg, digits):
    assert_schedules_agree(cfg, digits.train)


def test_learned_first_freezes_block_zeros_table_for_the_others(cfg, digits, tmp_path):
    c = apply_overrides(cfg, ["classify.label_embedding=learned_first"])
    rundir.save_config(tmp_path, c)
    train(get_task(c.task), c, digits.train, tmp_path, progress=False)
    E = [checkpoint.load_block_tensor(tmp_path, b, "label_embedding") for b in range(3)]
    initial = get_task(c.task).build_block(c, 0).label_embedding
    assert not torch.equal(E[0], initial)  # learned by block 0
    assert torch.equal(E[0], E[1]) and torch.equal(E[0], E[2])  # then frozen for blocks 1 and 2
    assert isinstance(get_task(c.task).build_block(c, 1).label_embedding, torch.Tensor) and \
        not isinstance(get_task(c.task).build_block(c, 1).label_embedding, torch.nn.Parameter)
    with pytest.raises(ConfigError, match="must be trained to the end before block 1"):
        train(get_task(c.task), c, digits.train, None, blocks=[1], progress=False)


def test_learned_joint_shares_one_table(cfg, digits, tmp_path):
    c = apply_overrides(cfg, ["classify.label_embedding=learned_joint", "train.schedule=interleaved"])
    rundir.save_config(tmp_path, c)
    states = train(get_task(c.task), c, digits.train, tmp_path, progress=False)
    assert states[0].denoiser.label_embedding is states[2].denoiser.label_embedding
    E = [checkpoint.load_block_tensor(tmp_path, b, "label_embedding") for b in range(3)]
    assert torch.equal(E[0], E[1]) and torch.equal(E[1], E[2])
    assert not torch.equal(E[0], get_task(c.task).build_block(c, 0).label_embedding)
    with pytest.raises(ConfigError, match="needs train.schedule='interleaved'"):
        apply_overrides(cfg, ["classify.label_embedding=learned_joint"])


def test_save_load_exact_and_short_training_beats_chance(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--task", "classify", "--out", str(run), "--no-progress", "model.hidden_size=64",
                 "model.num_heads=2", "train.steps_per_block=300", "train.batch_size=64", "train.lr=3e-3"]) == 0
    r = evaluate_classifier(run)
    assert r["top1"] > 0.3  # chance is 0.1 (measured: 0.58)
    assert [b["block"] for b in r["per_block"]] == [0, 1, 2]
    assert [b["block"] for b in r["decision"]["chain"]] == [0, 1, 2]
    assert sum(b["share"] for b in r["decision"]["chain"]) == pytest.approx(1)
    model, cfg = pretrained.from_pretrained(run)
    again, _ = pretrained.from_pretrained(run)
    x = load_image_data(cfg.data).test.images[:16]
    assert all(torch.equal(a, b) for a, b in zip(chain_logits(model, x), chain_logits(again, x)))
    assert main(["sample", str(run), "--out", str(tmp_path / "x.png")]) == 2
    assert "nothing to sample" in capsys.readouterr().err


def test_plain_classifier_baseline(tmp_path):
    run = tmp_path / "plain"
    assert main(["train", "--task", "classify", "--out", str(run), "--no-progress", *TINY[2:], "blocks.num_blocks=1",
                 "model.mode=plain"]) == 0
    r = evaluate_classifier(run)
    assert r["mode"] == "plain" and 0 <= r["top1"] <= 1 and "per_block" not in r
    with pytest.raises(ConfigError, match="needs blocks.num_blocks=1"):
        apply_overrides(default_config(), ["task=classify", "model.arch=vit", "model.mode=plain"])


def test_compare_classifiers_writes_the_report(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--out", str(out), "--num-blocks", "3", "--no-progress", *TINY]) == 0
    md = (out / "report.md").read_text()
    assert "| 1 | 3 |" in md and "| 3 | 1/1/1 |" in md and "## Chain diagnostics" in md
    assert (out / "metrics_vs_B.png").is_file()
    import json

    runs = json.loads((out / "report.json").read_text())["runs"]
    assert runs["1"]["mode"] == "plain" and runs["3"]["mode"] == "diffusion"


def test_compare_from_a_plain_classifier_config(tmp_path):
    """A config of the plain baseline compares it with label-denoising blocks (comparison_config)."""
    import json

    out = tmp_path / "cmp"
    assert main(["compare", "--out", str(out), "--num-blocks", "3", "--no-progress", *TINY, "blocks.num_blocks=1",
                 "model.mode=plain", "train.steps_per_block=3"]) == 0
    runs = json.loads((out / "report.json").read_text())["runs"]
    assert runs["1"]["mode"] == "plain" and runs["3"]["mode"] == "diffusion"


def test_inference_steps_may_change_on_resume_but_the_model_may_not(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--no-progress", *TINY, "train.steps_per_block=2"]) == 0
    assert main(["train", "--resume", str(run), "--no-progress", "sample.steps=6"]) == 0
    assert read_config(run).sample.steps == 6
    assert main(["train", "--resume", str(run), "classify.label_embedding=learned_first"]) == 2
    assert "would change what the run" in capsys.readouterr().err


class BayesLabel(torch.nn.Module):
    """The exact posterior of the label given z = e_y + sigma eps under a prior p the image does not change: logits
    log p_k + z . e_k / sigma^2 (rows of E orthonormal), and D = softmax(logits) @ E."""

    def __init__(self, p: torch.Tensor, D: int):
        super().__init__()
        self.log_p = p.log()
        self.label_embedding = torch.linalg.qr(torch.randn(D, len(p), generator=torch.Generator().manual_seed(0)))[0].T

    @property
    def E(self):
        return self.label_embedding

    def denoise(self, z, sigma, images):
        logits = self.log_p + z @ self.E.T / sigma[:, None] ** 2
        return logits.softmax(-1) @ self.E, logits


def test_the_chain_from_the_mean_finds_the_posteriors_mode_and_from_noise_draws_from_it(cfg):
    """Exact posterior blocks, a posterior p = (0.7, 0.2, 0.1) whatever the image, class 0 true: from noise the chain
    (router, sampler steps, bridge) is a sampler of p, each class as often as p says within 5 binomial SDs once its
    steps are fine enough (with 3 Euler steps it is right 90% of the time, neither p nor its mode); from z = 0 it
    follows the blend of the classes toward the most probable and is always right, whatever the seed."""
    from diffusionblocks.blocks import BlockwiseDenoiser

    p = torch.tensor([0.7, 0.2, 0.1])
    model = BlockwiseDenoiser([BayesLabel(p, 8) for _ in range(3)], get_task(cfg.task).partition(cfg))
    images = torch.zeros(4000, 1, 8, 8)
    for steps, grid, sampler in [(48, "karras", "heun"), (192, "quantile", "euler")]:
        drawn = chain_logits(model, images, steps, grid, sampler=sampler, start="noise")[-1].argmax(1)
        freq = torch.bincount(drawn, minlength=3).double() / len(images)
        assert freq.tolist() == pytest.approx(p.tolist(), abs=5 * (0.25 / len(images)) ** 0.5)
    for steps, grid, sampler in [(3, "quantile", "euler"), (6, "blocks", "euler"), (48, "karras", "heun")]:
        mode = chain_logits(model, images, steps, grid, sampler=sampler, start="mean")
        assert bool((mode[-1].argmax(1) == 0).all())
        assert torch.equal(mode[-1], chain_logits(model, images, steps, grid, sampler=sampler, start="mean",
                                                  seed=1)[-1])


def test_the_evaluation_records_its_start_and_a_bad_start_is_refused(tmp_path, cfg, one_thread):
    run = tmp_path / "vit"
    assert main(["train", "--out", str(run), "--no-progress", *TINY]) == 0
    assert read_config(run).sample.start == "mean"
    assert evaluate_classifier(run)["start"] == "mean"
    assert evaluate_classifier(run, start="noise")["start"] == "noise"
    with pytest.raises(ConfigError, match="sample.start"):
        apply_overrides(cfg, ["sample.start=zero"])
