"""transformers' Llama decoder layers as the language tasks' trunk (`model.backbone="transformers"`, issue 30).

Each layer is a `transformers.LlamaDecoderLayer` (RMSNorm, rotary attention, SwiGLU, as the source model computes
them) built from a `LlamaConfig` derived from our model config or read from a directory written by
`save_pretrained`, with our noise conditioning around it: adaLN on the residual stream (DiT's, applied to the whole
layer),

    h = x (1 + scale(c)) + shift(c),    x' = x + (1 + gate(c)) (Layer(h) - h),

per token for a per-token condition (the noisy stream), once for a constant one (the clean stream, the plain model).
The modulation starts at zero, so a fresh layer is the plain Llama layer. The task's attention mask reaches the
layer as a 4-D boolean mask (True: may attend), the rotary tables come from `LlamaRotaryEmbedding`, and keys and
values of past positions are handed to the attention through a cache object that stores nothing itself: the
`arlm.KVCache` of the clean stream serves every denoising step, as with our own trunk.

`HFTrunk` has `arlm._Trunk`'s interface (`run`, `extend`, `rotary`, `noisy_layers`, `init`), so `ARDenoiser` and
`CausalLM` take it as their trunk; `HFMaskedDiffusion` is the masked-diffusion block on it (bidirectional).
`pretrained_llama` reads and checks a directory's config and weights, named as our modules name them.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import extras
from ..config import ConfigError
from ..noise import MaskingTime
from .arlm import CAUSAL, ROPE_BASE, Cond, KVCache, _extend_mask
from .layers import NoiseEmbedder, modulate
from .mdlm import T_SCALE, MaskedDiffusionTransformer

RMS_EPS = 1e-6  # our trunk's RMSNorm epsilon
LLAMA_TYPES = ("llama",)  # model_type of the configs whose layers are LlamaDecoderLayer


if TYPE_CHECKING:
    from transformers import LlamaConfig


def llama() -> ModuleType:
    """transformers' Llama modelling module (LlamaConfig, LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding),
    imported on first use: the optional extra diffusionblocks[hf]."""
    return extras.load("transformers.models.llama.modeling_llama", "model.backbone='transformers'")


def require_transformers() -> None:
    """Raises ConfigError naming the extra when transformers is missing."""
    llama()


def llama_config(vocab_size: int, hidden_size: int, depth: int, num_heads: int, intermediate_size: int,
                 max_positions: int, source: LlamaConfig | None = None) -> LlamaConfig:
    """The LlamaConfig of `depth` layers of our model's size (RMSNorm eps 1e-6, rope theta 10,000, no biases), or
    `source`'s (a pretrained model's: its eps, theta, key/value heads) with `depth` layers; attention through SDPA."""
    require_transformers()
    if source is not None:
        cfg = llama().LlamaConfig.from_dict(source.to_dict())
        cfg.num_hidden_layers = depth
    else:
        cfg = llama().LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                                       num_hidden_layers=depth, num_attention_heads=num_heads,
                                       num_key_value_heads=num_heads, rms_norm_eps=RMS_EPS,
                                       max_position_embeddings=max_positions,
                                       rope_parameters={"rope_type": "default", "rope_theta": ROPE_BASE})
    cfg._attn_implementation = "sdpa"
    return cfg


class _PastKV:
    """What LlamaAttention calls as its cache: the past keys and values (N, H_kv, T_past, d) put before the new ones;
    the new ones are kept (`k`, `v`) for the caller, which decides whether to store them."""

    def __init__(self, past: tuple[torch.Tensor, torch.Tensor] | None):
        self.past, self.k, self.v = past, None, None

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.k, self.v = k, v
        if self.past is None:
            return k, v
        return torch.cat([self.past[0], k], 2), torch.cat([self.past[1], v], 2)


def _modulation(adaLN: nn.Module, c: Cond, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(shift, scale, gate) of the condition c (see `arlm.Cond`), each broadcastable to x (N, T, D): a constant stays
    (D,), the stretches of a tuple are laid end to end along the sequence."""
    if not isinstance(c, tuple):
        return adaLN(c).chunk(3, dim=-1)
    N, T, D = x.shape
    T_k = T // len(c)
    mods = [adaLN(ck).expand(N, T_k, 3 * D) for ck in c]  # (N, T_k, 3D) per stretch
    return torch.cat(mods, dim=1).chunk(3, dim=-1)


