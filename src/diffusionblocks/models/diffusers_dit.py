"""diffusers' class-conditional `DiTTransformer2DModel` as the raw network F of one block (model.arch="diffusers-dit").

A block is built from the model's own config (a dict, as `save_pretrained` writes it to config.json) with the
block's share of its transformer blocks: its own patch embedding, transformer blocks [first, last) of the layer
split and output head, so blocks share no parameter, as our DiT's do (models/dit.py). Its state dict uses
diffusers' names (`pos_embed.`, `transformer_blocks.i.`, `proj_out_1.`, `proj_out_2.`).

Conditioning. diffusers' DiT has no shared noise or class embedder: every transformer block embeds the timestep
and the label itself (`transformer_blocks.i.norm1.emb`), and the output head is conditioned through the first
one's. A block holding layer 0 does the same; a block that does not holds its own copy of that embedding,
`head_emb` (in a split of a trained model, a copy of layer 0's), so its head sees what the source's head saw.

Noise input. The EDM denoiser (precond.Denoiser) hands F c_noise = ln(sigma)/4; diffusers' sinusoidal embedding
expects a DDPM timestep in [0, 1000). F maps sigma to the timestep of the variance-preserving schedule with
that noise-to-signal ratio, t = 999 sigma_vp^-1(sigma) (EDM, Table 1, "VP": the continuous form of DDPM's linear
betas 1e-4 .. 0.02), so that a network trained by DDPM sees the timestep its noise level had. A wrapper that
already speaks in timesteps builds F with noise_input="timestep".

Labels. diffusers' label table has num_classes + 1 rows (its last row the null class of classifier-free
guidance), as our convention does (index num_classes = null). Its own random label dropout (global RNG) is
switched off: the task drops labels from the run's generator (tasks/image_generation.py, loss_inputs).
A learned-sigma model (out_channels = 2 in_channels) returns its prediction, the first in_channels channels.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import extras
from ..config import ConfigError, shown_path
from .dit import xavier_init
from .layers import modulate

CLASS_NAME = "DiTTransformer2DModel"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
NOISE_INPUTS = ("edm", "timestep")

# Our model fields and how the diffusers config gives them.
OUR_FIELDS = {
    "image_size": lambda c: c["sample_size"],
    "in_channels": lambda c: c["in_channels"],
    "patch_size": lambda c: c["patch_size"],
    "hidden_size": lambda c: c["num_attention_heads"] * c["attention_head_dim"],
    "depth": lambda c: c["num_layers"],
    "num_heads": lambda c: c["num_attention_heads"],
    "num_classes": lambda c: c["num_embeds_ada_norm"],
    "mlp_ratio": lambda c: 4.0,  # diffusers' FeedForward: inner width 4 x hidden
}
SOURCE_KEY = {"image_size": "sample_size", "in_channels": "in_channels", "patch_size": "patch_size",
              "hidden_size": "num_attention_heads x attention_head_dim", "depth": "num_layers",
              "num_heads": "num_attention_heads", "num_classes": "num_embeds_ada_norm",
              "mlp_ratio": "(fixed: 4)"}


def _diffusers() -> ModuleType:
    """diffusers, imported on first use (the optional extra diffusionblocks[diffusers])."""
    return extras.load("diffusers", "model.arch='diffusers-dit'")


def default_config() -> dict[str, Any]:
    """The arguments of DiTTransformer2DModel and their defaults."""
    params = inspect.signature(_diffusers().DiTTransformer2DModel.__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self"}


def read_pretrained_config(path: str | Path) -> dict[str, Any]:
    """The config.json of a directory written by `save_pretrained`, after refusing a directory without one and a
    model of another class."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"model.pretrained={shown_path(path)} is not a directory (a model saved by diffusers' "
                          "save_pretrained)")
    file = path / "config.json"
    if not file.is_file():
        raise ConfigError(f"model.pretrained={shown_path(path)} has no config.json: it is not a model directory "
                          "written by save_pretrained")
    try:
        d = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{str(file)!r} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{str(file)!r} is not a JSON object")
    check_class(d, f"model.pretrained={shown_path(path)}")
    return d


def check_class(d: dict[str, Any], where: str) -> None:
    name = d.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
        raise ConfigError(f"{where} is a {name!r}: model.arch='diffusers-dit' takes diffusers' class-conditional "
                          f"{CLASS_NAME} only")


