"""The language trunk's fast paths (modulation at the granularity of its condition, rotary tables once per
forward and applied to adjacent pairs, the causal flag of attention, the written-out RMSNorm gradients) against a
straightforward per-token computation with the same weights."""

import pytest
import torch
import torch.nn.functional as F

from diffusionblocks.config import ConfigError
from diffusionblocks.models.arlm import (ARDenoiser, CausalLM, KVCache, LlamaLayer, RotaryAttention, paired_rows,
                                         rotary, rotate_pairs, swiglu_width, training_mask)
from diffusionblocks.models.layers import modulated_rms_norm, rms_norm
from diffusionblocks.models.recurrent import HuginnLM, RecurrentDenoiser
from diffusionblocks.precond import get_scalings
from diffusionblocks.tasks import config_from_dict, default_config, get_task

TOL = 1e-4  # max |delta logit| in fp32 (issue 26)


def _rope_cat(x, pos):
    """The rotary embedding as first written: angles per call, halves concatenated."""
    d = x.shape[-1]
    freqs = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = pos.to(torch.float32)[:, None] * freqs
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def _layer_ref(layer: LlamaLayer, x, c, pos, mask):
    """One layer with its modulation computed for every token: c (N, T, D), mask (T, T) boolean."""
    N, T, D = x.shape
    H = layer.attn.num_heads
    shift1, scale1, gate1, shift2, scale2, gate2 = layer.adaLN_modulation(c).chunk(6, dim=-1)
    h = layer.norm1(x) * (1 + scale1) + shift1
    q, k, v = layer.attn.qkv(h).view(N, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(_rope_cat(q, pos), _rope_cat(k, pos), v, attn_mask=mask)
    x = x + gate1 * layer.attn.proj(out.transpose(1, 2).reshape(N, T, D))
    return x + gate2 * layer.mlp(layer.norm2(x) * (1 + scale2) + shift2)


def _randomise(m, seed):
    """Every weight random: adaLN-Zero's zeros would make the modulation trivially equal."""
    g = torch.Generator().manual_seed(seed)
    m.initialize_weights(g)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m.eval()


def rope(x, pos):
    """The half-split rotation our weights define, computed as the layers do: pairs (j, j + d/2) laid side by side,
    rotated by one complex product, put back."""
    d = x.shape[-1]
    order = torch.arange(d).view(2, d // 2).T.flatten()  # half-split -> adjacent pairs
    return rotate_pairs(x[..., order], rotary(pos, d))[..., order.argsort()]


def test_the_complex_rotation_of_adjacent_pairs_equals_the_concatenating_rope():
    """Half-split pairs laid side by side, rotated by one complex product and put back: the first rope's numbers."""
    x = torch.randn(2, 3, 7, 8)
    pos = torch.arange(5, 12)
    torch.testing.assert_close(rope(x, pos), _rope_cat(x, pos), rtol=0, atol=1e-6)


def test_the_plain_model_equals_its_per_token_reference():
    m = _randomise(CausalLM(11, hidden_size=32, depth=3, num_heads=4), 0)
    tokens = torch.randint(11, (3, 10), generator=torch.Generator().manual_seed(1))
    N, L = tokens.shape
    x, c = m.trunk.tok_embed(tokens), m.trunk.clean_cond.expand(N, L, -1)
    mask = torch.ones(L, L, dtype=torch.bool).tril()
    for layer in m.trunk.layers:
        x = _layer_ref(layer, x, c, torch.arange(L), mask)
    ref = m.head(m.norm_final(x))
    got = m(tokens)
    assert (got - ref).abs().max() <= TOL and not torch.equal(ref, torch.zeros_like(ref))


def test_the_chain_block_equals_its_per_token_reference():
    m = _randomise(ARDenoiser(11, hidden_size=32, depth=3, num_heads=4), 2)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(11, (3, 9), generator=g)
    z, sigma = torch.randn(3, 9, 32, generator=g), torch.rand(3, 9, generator=g) + 0.05
    N, L = tokens.shape
    _, _, c_in, c_noise = get_scalings(sigma, m.sigma_data)
    c_noisy = m.t_embedder(c_noise.flatten()).view(N, L, -1)
    x = torch.cat([c_in[..., None] * z, m.trunk.tok_embed(tokens)], dim=1)
    c = torch.cat([c_noisy, m.trunk.clean_cond.expand(N, L, -1)], dim=1)
    for layer in m.trunk.layers:
        x = _layer_ref(layer, x, c, torch.arange(L).repeat(2), training_mask(L))
    _, ref = m._denoised_and_logits(z, x[:, :L], sigma, c_noisy)
    _, got = m.denoise(z, sigma, tokens)
    assert (got - ref).abs().max() <= TOL


def test_the_recurrent_models_equal_their_per_token_reference():
    m = _randomise(HuginnLM(11, hidden_size=32, num_heads=4, prelude=1, core=2, coda=1), 4)
    tokens = torch.randint(11, (2, 8), generator=torch.Generator().manual_seed(5))
    N, L = tokens.shape
    state = torch.randn(N, L, 32, generator=torch.Generator().manual_seed(6))
    mask, pos, c = torch.ones(L, L, dtype=torch.bool).tril(), torch.arange(L), m.cond.expand(N, L, -1)

    def stack(layers, x):
        for layer in layers:
            x = _layer_ref(layer, x, c, pos, mask)
        return x

    e, s = stack(m.prelude, m.tok_embed(tokens)), state * m.state_std
    for _ in range(3):
        s = stack(m.core, m.adapter(torch.cat([s, e], dim=-1)))
    ref = m.head(m.norm_final(stack(m.coda, s)))
    assert (m(tokens, 3, state) - ref).abs().max() <= TOL

    d = _randomise(RecurrentDenoiser(11, hidden_size=32, num_heads=4, prelude=1, core=1, coda=1), 7)
    g = torch.Generator().manual_seed(8)
    z, sigma = torch.randn(N, L, 32, generator=g), torch.rand(N, L, generator=g) + 0.05
    _, logits = d.denoise(z, sigma, tokens)
    cache = KVCache(3)
    d.trunk.extend(cache, tokens[:, :4])
    for i in range(4, L):  # the cached path, token by token, equals the training forward
        assert (d.denoise_next(z[:, i], sigma[:, i], cache)[1] - logits[:, i]).abs().max() <= TOL
        d.trunk.extend(cache, tokens[:, i:i + 1])


@pytest.mark.parametrize("start", [0, 3])
def test_extend_with_and_without_a_past_equals_the_forward(start):
    m = _randomise(CausalLM(11, hidden_size=32, depth=2, num_heads=4), 9)
    tokens = torch.randint(11, (2, 9), generator=torch.Generator().manual_seed(10))
    h = m.trunk.run(m.trunk.tok_embed(tokens), m.trunk.clean_cond, torch.arange(9), "causal")
    cache = KVCache(2)
    if start:
        m.trunk.extend(cache, tokens[:, :start])
    out = m.trunk.extend(cache, tokens[:, start:])
    assert (out - h[:, start:]).abs().max() <= TOL


def test_gradients_reach_the_constant_conditioning_as_before():
    m = _randomise(CausalLM(11, hidden_size=16, depth=2, num_heads=2), 11)
    m.train()
    tokens = torch.randint(11, (2, 6), generator=torch.Generator().manual_seed(12))
    m.loss(tokens).mean().backward()
    fast = m.trunk.clean_cond.grad.clone()
    m.zero_grad()
    N, L = tokens.shape
    x, c = m.trunk.tok_embed(tokens), m.trunk.clean_cond.expand(N, L, -1)
    for layer in m.trunk.layers:
        x = _layer_ref(layer, x, c, torch.arange(L), torch.ones(L, L, dtype=torch.bool).tril())
    logits = m.head(m.norm_final(x))[:, :-1]
    F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").mean(1).mean().backward()
    assert torch.allclose(fast, m.trunk.clean_cond.grad, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_runs_every_path_close_to_fp32():
    """Rotary tables are complex64: under autocast the bf16 queries and keys are rotated in float32."""
    tokens = torch.randint(11, (2, 8), generator=torch.Generator().manual_seed(13))
    g = torch.Generator().manual_seed(14)
    z, sigma = torch.randn(2, 8, 32, generator=g), torch.rand(2, 8, generator=g) + 0.05
    plain = _randomise(CausalLM(11, hidden_size=32, depth=2, num_heads=4), 15)
    block = _randomise(ARDenoiser(11, hidden_size=32, depth=2, num_heads=4), 16)
    rec = _randomise(RecurrentDenoiser(11, hidden_size=32, num_heads=4, prelude=1, core=1, coda=1), 17)
    runs = {"plain": lambda: plain(tokens), "block": lambda: block.denoise(z, sigma, tokens)[1],
            "recurrent": lambda: rec.denoise(z, sigma, tokens)[1]}
    for name, run in runs.items():
        ref = run()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = run()
        assert low.dtype == torch.float32 and torch.isfinite(low).all(), name
        assert (low - ref).abs().max() <= 0.1 * ref.abs().max(), name


@pytest.mark.parametrize("shape", [(16,), (4, 1, 16), (4, 7, 16)], ids=["constant", "per-sequence", "per-token"])
def test_the_written_out_norm_gradients_are_the_composite_ones(shape):
    g = torch.Generator().manual_seed(18)
    x = torch.randn(4, 7, 16, dtype=torch.float64, generator=g, requires_grad=True)
    shift, scale = (torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda x, s, c: modulated_rms_norm(x, s, c), (x, shift, scale))
    assert torch.autograd.gradcheck(rms_norm, (x,))
    ref = F.rms_norm(x, (16,), eps=1e-6) * (1 + scale) + shift
    torch.testing.assert_close(modulated_rms_norm(x, shift, scale), ref)
    torch.testing.assert_close(rms_norm(x.float()), F.rms_norm(x.float(), (16,), eps=1e-6), rtol=0, atol=1e-6)


def test_the_swiglu_width_is_rounded_only_where_the_config_says():
    assert swiglu_width(128, 4.0) == 341 and swiglu_width(128, 4.0, 16) == 336 and swiglu_width(512, 4.0, 16) == 1360
    task = get_task("arlm")
    old = default_config("arlm").to_dict()
    del old["model"]["mlp_multiple"]  # a config written before the field existed
    cfg = config_from_dict(old)
    assert cfg.model.mlp_multiple == 1 and task.build_block(cfg, 0).trunk.layers[0].mlp.w1.out_features == 341
    rounded = config_from_dict({**old, "model": {**old["model"], "mlp_multiple": 16}})
    net = task.build_block(rounded, 0)
    assert net.trunk.layers[0].mlp.w1.out_features == 336
    with pytest.raises(ConfigError, match="mlp_multiple"):
        config_from_dict({**old, "model": {**old["model"], "mlp_multiple": 0}})


@pytest.mark.parametrize("T", [1, 5])
def test_the_rotated_projection_gradient_is_the_numerical_one(T):
    """The queries, keys and values as views of one buffer rotated in place, their gradient written into one and
    taken through the projection (issue 26): against finite differences in float64 for the input and the weight
    (gradcheck perturbs the parameter itself), and the same numbers as rotating a permuted copy."""
    attn = RotaryAttention(16, 4).double()
    x = torch.randn(2, T, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(19), requires_grad=True)
    pos = rotary(torch.arange(3, 3 + T), 4)
    assert torch.autograd.gradcheck(lambda x, w: attn._qkv(x, pos), (x, attn.qkv.weight))
    w = attn.qkv.weight[paired_rows(16, 4, x.device)[0]]
    qk, v = F.linear(x, w).view(2, T, 3, 4, 4).permute(0, 3, 2, 1, 4).split([2, 1], dim=2)
    for got, want in zip(attn._qkv(x, pos), (*rotate_pairs(qk, pos.to(torch.complex128)).unbind(2), v.squeeze(2))):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