def _attention_mask(mask: torch.Tensor | str | None) -> dict:
    """Our mask (None: every key; CAUSAL; a boolean (T_q, T_k), True where a query may attend) as the keyword
    arguments of a LlamaDecoderLayer: a 4-D boolean mask, or none with SDPA's causal flag."""
    if isinstance(mask, str):
        assert mask == CAUSAL, mask
        return {"attention_mask": None, "is_causal": True}
    return {"attention_mask": None if mask is None else mask[None, None], "is_causal": False}


class ConditionedLlamaLayer(nn.Module):
    """A LlamaDecoderLayer with adaLN on its residual stream (see the module's docstring)."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        D = config.hidden_size
        self.layer = llama().LlamaDecoderLayer(config, layer_idx)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 3 * D))

    def forward(self, x: torch.Tensor, c: Cond, pos: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | str | None = None, past: tuple | None = None,
                queries: int | None = None) -> tuple[torch.Tensor, tuple]:
        """x (N, T, D) under mask (T, T_past + T) after the past keys/values, pos the rotary (cos, sin) of its
        positions -> (N, T or queries, D) and this input's (k, v) (N, H_kv, T, d) each."""
        shift, scale, gate = _modulation(self.adaLN_modulation, c, x)
        h = modulate(x, shift, scale)
        cache = _PastKV(past)
        y = self.layer(h, position_embeddings=pos, cache=cache, **_attention_mask(mask))
        x = x + (1 + gate) * (y - h)
        return (x if queries is None else x[:, :queries]), (cache.k, cache.v)


