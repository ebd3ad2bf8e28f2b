"""Autoregressive language-model blocks: next-token prediction as denoising (method.md section 5, fourth row).

The denoised variable at position i is y_i = E[x_i], the L2-normalised embedding of token i in a table E
with orthonormal rows (fixed, drawn from the run's seed and the same for every block, so that the chain's
estimate lives in one space and blocks stay independent). A block sees the sequence twice, [noisy ; clean]:
the noisy stream holds c_in z_i with z_i = y_i + sigma_i eps_i, the clean stream the block's own embedding of
the tokens. Attention: noisy i sees the clean positions before i and itself; clean positions attend
causally among themselves and never to the noisy stream. So the clean stream is an ordinary causal
transformer whose keys and values do not depend on sigma (its tokens are conditioned on a learned constant,
the noisy ones on sigma through adaLN), and a KV cache of it serves every denoising step of every token.

Layers are Llama-style: RMSNorm, rotary position embeddings (noisy i and clean i share position i), SwiGLU;
adaLN-Zero modulation at the granularity of its condition: per position on the noisy stream, once for a constant
(the clean stream's, the plain model's), whose shift and scale are applied in the pass after the norm and whose
gates are folded into the output weights, so that the plain model costs about what a transformer without adaLN
does (issue 26). Query and key heads are computed with their rotary pairs side by side (`paired_rows`), which
leaves the attention unchanged and makes the rotation one complex product. The last layer makes only the noisy
rows' output (the clean rows' keys and values are all it needs of them). Output: D = c_skip z + c_out RMSNorm(h)
at the noisy positions, then a final adaLN and a zero-initialised linear head (not tied to E) give logits over the vocabulary. Loss: the
cross-entropy of the logits at position i against token i, weighted by lambda(sigma_i), per token.

The end-to-end baseline (`CausalLM`) is the clean stream alone: the same layers, position j's output read
by a head as the distribution of token j + 1, plain next-token cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..precond import denoised, get_scalings, loss_weight
from .layers import NoiseEmbedder, RMSNorm, modulate, modulated_rms_norm, zero_init

ROPE_BASE = 10000.0
CAUSAL = "causal"  # an attention mask: each query sees the keys up to its own index (top-left aligned)

# The conditioning of a layer's adaLN: one tensor broadcastable to (N, T, D), at the granularity of the condition
# ((D,) for a constant, (N, 1, D) per sequence, (N, T, D) per token), or a tuple of such tensors for equal
# consecutive stretches of the sequence ([noisy ; clean]: (c_noisy (N, L, D), c_clean (D,))).
Cond = torch.Tensor | tuple[torch.Tensor, ...]

# Rotary tables: e^{i pos theta_j} for positions (T,) and the d/2 frequencies theta_j of a head, complex (T, d/2).
Rotary = torch.Tensor

_ROTARY_CACHE: dict[tuple, Rotary] = {}
_PAIRS_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rotary(pos: torch.Tensor, d: int) -> Rotary:
    """The rotary tables e^{i pos theta_j}, theta_j = base^(-2j/d), of positions pos (T,) for heads of width d (Su et
    al. 2021): complex64 (T, d/2), cached per positions and device (outside inference mode, whose tensors autograd
    cannot save), on the CPU only: the key reads the positions, which would wait for an accelerator; there the tables
    are a few small kernels."""
    cache = pos.device.type == "cpu" and not torch.is_inference_mode_enabled()
    key = (tuple(pos.tolist()), d, pos.device) if cache else None
    hit = _ROTARY_CACHE.get(key) if cache else None
    if hit is not None:
        return hit
    theta = ROPE_BASE ** (-torch.arange(0, d, 2, device=pos.device, dtype=torch.float32) / d)  # (d/2,)
    angles = pos.to(torch.float32)[:, None] * theta  # (T, d/2)
    tables = torch.polar(torch.ones_like(angles), angles)  # (T, d/2) complex
    if cache:
        if len(_ROTARY_CACHE) >= 64:
            _ROTARY_CACHE.clear()
        _ROTARY_CACHE[key] = tables
    return tables


def rotate_pairs(x: torch.Tensor, rot: Rotary) -> torch.Tensor:
    """Rotates the adjacent pairs (x_2j, x_2j+1) of x (..., T, d) by the angles of rot (T, d/2): one complex product
    (in float32 for half inputs, which have no complex type)."""
    dtype = x.dtype
    xc = torch.view_as_complex((x if dtype in (torch.float32, torch.float64) else x.float()).unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * rot).flatten(-2).to(dtype)  # (..., T, d)


class _RotatedProjection(torch.autograd.Function):
    """The rotated queries and keys and the values of x (N, T, D) under a qkv weight W (3D, D), whose query and key
    rows are laid out with their rotary pairs side by side (W[order], `paired_rows`) inside the node: (N, H, T, d)
    views of the projection (N, T, 3, H, d), rotated in place, the layout a textbook GPT's split projection gives.
    The gradient is written into one (N, T, 3D) buffer (the pairs rotated back by the conjugate, the values copied)
    and taken through the projection here: no rotated copy, no concatenation, no node for the row permutation
    (issue 26). float32 and float64 only (complex views)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, W: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, rot: Rotary,
                num_heads: int) -> tuple[torch.Tensor, ...]:
        N, T, D = x.shape
        H, d = num_heads, D // num_heads
        w = W.index_select(0, order)
        u = F.linear(x, w).view(N, T, 3, H, d)
        torch.view_as_complex(u[:, :, :2].unflatten(-1, (-1, 2))).mul_(rot[:, None, None])
        ctx.save_for_backward(x, w, inverse, rot)
        return tuple(u[:, :, i].transpose(1, 2) for i in range(3))  # (N, H, T, d) each

    @staticmethod
    def backward(ctx, gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w, inverse, rot = ctx.saved_tensors
        N, H, T, d = gv.shape
        g = gv.new_empty(N, T, 3, H, d)
        back = rot.conj()[:, None].expand(T, H, d // 2).contiguous()  # (T, H, d/2): long inner loops
        for i, gi in enumerate((gq, gk)):
            torch.mul(torch.view_as_complex(gi.transpose(1, 2).unflatten(-1, (-1, 2))), back,
                      out=torch.view_as_complex(g[:, :, i].unflatten(-1, (-1, 2))))
        g[:, :, 2].copy_(gv.transpose(1, 2))
        g = g.view(N * T, 3 * H * d)
        g_x = (g @ w).view(N, T, -1) if ctx.needs_input_grad[0] else None
        g_W = (g.T @ x.reshape(N * T, -1)).index_select(0, inverse) if ctx.needs_input_grad[1] else None
        return g_x, g_W, None, None, None, None


def paired_rows(dim: int, num_heads: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The order of a qkv weight's rows (3 D) that lays each query and key head's half-split pairs (j, j + d/2) side
    by side, and its inverse: scores q.k are unchanged when q and k are permuted alike, and rotating adjacent pairs is
    one complex product (`rotate_pairs`) where half-split pairs take a roll and four element-wise passes."""
    key = (dim, num_heads, device)
    if key not in _PAIRS_CACHE:
        d = dim // num_heads
        head = torch.arange(d).view(2, d // 2).T.flatten()  # (d,): 0, d/2, 1, d/2 + 1, ...
        qk = (torch.arange(2 * num_heads)[:, None] * d + head).flatten()  # (2 D,): every query and key head
        order = torch.cat([qk, torch.arange(2 * dim, 3 * dim)])  # values keep their order
        _PAIRS_CACHE[key] = order.to(device), order.argsort().to(device)
    return _PAIRS_CACHE[key]


def _rows(w: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """w[order], through `_Rows` where w needs its gradient."""
    return _Rows.apply(w, order, inverse) if torch.is_grad_enabled() and w.requires_grad else w.index_select(0, order)


class _Rows(torch.autograd.Function):
    """w[order] for a permutation `order` of w's rows, its gradient gathered by the inverse (no scatter into zeros)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return w.index_select(0, order)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        inverse, = ctx.saved_tensors
        return g.index_select(0, inverse), None, None


def _positions(pos: torch.Tensor, d: int) -> Rotary:
    return pos if pos.is_complex() else rotary(pos, d)


def _by_stretch(fn, x: torch.Tensor, mods: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """fn(x_k, mods[k]) on each of the len(mods) equal consecutive stretches of x (N, T, D), concatenated."""
    if len(mods) == 1:
        return fn(x, mods[0])
    return torch.cat([fn(xk, m) for xk, m in zip(x.chunk(len(mods), dim=1), mods)], dim=1)


class KVCache:
    """Keys and values of the clean positions seen so far, per layer: (N, H, T, d) each (keys with their rotary pairs
    side by side, `paired_rows`)."""

    def __init__(self, depth: int):
        self.k: list[torch.Tensor | None] = [None] * depth
        self.v: list[torch.Tensor | None] = [None] * depth

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]


class RotaryAttention(nn.Module):
    """Masked multi-head attention with rotary positions, past keys and values, queries from the first positions only
    and a gate folded into its output projection (the [noisy ; clean] streams); kept apart from dit.SelfAttention,
    which has none of these."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def _qkv(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotated queries and keys and the values of x (N, T, D): (N, H, T, d) each."""
        N, T, D = x.shape
        H, d = self.num_heads, D // self.num_heads
        order, inverse = paired_rows(D, H, x.device)
        if x.dtype == self.qkv.weight.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(
                x.device.type):
            return _RotatedProjection.apply(x, self.qkv.weight, order, inverse, _positions(pos, d), H)
        qkv = F.linear(x, _rows(self.qkv.weight, order, inverse))  # (N, T, 3D)
        qk, v = qkv.view(N, T, 3, H, d).permute(0, 3, 2, 1, 4).split([2, 1], dim=2)  # (N, H, 2 and 1, T, d)
        q, k = rotate_pairs(qk, _positions(pos, d)).unbind(2)  # (N, H, T, d) each
        return q, k, v.squeeze(2)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | str | None = None,
                past: tuple[torch.Tensor, torch.Tensor] | None = None, queries: int | None = None,
                w_proj: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple]:
        """x (N, T, D) at positions pos (T,) (or their rotary tables); attends to the past keys/values (if any) then
        its own, under mask (T, T_past + T) (None: every key; CAUSAL: plain causal, no past). queries: only the
        first `queries` positions ask (their output alone is made; every position gives its key and value).
        w_proj: the output projection's weight in place of the layer's own (a constant gate folded in).
        Returns the output (N, queries or T, D) and this input's (k, v)."""
        N, T, D = x.shape
        w_proj = self.proj.weight if w_proj is None else w_proj
        if queries is None:
            q, k, v = self._qkv(x, pos)
        else:
            H, d = self.num_heads, D // self.num_heads
            rot = _positions(pos, d)
            w = _rows(self.qkv.weight, *paired_rows(D, H, x.device))
            k, v = F.linear(x, w[D:]).view(N, T, 2, H, d).permute(0, 3, 2, 1, 4).unbind(2)  # (N, H, T, d) each
            k = rotate_pairs(k, rot)
            q = rotate_pairs(F.linear(x[:, :queries], w[:D]).view(N, queries, H, d).transpose(1, 2), rot[:queries])
            assert not isinstance(mask, str), "queries with a plain causal mask: give the mask's rows"
            mask = None if mask is None else mask[:queries]
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        if isinstance(mask, str):
            assert mask == CAUSAL and past is None, mask
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True)  # (N, H, T, d)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (N, H, T, d)
        return F.linear(out.transpose(1, 2).reshape(N, q.shape[2], D), w_proj), (k, v)


def swiglu_width(dim: int, mlp_ratio: float, multiple: int = 1) -> int:
    """Llama's 2/3 of the width ratio (as many weights as a GELU MLP of mlp_ratio), to the nearest multiple of
    `multiple` that the matrix kernels prefer (1: unrounded, as every run before issue 26)."""
    hidden = int(2 * mlp_ratio * dim / 3)
    return hidden if multiple == 1 else multiple * max(1, round(hidden / multiple))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, multiple: int = 1):
        super().__init__()
        hidden = swiglu_width(dim, mlp_ratio, multiple)
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, w2: torch.Tensor | None = None) -> torch.Tensor:
        """w2: the output weight in place of the layer's own (a constant gate folded in)."""
        return F.linear(F.silu(self.w1(x)) * self.w3(x), self.w2.weight if w2 is None else w2)


