"""Every continuous task's inference through the router and the samplers: Heun and DPM-Solver++(2M) run the chains of
image generation, classification, the autoregressive LM and recurrent depth; on a one-step grid Heun is Euler."""

import math

import pytest
import torch

from diffusionblocks.blocks import BlockwiseDenoiser, BridgedDenoiser
from diffusionblocks.chain_likelihood import chain_likelihood
from diffusionblocks.config import ConfigError
from diffusionblocks.generate import generate
from diffusionblocks.models.arlm import ARDenoiser
from diffusionblocks.models.recurrent import RecurrentDenoiser
from diffusionblocks.noise import GRIDS, LogNormalSigma, sigma_grid
from diffusionblocks.sampling import SAMPLERS
from diffusionblocks.tasks import apply_overrides, default_config, get_task
from diffusionblocks.tasks.classification import chain_logits
from diffusionblocks.token_chain import chain_bits, generate_chain

OTHERS = [name for name in SAMPLERS if name != "euler"]


def _randomised(m: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight moved off its initialisation (adaLN-Zero's zeros would make each block the skip path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return m.eval()


class Counting(torch.nn.Module):
    """A block that records the sigma of each call (its `denoise`, with or without the cached clean stream)."""

    def __init__(self, block):
        super().__init__()
        self.block, self.calls = block, []

    def denoise(self, z, sigma, *args, **cond):
        self.calls.append(float(sigma.flatten()[0]))
        return self.block.denoise(z, sigma, *args, **cond)

    def clean_cache(self, tokens):
        return self.block.clean_cache(tokens)

    def denoise_cached(self, z, sigma, cache):
        self.calls.append(float(sigma.flatten()[0]))
        return self.block.denoise_cached(z, sigma, cache)

    @property
    def E(self):
        return self.block.E

    def estimate(self, *args):
        return self.block.estimate(*args)

    @property
    def label_embedding(self):
        return self.block.label_embedding


def test_the_names_of_samplers_and_grids_are_the_configs_choices():
    for task, field in (("generate", "sample.sampler"), ("classify", "sample.sampler"), ("arlm", "sample.sampler"),
                        ("recurrent", "sample.sampler")):
        for name in SAMPLERS:
            assert getattr(getattr(apply_overrides(default_config(task), [f"{field}={name}"]), field.split(".")[0]),
                           "sampler") == name
        with pytest.raises(ConfigError, match="'dpmpp_2m'"):
            apply_overrides(default_config(task), [f"{field}=rk4"])
    for name in GRIDS:
        assert apply_overrides(default_config(), [f"sample.grid={name}"]).sample.grid == name
    with pytest.raises(ValueError, match="karras"):
        sigma_grid(LogNormalSigma(), 3, "cosine")


def test_image_generation_with_heun_and_dpmpp(tiny_cfg):
    model = BlockwiseDenoiser([_randomised(get_task(tiny_cfg.task).build_block(tiny_cfg, b, torch.Generator().manual_seed(b)), b)
                               for b in range(3)], get_task(tiny_cfg.task).partition(tiny_cfg))
    m = tiny_cfg.model
    kw = dict(image_shape=(m.in_channels, m.image_size, m.image_size), num_classes=m.num_classes, guidance=2.0)
    labels = torch.arange(4)
    euler1 = generate(model, labels, steps=1, sampler="euler", **kw)
    assert torch.equal(generate(model, labels, steps=1, sampler="heun", **kw), euler1)
    euler = generate(model, labels, steps=6, sampler="euler", **kw)
    for name in OTHERS:
        x = generate(model, labels, steps=6, sampler=name, **kw)
        assert x.shape == euler.shape and torch.isfinite(x).all() and not torch.equal(x, euler)


@pytest.fixture
def classifier():
    cfg = apply_overrides(default_config(), ["task=classify", "model.arch=vit", "model.hidden_size=32",
                                             "model.num_heads=2", "model.depth=3", "blocks.num_blocks=3"])
    blocks = [Counting(_randomised(get_task(cfg.task).build_block(cfg, b, torch.Generator().manual_seed(b)), b)) for b in range(3)]
    return BlockwiseDenoiser(blocks, get_task(cfg.task).partition(cfg))


def test_classification_with_heun_and_dpmpp(classifier):
    images = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    one = chain_logits(classifier, images, 1, sampler="euler")
    assert all(torch.equal(a, b) for a, b in zip(chain_logits(classifier, images, 1, sampler="heun"), one))
    euler = chain_logits(classifier, images, 3)
    for name in OTHERS:
        for b in classifier.blocks:
            b.calls.clear()
        logits = chain_logits(classifier, images, 3, sampler=name)
        assert len(logits) == 3 and all(l.shape == (6, 10) and torch.isfinite(l).all() for l in logits)
        assert torch.equal(logits[0], euler[0])  # the first evaluation, at sigma_max, is the same in every sampler
        # Heun corrects at sigma_1 and sigma_2 with the blocks that own them: block 0 once, blocks 1 and 2 twice.
        assert [len(b.calls) for b in classifier.blocks] == ([1, 2, 2] if name == "heun" else [1, 1, 1])


def _text_chain(cfg, counting: bool = False) -> BlockwiseDenoiser:
    blocks = []
    for b in range(cfg.blocks.num_blocks):
        m = _randomised(ARDenoiser(11, hidden_size=16, depth=1, num_heads=2), b)
        with torch.no_grad():
            m.E.copy_(torch.nn.functional.normalize(torch.randn(11, 16, generator=torch.Generator().manual_seed(9)),
                                                    dim=-1))
        blocks.append(Counting(m) if counting else m)
    return BlockwiseDenoiser(blocks, get_task(cfg.task).partition(cfg))


@pytest.mark.parametrize("name", OTHERS)
@pytest.mark.parametrize("bridge", ["sample", "softmax"])
def test_language_model_chains_with_heun_and_dpmpp(name, bridge):
    """Generation (with and without the KV cache: the same tokens, the `sample` bridge's uniform per evaluation
    included), the teacher-forced chain's bits and the chain's own likelihood."""
    model = _text_chain(apply_overrides(default_config("arlm"), ["blocks.num_blocks=3", "model.depth=3"]))
    prompts = torch.randint(10, (3, 4), generator=torch.Generator().manual_seed(3))
    kw = dict(window=8, bridge=bridge, seeds=[5, 6, 7], temperature=0.8, top_p=0.9, num_tokens=10, sampler=name)
    fast = generate_chain(model, prompts, 10, steps=4, cache=True, **kw)
    assert fast.shape == (3, 14) and torch.equal(fast[:, :4], prompts) and int(fast.max()) < 10
    assert torch.equal(fast, generate_chain(model, prompts, 10, steps=4, cache=False, **kw))
    one = {s: generate_chain(model, prompts, 6, steps=1, **{**kw, "sampler": s}) for s in ("euler", "heun")}
    assert torch.equal(one["euler"], one["heun"])
    windows = torch.randint(11, (4, 12), generator=torch.Generator().manual_seed(4))
    rows = chain_bits(model, windows, bridge=bridge, steps=4, sampler=name, batch_size=2)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(math.isfinite(r[k]) for r in rows for k in ("chain_bits", "oracle_bits", "estimate_norm"))
    assert rows[0] == chain_bits(model, windows, bridge=bridge, steps=4, batch_size=2)[0]  # sigma_max's step: the same
    assert math.isfinite(chain_likelihood(model, windows, bridge=bridge, steps=4, draws=2, sampler=name)["bits"])


def test_language_model_teacher_forced_chain_runs_each_evaluation_on_its_owner():
    model = _text_chain(apply_overrides(default_config("arlm"), ["blocks.num_blocks=3", "model.depth=3"]), True)
    windows = torch.randint(11, (2, 12), generator=torch.Generator().manual_seed(4))
    sigmas = sigma_grid(model.partition.axis, 3)
    chain_bits(model, windows, bridge="softmax", steps=3, sampler="heun")
    # Chain: sigma_0, (sigma_1), sigma_1, (sigma_2), sigma_2; each step's oracle at its own sigma.
    assert [len(b.calls) for b in model.blocks] == [2, 3, 3]
    assert sorted(model.blocks[1].calls) == pytest.approx([float(sigmas[1])] * 3)


def test_recurrent_depth_with_heun_runs_the_core_per_evaluation():
    cfg = apply_overrides(default_config("arlm"), ["blocks.num_blocks=1", "model.depth=1"])
    m = _randomised(RecurrentDenoiser(11, hidden_size=16, num_heads=2, prelude=1, core=2, coda=1), 0)
    model = BlockwiseDenoiser([m], get_task(cfg.task).partition(cfg))
    calls = []
    hook = m.core[0].register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[1]))
    prompts = torch.randint(11, (2, 4), generator=torch.Generator().manual_seed(5))
    for K in (1, 3):
        calls.clear()
        out = generate_chain(model, prompts, 5, window=32, steps=K, seeds=[0, 1], sampler="heun")
        assert out.shape == (2, 9) and len(calls) == 5 * (2 * K - 1)  # Heun: 2K - 1 evaluations per token
        assert torch.equal(out, generate_chain(model, prompts, 5, window=32, steps=K, seeds=[0, 1], sampler="heun",
                                               cache=False))
    hook.remove()
    bits = chain_likelihood(model, torch.randint(11, (2, 8), generator=torch.Generator().manual_seed(6)), steps=3,
                            draws=2, sampler="heun")["bits"]
    assert math.isfinite(bits)


def test_bridged_denoiser_merges_the_logits_of_blocks_called_at_different_sigmas(classifier):
    chain = BridgedDenoiser(classifier, lambda block, D, logits: D)
    z, images = torch.randn(4, 32), torch.randn(4, 1, 8, 8)
    sigma = torch.tensor([50.0, 0.01, 0.3, 2.0])
    D = chain(z, sigma, images=images)
    for i in range(4):
        D_i, logits_i = classifier.route(lambda block, *a, **c: block.denoise(*a, **c), z[i:i + 1], sigma[i:i + 1],
                                         images=images[i:i + 1])
        assert torch.allclose(D[i], D_i[0], atol=1e-6) and torch.allclose(chain.logits[i], logits_i[0], atol=1e-5)