class HFTrunk(nn.Module):
    """Token embedding, the clean tokens' constant condition, ConditionedLlamaLayers and the rotary embedding: the
    interface of `arlm._Trunk` on transformers' layers. bidirectional: the layers' attention is not causal where no
    mask is given (masked diffusion)."""

    def __init__(self, config: LlamaConfig, vocab_size: int, bidirectional: bool = False):
        super().__init__()
        require_transformers()
        D = config.hidden_size
        self.tok_embed = nn.Embedding(vocab_size, D)
        self.clean_cond = nn.Parameter(torch.zeros(D))
        self.layers = nn.ModuleList([ConditionedLlamaLayer(config, i) for i in range(config.num_hidden_layers)])
        self.rotary_emb = llama().LlamaRotaryEmbedding(config)
        self.bidirectional = bidirectional
        self.checkpointing = False

    def noisy_layers(self) -> list[tuple[int, nn.Module]]:
        return list(enumerate(self.layers))

    def rotary(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) (1, T, d) of positions pos (T,), from LlamaRotaryEmbedding, once per forward."""
        if isinstance(pos, tuple):
            return pos
        return self.rotary_emb(self.clean_cond, pos[None])

    def run(self, x: torch.Tensor, c: Cond, pos: torch.Tensor, mask: torch.Tensor | str | None,
            queries: int | None = None) -> torch.Tensor:
        """The layers on x (N, T, D) at positions pos (T,), conditioned by c, under mask (None: every key); queries:
        only the first `queries` positions' output (N, queries, D)."""
        pos = self.rotary(pos)
        if mask is None and not self.bidirectional:
            raise ValueError("a causal trunk takes a mask (arlm.CAUSAL for plain causal attention)")
        for layer in self.layers:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(lambda x, c, layer=layer: layer(x, c, pos, mask)[0], x, c, use_reentrant=False)
            else:
                x, _ = layer(x, c, pos, mask)
        return x if queries is None else x[:, :queries]

    def extend(self, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
        """Runs the clean stream on new tokens (N, T) after the cached ones; stores their keys/values; returns their
        last layer's output (N, T, D)."""
        T, start = tokens.shape[1], cache.length
        pos = self.rotary(torch.arange(start, start + T, device=tokens.device))
        mask = _extend_mask(start, T, tokens.device)
        x = self.tok_embed(tokens)
        for l, layer in enumerate(self.layers):
            past = None if cache.k[l] is None else (cache.k[l], cache.v[l])
            x, (k, v) = layer(x, self.clean_cond, pos, mask, past)
            cache.k[l] = k if past is None else torch.cat([past[0], k], 2)
            cache.v[l] = v if past is None else torch.cat([past[1], v], 2)
        return x

    @torch.no_grad()
    def init(self, generator: torch.Generator | None) -> None:
        """Xavier linears (zero biases), unit norms, N(0, 0.02) token embedding and clean condition, and the adaLN
        modulation zero: every layer starts as the plain Llama layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, generator=generator)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, llama().LlamaRMSNorm):
                nn.init.ones_(m.weight)
        nn.init.normal_(self.tok_embed.weight, std=0.02, generator=generator)
        nn.init.normal_(self.clean_cond, std=0.02, generator=generator)
        for layer in self.layers:
            nn.init.zeros_(layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(layer.adaLN_modulation[-1].bias)


class HFMaskedDiffusion(MaskedDiffusionTransformer):
    """The masked-diffusion block (`mdlm.MaskedDiffusionTransformer`'s loss, sampling and ELBO) on a bidirectional
    HFTrunk: rotary positions in place of the learned position table, the time condition through each layer's adaLN,
    the final RMSNorm (a pretrained model's `norm`), a final adaLN and the head."""

    def __init__(self, config: LlamaConfig, vocab_size: int, seq_len: int, axis: MaskingTime,
                 t_min: float = 0.0, t_max: float = 1.0):
        nn.Module.__init__(self)  # not the DiT layers of MaskedDiffusionTransformer.__init__
        self.vocab_size, self.mask_id, self.seq_len = vocab_size, vocab_size, seq_len
        self.axis, self.sigma_min, self.sigma_max = axis, t_min, t_max
        D = config.hidden_size
        self.trunk = HFTrunk(config, vocab_size + 1, bidirectional=True)  # id V: the mask token
        self.t_embedder = NoiseEmbedder(D)
        self.norm_final = llama().LlamaRMSNorm(D, eps=config.rms_norm_eps)
        self.adaLN_final = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.head = nn.Linear(D, vocab_size)

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        """The trunk's init; N(0, 0.02) time embedder; zero final adaLN and head (a fresh block predicts the uniform
        distribution)."""
        self.trunk.init(generator)
        self.t_embedder.init_weights(generator)
        nn.init.ones_(self.norm_final.weight)
        for lin in (self.adaLN_final[-1], self.head):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t (N, L) token ids with mask_id where masked, t (N,) -> logits (N, L, V)."""
        L = x_t.shape[1]
        c = self.t_embedder(T_SCALE * t.float())[:, None]  # (N, 1, D)
        h = self.trunk.run(self.trunk.tok_embed(x_t), c, torch.arange(L, device=x_t.device), None)  # (N, L, D)
        shift, scale = self.adaLN_final(c).chunk(2, dim=-1)
        return self.head(modulate(self.norm_final(h), shift, scale)).float()  # (N, L, V)


# ---- a pretrained Llama from a local directory


def read_llama_config(path: str | Path, field: str = "model.pretrained") -> LlamaConfig:
    """The LlamaConfig of the directory `path` (written by `save_pretrained`); one ConfigError for a directory that
    is not there, has no config.json, or holds another class of model."""
    require_transformers()
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{field}={str(path)!r} is not a directory")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{field}={str(path)!r} has no config.json (a directory written by save_pretrained)")
    try:
        d = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{field}={str(path)!r}: config.json cannot be read: {e}") from None
    kind = d.get("model_type") if isinstance(d, dict) else None
    if kind not in LLAMA_TYPES:
        raise ConfigError(f"{field}={str(path)!r} holds a {kind!r} model ({', '.join(d.get('architectures') or [])}"
                          f"): the transformers backbone takes Llama models (model_type {', '.join(LLAMA_TYPES)})")
    try:
        return llama().LlamaConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{field}={str(path)!r}: config.json is not a valid LlamaConfig: {e}") from None


def check_llama_sizes(source: LlamaConfig, sizes: dict[str, int], path: str | Path) -> None:
    """Refuses a pretrained config whose sizes are not the model config's: sizes maps our field (model.hidden_size)
    to (its value, the LlamaConfig attribute it must equal)."""
    for ours, (value, theirs) in sizes.items():
        if getattr(source, theirs) != value:
            raise ConfigError(f"model.pretrained={str(path)!r} has {theirs}={getattr(source, theirs)} but "
                              f"{ours}={value}: set {ours}={getattr(source, theirs)}")
    if source.hidden_act != "silu" or source.attention_bias or source.mlp_bias:
        raise ConfigError(f"model.pretrained={str(path)!r}: hidden_act={source.hidden_act!r}, attention_bias="
                          f"{source.attention_bias}, mlp_bias={source.mlp_bias}; the backbone takes silu without biases")


def pretrained_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors files in `path` (LlamaForCausalLM's or LlamaModel's), without the `model.`
    prefix: embed_tokens, layers.i.*, norm, lm_head (the embedding where the head is tied and not stored)."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"model.pretrained={str(path)!r} has no *.safetensors weights (save_pretrained writes them)")
    weights = {}
    for f in files:
        for key, w in load_file(str(f)).items():
            weights[key.removeprefix("model.")] = w.float()
    return weights


def our_names(weights: dict[str, torch.Tensor], trunk: str, norm: str, head: str, depth: int,
              tied: bool) -> dict[str, torch.Tensor]:
    """A pretrained Llama's tensors named as our modules name them: `{trunk}.tok_embed`, `{trunk}.layers.i.layer.*`
    for i < depth, `{norm}` (the final RMSNorm's weight) and `{head}` (the LM head's weight, when it has one)."""
    out = {}
    for key, w in weights.items():
        if key == "embed_tokens.weight":
            out[f"{trunk}.tok_embed.weight"] = w
        elif key == "norm.weight":
            out[norm] = w
        elif key == "lm_head.weight":
            out[head] = w
        elif key.startswith("layers.") and int(key.split(".")[1]) < depth:
            i, rest = key.split(".", 2)[1:]
            out[f"{trunk}.layers.{i}.layer.{rest}"] = w
    if head not in out and tied and "embed_tokens.weight" in weights:
        out[head] = weights["embed_tokens.weight"]
    return out


@torch.no_grad()
def load_into(net: nn.Module, named: dict[str, torch.Tensor], path: str | Path) -> None:
    """Copies the pretrained tensors `named` (our names) into net; an embedding with more rows (the mask token) takes
    the first rows; a missing decoder-layer weight or a shape that differs stops with one ConfigError."""
    state = net.state_dict()
    layer_keys = [k for k in state if ".layer." in k and "adaLN" not in k]
    missing = [k for k in layer_keys if k not in named]
    if missing:
        raise ConfigError(f"model.pretrained={str(path)!r} lacks {missing[0]} (and {len(missing) - 1} more)")
    for key, w in named.items():
        target = state[key]
        if target.shape == w.shape:
            target.copy_(w)
        elif target.ndim == 2 and target.shape[1] == w.shape[1] and target.shape[0] > w.shape[0]:
            target[:w.shape[0]].copy_(w)
        else:
            raise ConfigError(f"model.pretrained={str(path)!r}: {key} is {tuple(w.shape)}, the model's "
                              f"{tuple(target.shape)}")