def full_config(d: dict[str, Any]) -> dict[str, Any]:
    """A DiTTransformer2DModel config with its defaults filled in, after refusing what the adapter cannot build:
    another class, an unknown argument, another norm_type, no label table, dropout (diffusers draws it from the
    global random state) and an output that is neither the input's channels nor twice them (learned sigma)."""
    check_class(d, "model.diffusers")
    defaults = default_config()
    unknown = sorted(k for k in d if k not in defaults and not k.startswith("_"))
    if unknown:
        raise ConfigError(f"model.diffusers has an unknown key {unknown[0]!r}: {CLASS_NAME} takes "
                          f"{', '.join(defaults)}")
    c = {**defaults, **{k: v for k, v in d.items() if not k.startswith("_")}}
    if c["norm_type"] != "ada_norm_zero":
        raise ConfigError(f"model.diffusers norm_type={c['norm_type']!r}: {CLASS_NAME} is built with 'ada_norm_zero'")
    if not isinstance(c["num_embeds_ada_norm"], int) or c["num_embeds_ada_norm"] < 0:
        raise ConfigError(f"model.diffusers num_embeds_ada_norm={c['num_embeds_ada_norm']!r} must be the number of "
                          "classes (0: unconditional)")
    if c["dropout"] != 0:
        raise ConfigError(f"model.diffusers dropout={c['dropout']} must be 0: diffusers draws dropout from the "
                          "global random state, and a block's randomness must come from its own generator")
    C, out = c["in_channels"], c["out_channels"]
    if out not in (None, C, 2 * C):
        raise ConfigError(f"model.diffusers out_channels={out} must be in_channels={C} or twice it (learned sigma)")
    return c


def derived_fields(d: dict[str, Any]) -> dict[str, Any]:
    """Our model fields (image_size, depth, hidden_size...) as the diffusers config `d` gives them."""
    c = full_config(d)
    return {name: get(c) for name, get in OUR_FIELDS.items()}


def disagreement(ours: dict[str, Any], d: dict[str, Any]) -> str | None:
    """The first of our model fields that differs from what the diffusers config `d` gives, as a message."""
    for name, value in derived_fields(d).items():
        if ours[name] != value:
            return (f"model.{name}={ours[name]!r} but model.diffusers gives {value!r} ({SOURCE_KEY[name]}): set "
                    f"model.{name}={value!r} or leave it out to take it from the diffusers config")
    return None


def has_weights(path: str | Path) -> bool:
    """Whether the model directory holds weights (save_pretrained's file names), not only its config."""
    return any((Path(path) / name).is_file() for name in WEIGHT_FILES)


def load_pretrained_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of the DiTTransformer2DModel saved in the local directory `path` (nothing downloads)."""
    try:
        model = _diffusers().DiTTransformer2DModel.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"model.pretrained={shown_path(path)}: its weights could not be loaded: "
                          f"{' '.join(str(e).split())[:300]}") from None
    return model.state_dict()


def diffusers_timestep(c_noise: torch.Tensor, beta_min: float = 0.1, beta_d: float = 19.9) -> torch.Tensor:
    """t = 999 sigma_vp^-1(sigma) for sigma = exp(4 c_noise): sigma_vp^-1(sigma) = (sqrt(beta_min^2 + 2 beta_d
    ln(sigma^2 + 1)) - beta_min) / beta_d (EDM Table 1, VP), DDPM's timestep of the same noise-to-signal ratio."""
    sigma = torch.exp(4 * c_noise.float())
    t = ((beta_min ** 2 + 2 * beta_d * torch.log1p(sigma ** 2)).sqrt() - beta_min) / beta_d
    return 999 * t