class LlamaLayer(nn.Module):
    """Pre-norm attention and SwiGLU with adaLN-Zero modulation, conditioned at the granularity of its condition
    (see `Cond`): the modulation is computed once per distinct condition and broadcast over the tokens; a constant
    condition's gates are folded into the output weights."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, mlp_multiple: int = 1):
        super().__init__()
        self.norm1 = RMSNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = RotaryAttention(dim, num_heads)
        self.norm2 = RMSNorm(dim, eps=1e-6, elementwise_affine=False)
        self.mlp = SwiGLU(dim, mlp_ratio, mlp_multiple)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def modulation(self, c: Cond) -> list[tuple[torch.Tensor, ...]]:
        """Per stretch of the conditioning: (shift1, scale1, gate1, shift2, scale2, gate2), each shaped like its
        condition."""
        if not isinstance(c, tuple):
            return [self.adaLN_modulation(c).chunk(6, dim=-1)]
        mods = [self.adaLN_modulation(ck) for ck in c]
        return [m.chunk(6, dim=-1) for m in mods]

    def kv(self, x: torch.Tensor, c: Cond, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values this layer's attention makes of x (N, T, D), without running the layer."""
        h = _by_stretch(lambda x, m: modulated_rms_norm(x, m[0], m[1], self.norm1.eps), x, self.modulation(c))
        _, k, v = self.attn._qkv(h, pos)
        return k, v

    def forward(self, x: torch.Tensor, c: Cond, pos: torch.Tensor, mask: torch.Tensor | str | None = None,
                past: tuple | None = None, queries: int | None = None) -> tuple[torch.Tensor, tuple]:
        """x (N, T, D) -> (N, T, D) and this input's (k, v); with queries, only the first `queries` positions' output
        (N, queries, D) is made (the others give their keys and values): with a tuple c, queries is the first
        stretch's length."""
        mods = self.modulation(c)  # (shift1, scale1, gate1, shift2, scale2, gate2) per stretch
        h = _by_stretch(lambda x, m: modulated_rms_norm(x, m[0], m[1], self.norm1.eps), x, mods)
        if isinstance(c, torch.Tensor) and c.ndim == 1:  # a constant: gate (o W^T) = o (gate W)^T
            _, _, gate1, shift2, scale2, gate2 = mods[0]
            a, kv = self.attn(h, pos, mask, past, queries, gate1[:, None] * self.attn.proj.weight)
            x = (x if queries is None else x[:, :queries]) + a
            h = modulated_rms_norm(x, shift2, scale2, self.norm2.eps)
            return x + self.mlp(h, gate2[:, None] * self.mlp.w2.weight), kv
        a, kv = self.attn(h, pos, mask, past, queries)
        if queries is not None:
            x, mods = x[:, :queries], _first(mods, queries, x.shape[1])
        x = x + _by_stretch(lambda a, m: m[2] * a, a, mods)
        h = _by_stretch(lambda x, m: modulated_rms_norm(x, m[3], m[4], self.norm2.eps), x, mods)
        x = x + _by_stretch(lambda f, m: m[5] * f, self.mlp(h), mods)
        return x, kv