def split_state_dict(weights: dict[str, torch.Tensor], first: int, last: int,
                     prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict of a block of transformer blocks [first, last) of the network `weights` (keys under `prefix`,
    diffusers' names), renumbered from 0, with copies of the patch embedding and the head; a block without layer 0
    gets layer 0's timestep and label embedding as its `head_emb` (a network that has one keeps its own). Each
    tensor is a copy."""
    out = {}
    layer = f"{prefix}transformer_blocks."
    head_emb = f"{prefix}head_emb."
    for key, w in weights.items():
        if key.startswith(layer):
            i, rest = key[len(layer):].split(".", 1)
            if first <= int(i) < last:
                out[f"{layer}{int(i) - first}.{rest}"] = w.clone()
        elif not key.startswith(head_emb):
            out[key] = w.clone()
    if first > 0:
        own = {key: w for key, w in weights.items() if key.startswith(head_emb)}
        if own:  # already a block without layer 0: its head's embedding
            out.update({key: w.clone() for key, w in own.items()})
        else:
            emb = f"{layer}0.norm1.emb."
            out.update({head_emb + key[len(emb):]: w.clone() for key, w in weights.items() if key.startswith(emb)})
    return out


class DiffusersDiT(nn.Module):
    """F(x, noise | class_labels) -> image-shaped output: transformer blocks [first, first + num_layers) of a
    diffusers DiTTransformer2DModel of config `config`, with its own patch embedding and head.

    Args:
        config: the DiTTransformer2DModel config (its num_layers is the whole model's).
        num_layers: the block's transformer blocks.
        has_first_layer: whether the block holds the model's layer 0, through whose embedding the head is
            conditioned; without it the block owns a copy (`head_emb`).
        noise_input: "edm" (c_noise = ln(sigma)/4, mapped to diffusers' timestep) or "timestep" (given as is).
    """

    def __init__(self, config: dict[str, Any], num_layers: int, has_first_layer: bool = True,
                 noise_input: str = "edm"):
        super().__init__()
        if noise_input not in NOISE_INPUTS:
            raise ValueError(f"noise_input must be one of {NOISE_INPUTS}, got {noise_input!r}")
        c = full_config(config)
        diffusers = _diffusers()
        model = diffusers.DiTTransformer2DModel.from_config({**c, "num_layers": num_layers})
        self.pos_embed = model.pos_embed
        self.transformer_blocks = model.transformer_blocks
        self.norm_out = model.norm_out
        self.proj_out_1 = model.proj_out_1
        self.proj_out_2 = model.proj_out_2
        self.in_channels, self.out_channels = c["in_channels"], model.out_channels
        self.patch_size, self.num_classes = c["patch_size"], c["num_embeds_ada_norm"]
        self.head_emb = None if has_first_layer else diffusers.models.embeddings.CombinedTimestepLabelEmbeddings(
            self.num_classes, model.inner_dim)
        self.noise_input = noise_input
        self.checkpointing = False  # activation checkpointing of each transformer block in training
        for emb in self.embeddings():
            emb.class_embedder.dropout_prob = 0.0  # labels are dropped by the task, from the run's generator

    def embeddings(self) -> list[nn.Module]:
        """Every timestep and label embedding of the block: one per transformer block, and head_emb."""
        embs = [blk.norm1.emb for blk in self.transformer_blocks]
        return embs + ([self.head_emb] if self.head_emb is not None else [])

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        """DiT's initialisation (as in models/dit.py), every parameter drawn from `generator`: Xavier-uniform
        linears and patch embedding, N(0, 0.02) label tables and timestep MLPs, zero adaLN-Zero modulations and a
        zero output layer (F = 0 at the start)."""
        xavier_init(self, self.pos_embed.proj, generator)
        for emb in self.embeddings():
            nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02, generator=generator)
            nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02, generator=generator)
            nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02, generator=generator)
        for blk in self.transformer_blocks:
            nn.init.zeros_(blk.norm1.linear.weight)
            nn.init.zeros_(blk.norm1.linear.bias)
        for lin in (self.proj_out_1, self.proj_out_2):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C_out) -> (N, C_out, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = math.isqrt(x.shape[1])
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, noise: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        t = diffusers_timestep(noise) if self.noise_input == "edm" else noise  # (N,) in [0, 1000)
        if class_labels is None:
            class_labels = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
        h = self.pos_embed(x)  # (N, T, D) with positions, T = H W / p^2
        for blk in self.transformer_blocks:
            if self.checkpointing and torch.is_grad_enabled():
                h = checkpoint(blk, h, None, None, None, t, None, class_labels, use_reentrant=False)
            else:
                h = blk(h, timestep=t, class_labels=class_labels)  # (N, T, D)
        head_emb = self.head_emb if self.head_emb is not None else self.transformer_blocks[0].norm1.emb
        emb = head_emb(t, class_labels, hidden_dtype=h.dtype)  # (N, D)
        shift, scale = self.proj_out_1(F.silu(emb)).chunk(2, dim=1)
        h = self.proj_out_2(modulate(self.norm_out(h), shift[:, None], scale[:, None]))  # (N, T, p^2 C_out)
        return self.unpatchify(h)[:, :self.in_channels]  # (N, C, H, W): a learned-sigma model's prediction half