def _first(mods: list[tuple[torch.Tensor, ...]], queries: int, T: int) -> list[tuple[torch.Tensor, ...]]:
    """The modulation of the first `queries` of T positions: the first stretch, or the per-token rows."""
    if len(mods) > 1:
        assert queries * len(mods) == T, (queries, len(mods), T)
        return mods[:1]
    return [tuple(m[:, :queries] if m.ndim == 3 and m.shape[1] == T > 1 else m for m in mods[0])]


def training_mask(L: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(2L, 2L) boolean attention mask over [noisy ; clean], True where a query may attend to a key: noisy i
    sees clean j < i and noisy i itself; clean i sees clean j <= i; the clean stream never sees the noisy one."""
    i = torch.arange(L, device=device)
    eye = i[:, None] == i[None, :]
    before = i[None, :] < i[:, None]
    causal = i[None, :] <= i[:, None]
    top = torch.cat([eye, before], dim=1)  # noisy queries: (L, 2L)
    bottom = torch.cat([torch.zeros(L, L, dtype=torch.bool, device=device), causal], dim=1)  # clean queries
    return torch.cat([top, bottom], dim=0)


def _extend_mask(start: int, T: int, device) -> torch.Tensor | str | None:
    """The mask of T new tokens after `start` cached ones: each sees every cached one and the new ones up to itself."""
    if T == 1:
        return None
    if start == 0:
        return CAUSAL
    return torch.ones(T, start + T, dtype=torch.bool, device=device).tril(start)


@torch.no_grad()
def init_llama(module: nn.Module, tok_embed: nn.Embedding, cond: nn.Parameter, layers, generator) -> None:
    """Xavier linears (zero biases) in module, N(0, 0.02) token embedding and conditioning vector, and adaLN-Zero:
    the modulation of every layer zero, so that it starts as the identity."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight, generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(tok_embed.weight, std=0.02, generator=generator)
    nn.init.normal_(cond, std=0.02, generator=generator)
    for layer in layers:
        nn.init.zeros_(layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(layer.adaLN_modulation[-1].bias)


class _Trunk(nn.Module):
    """Token embedding, the constant conditioning of clean tokens, the layers; shared by both model kinds."""

    def __init__(self, vocab_size: int, hidden_size: int, depth: int, num_heads: int, mlp_ratio: float,
                 mlp_multiple: int = 1):
        super().__init__()
        self.tok_embed = nn.Embedding(vocab_size, hidden_size)
        self.clean_cond = nn.Parameter(torch.zeros(hidden_size))
        self.layers = nn.ModuleList([LlamaLayer(hidden_size, num_heads, mlp_ratio, mlp_multiple)
                                     for _ in range(depth)])
        self.checkpointing = False

    def noisy_layers(self) -> list[tuple[int, nn.Module]]:
        """(index, layer) of the layers the noisy stream passes through: all of them."""
        return list(enumerate(self.layers))

    def run(self, x: torch.Tensor, c: Cond, pos: torch.Tensor, mask: torch.Tensor | str | None,
            queries: int | None = None) -> torch.Tensor:
        """The layers on x (N, T, D) at positions pos (T,), conditioned by c (see `Cond`), under mask; queries: only
        the first `queries` positions' output is wanted (N, queries, D) (the last layer makes no other)."""
        pos = self.rotary(pos)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            q = queries if i == last else None
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(lambda x, c, layer=layer, q=q: layer(x, c, pos, mask, None, q)[0], x, c,
                               use_reentrant=False)
            else:
                x, _ = layer(x, c, pos, mask, None, q)
        return x if queries is None else x[:, :queries]

    def extend(self, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
        """Runs the clean stream on new tokens (N, T) after the cached ones; stores their keys/values; returns
        their last layer's output (N, T, D)."""
        T = tokens.shape[1]
        start = cache.length
        pos = torch.arange(start, start + T, device=tokens.device)
        x = self.tok_embed(tokens)
        c, pos = self.clean_cond, self.rotary(pos)
        mask = _extend_mask(start, T, tokens.device)
        for l, layer in enumerate(self.layers):
            past = None if cache.k[l] is None else (cache.k[l], cache.v[l])
            x, (k, v) = layer(x, c, pos, mask, past)
            cache.k[l] = k if past is None else torch.cat([past[0], k], 2)
            cache.v[l] = v if past is None else torch.cat([past[1], v], 2)
        return x

    def rotary(self, pos: torch.Tensor) -> Rotary:
        """The rotary tables of positions pos (T,), computed once per forward for every layer."""
        return rotary(pos, self.layers[0].attn.qkv.in_features // self.layers[0].attn.num_heads)

    def init(self, generator: torch.Generator | None) -> None:
        init_llama(self, self.tok_embed, self.clean_cond, self.layers, generator)


class ARDenoiser(nn.Module):
    """One block of a DiffusionBlocks language model: denoises each position's token embedding given the clean
    tokens before it.

    E (vocab_size x hidden_size) is the run's target table (a buffer, the same in every block's file).
    """

    def __init__(self, vocab_size: int, hidden_size: int = 128, depth: int = 2, num_heads: int = 4,
                 mlp_ratio: float = 4.0, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 trunk: _Trunk | None = None, mlp_multiple: int = 1):
        """trunk: the layers and clean stream (default: `depth` layers shared by both streams)."""
        super().__init__()
        self.vocab_size, self.sigma_data = vocab_size, sigma_data
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.trunk = trunk if trunk is not None else _Trunk(vocab_size, hidden_size, depth, num_heads, mlp_ratio,
                                                                  mlp_multiple)
        self.t_embedder = NoiseEmbedder(hidden_size)
        self.norm_out = RMSNorm(hidden_size, eps=1e-6)  # F = norm_out(h) at the noisy positions
        self.norm_final = RMSNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.adaLN_final = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.head = nn.Linear(hidden_size, vocab_size)  # zero-initialised, untied
        self.register_buffer("E", torch.zeros(vocab_size, hidden_size))

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        self.trunk.init(generator)
        self.t_embedder.init_weights(generator)
        zero_init(self.head, self.adaLN_final[-1])
        # E is the run's table, set by the task after building.

    def _denoised_and_logits(self, z: torch.Tensor, h: torch.Tensor, sigma: torch.Tensor, c: torch.Tensor):
        """(D, logits) from the noisy input z (..., D), the trunk's output h there, sigma (...) and conditioning c."""
        c_skip, c_out, _, _ = (s[..., None] for s in get_scalings(sigma, self.sigma_data))
        D = denoised(z, self.norm_out(h), c_skip, c_out)
        shift, scale = self.adaLN_final(c).chunk(2, dim=-1)
        logits = self.head(modulate(self.norm_final(D), shift, scale))
        return D, logits.float()

    def denoise(self, z: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every position at once (training, teacher-forced evaluation): z (N, L, D) noisy embeddings at noise
        sigma (N, L), tokens (N, L) the clean sequence -> (D (N, L, D), logits (N, L, V)); position i's output
        depends on tokens[:, :i] and z[:, i] only."""
        N, L, _ = z.shape
        z, sigma = z.float(), sigma.float()
        _, _, c_in, c_noise = get_scalings(sigma, self.sigma_data)
        c_noisy = self.t_embedder(c_noise.flatten()).view(N, L, -1)  # (N, L, D)
        x = torch.cat([c_in[..., None] * z, self.trunk.tok_embed(tokens)], dim=1)  # (N, 2L, D): [noisy ; clean]
        c = (c_noisy, self.trunk.clean_cond)  # per position on the noisy stream, one constant on the clean one
        pos = torch.arange(L, device=z.device).repeat(2)
        h = self.trunk.run(x, c, pos, training_mask(L, z.device), queries=L)  # (N, L, D): the noisy rows
        return self._denoised_and_logits(z, h, sigma, c_noisy)

    def clean_cache(self, tokens: torch.Tensor) -> KVCache:
        """The clean stream of tokens (n, L), run once: its keys and values per layer, for `denoise_cached`."""
        cache = KVCache(len(self.trunk.layers))
        self.trunk.extend(cache, tokens)
        return cache

    def denoise_cached(self, z: torch.Tensor, sigma: torch.Tensor,
                       cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """`denoise` with the clean stream given: z (N, L, D) at sigma (N, L) after the clean tokens whose keys and
        values `clean_cache` made for n rows, N a multiple of n (row r reads clean row r mod n) -> (D, logits). Only
        the noisy stream runs: position i attends to clean j < i and to itself, as in training."""
        i = torch.arange(z.shape[1], device=z.device)
        mask = torch.cat([i[None, :] < i[:, None], i[None, :] == i[:, None]], 1)  # (L, 2L): [clean ; noisy] keys
        return self._after_clean(z, sigma, cache, i, mask)

    def denoise_next(self, z: torch.Tensor, sigma: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """The next position, after the cached clean tokens: z (N, D), sigma (N,) -> (D (N, D), logits (N, V))."""
        pos = torch.tensor([cache.length], device=z.device)
        D, logits = self._after_clean(z[:, None], sigma[:, None], cache, pos, None)  # (N, 1, D) and (N, 1) in
        return D[:, 0], logits[:, 0]

    def _after_clean(self, z: torch.Tensor, sigma: torch.Tensor, cache: KVCache, pos: torch.Tensor,
                     mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The noisy stream z (N, T, D) at sigma (N, T), positions pos (T,), attending under mask to the cached clean
        keys and values (repeated to N rows where the cache holds fewer) and to its own -> (D, logits)."""
        N, T, _ = z.shape
        z, sigma = z.float(), sigma.float()
        _, _, c_in, c_noise = get_scalings(sigma, self.sigma_data)
        c = self.t_embedder(c_noise.flatten()).view(N, T, -1)  # (N, T, D)
        x = c_in[..., None] * z
        pos = self.trunk.rotary(pos)
        for l, layer in self.trunk.noisy_layers():
            past = None if cache.k[l] is None else (cache.k[l], cache.v[l])  # (n, H, T_past, d) each
            if past is not None and len(past[0]) != N:
                past = tuple(t.repeat(N // len(t), 1, 1, 1) for t in past)
            x, _ = layer(x, c, pos, mask, past)
        return self._denoised_and_logits(z, x, sigma, c)

    def estimate(self, D: torch.Tensor, logits: torch.Tensor, bridge: str,
                 token: torch.Tensor | None = None) -> torch.Tensor:
        """What the chain carries to the next step: the estimate D, softmax(logits) @ E, E[argmax logits], or
        (bridge "sample") E[token] for a token the caller drew from the logits."""
        if bridge == "sample":
            return self.E[token]
        if bridge == "estimate":
            return D
        if bridge == "softmax":
            return logits.softmax(-1) @ self.E
        if bridge == "argmax":
            return self.E[logits.argmax(-1)]
        raise ValueError(f"unknown bridge {bridge!r}")

    def loss(self, tokens: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per-sequence mean over positions of lambda(sigma_i) CE_i, with z_i = E[token_i] + sigma_i eps_i."""
        y = self.E[tokens]  # (N, L, D)
        z = y + sigma[..., None] * noise
        _, logits = self.denoise(z, sigma, tokens)
        ce = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")  # (N, L)
        return (loss_weight(sigma.float(), self.sigma_data) * ce).mean(1)


class CausalLM(nn.Module):
    """The end-to-end baseline: the clean stream alone, position j read out as the distribution of token j + 1."""

    def __init__(self, vocab_size: int, hidden_size: int = 128, depth: int = 6, num_heads: int = 4,
                 mlp_ratio: float = 4.0, mlp_multiple: int = 1, trunk: nn.Module | None = None):
        """trunk: the layers (default: `depth` of our own; `hf_llama.HFTrunk` has the same interface)."""
        super().__init__()
        self.vocab_size = vocab_size
        self.trunk = trunk if trunk is not None else _Trunk(vocab_size, hidden_size, depth, num_heads, mlp_ratio,
                                                            mlp_multiple)
        self.norm_final = RMSNorm(hidden_size, eps=1e-6)
        self.head = nn.Linear(hidden_size, vocab_size)

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        self.trunk.init(generator)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N, L) -> the final normalised hidden states (N, L, D) the head reads, position j's from tokens <= j."""
        L = tokens.shape[1]
        h = self.trunk.run(self.trunk.tok_embed(tokens), self.trunk.clean_cond, torch.arange(L, device=tokens.device),
                           CAUSAL)
        return self.norm_final(h)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N, L) -> logits (N, L, V), position j's for token j + 1."""
        return self.head(self.hidden(tokens)).float()

    def next_logits(self, h_last: torch.Tensor) -> torch.Tensor:
        """Logits of the next token from the clean stream's last output (N, D)."""
        return self.head(self.norm_final(h_last)).float()

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-sequence mean next-token cross-entropy (nats) over positions 1..L-1."""
        logits = self(tokens)[:, :-1]
        return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").mean(1)
