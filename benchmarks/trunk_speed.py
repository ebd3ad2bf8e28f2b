"""The language trunk's bare training step, before and after issue 26, next to a textbook GPT (issue 26).

One process, fixed threads, interleaved repeats (each variant's turn in a round after --rewarm untimed steps),
medians. Each step: forward, backward, AdamW step (the trainer's: fused on the CPU and CUDA; `--adamw foreach` for
the per-op kernels the trainer used before), on a random batch of token ids (speed does not depend on the text).
Variants:

- gpt: a plain-PyTorch textbook GPT of the preset's size (absolute position embeddings, LayerNorm, GELU MLP of 4x
  width, tied head, no bias; nanoGPT's layout), plain causal next-token loss.
- nanogpt (`--nanogpt DIR`, a checkout of karpathy/nanoGPT): that repository's own `GPT` (model.py) at the same size,
  without bias or dropout, its loss on the same tokens: a check that the textbook GPT is as fast as the reference.
- plain: `CausalLM` of presets/shakespeare-arlm.json with model.mode=plain, blocks.num_blocks=1 (6 layers, width 128,
  4 heads, sequences of 64), batch 32.
- block: one `ARDenoiser` block of the B=3 chain of the same preset (2 of the 6 layers, [noisy ; clean] of 2 x 64).
- recurrent: the `RecurrentDenoiser` of presets/shakespeare-recurrent.json (prelude 2, core 4, coda 2, width 128).
- mdlm: one `MaskedDiffusionTransformer` block of presets/shakespeare-mdlm.json (B=3: 2 of the 6 layers, sequences
  of 32, batch 64), a DiT-layer trunk issue 26 leaves as it was (timed to show that).

Ablations (`--ablate`): the plain model with one part of what sets it apart from the GPT swapped for the GPT's, to
show where the remaining step time goes (not models anyone trains): plain_without_rotary (queries and keys split from
the projection unrotated), plain_without_rmsnorm (the modulated RMSNorms as LayerNorms with weight 1 + scale and bias
shift: PyTorch's fused kernels), plain_without_modulation (each layer's shift, scale and gates fixed tensors without
gradient, so no adaLN weights in the step), plain_without_swiglu (a GELU MLP of 4x width), plain_without_all.

"before" is the code of a base commit (default: 97c5b76, the last before issue 26), its package extracted from git
beside the installed one; "after" is the working tree's, built as the presets build it (the SwiGLU width rounded to
model.mlp_multiple). The same weights give the same logits in both codes: after the timed steps (when the adaLN
weights are no longer zero), an unrounded after-model takes the timed one's weights where their shapes agree and
is loaded, strictly, into the before-model; the max |delta logit| is printed, beside what fp32 rounding alone does to
the after-model's logits (`rounding_floor`: every weight moved by one unit in its last place, up or down).

Allocator (`--keep-freed-memory`): glibc's malloc keeps freed memory for reuse in this process, every variant alike
(`precision.keep_freed_memory`, what `train --keep-freed-memory` sets): the step then no longer pays for pages
returned to the kernel and faulted back, which otherwise costs the plain model a few percent and the GPT nothing.

Processes (`--processes`): each variant built and trained in a worker process of its own (spawned, the rounds still
interleaved by this one, one worker running at a time), as a training run has its process to itself. In one process
the models share glibc's heap, and what one model's step leaves there decides whether the next one's pages are
handed back to the kernel and faulted in again: on the developers' CPU the GPT took no page faults a step and the
plain model 2,000-5,700 when the two shared a process, where alone each takes thousands (issue 26, session 19).

Generation (`--generate`): tokens/s of cached generation under no_grad, 8 prompts of 32 tokens continued by 32:
the plain model (`extend` of the last token, then its logits) and the B=3 chain (each new token: one `denoise_next`
per block at sigma 80, 1, 0.05 with the estimate bridge, then every block's `extend`).

    python benchmarks/trunk_speed.py --threads 2 --repeats 15 --steps 5 --generate --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

try:
    import resource
except ImportError:  # not on Windows
    resource = None

import torch
import torch.nn.functional as F
from torch import nn

from diffusionblocks import precision
from diffusionblocks.models import arlm, mdlm, recurrent

ROOT = Path(__file__).resolve().parents[1]
VOCAB, WIDTH, DEPTH, HEADS, SEQ, BATCH = 65, 128, 6, 4, 64, 32


def load_before(commit: str) -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    """models/arlm.py and models/recurrent.py as they were at commit: the whole package of that commit extracted
    (`git archive`) into a temporary folder under the name `diffusionblocks_before` (its imports are relative)."""
    folder = Path(tempfile.mkdtemp(prefix="trunk-speed-before-"))
    archive = subprocess.run(["git", "archive", commit, "src/diffusionblocks"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    (folder / "src" / "diffusionblocks").rename(folder / "diffusionblocks_before")
    sys.path.insert(0, str(folder))
    return tuple(importlib.import_module(f"diffusionblocks_before.models.{m}") for m in ("arlm", "recurrent", "mdlm"))


class TextbookGPT(nn.Module):
    """nanoGPT's model without dropout or biases: wte + wpe, pre-LayerNorm blocks of causal attention and a 4x
    GELU MLP, a final LayerNorm, the head tied to wte."""

    class Block(nn.Module):
        def __init__(self, d: int, heads: int):
            super().__init__()
            self.heads = heads
            self.ln_1, self.ln_2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
            self.c_attn, self.c_proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
            self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            N, T, D = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(D, dim=2)
            q, k, v = (t.view(N, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))  # (N, H, T, d)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(N, T, D)
            x = x + self.c_proj(y)
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))

    def __init__(self, vocab: int, d: int, depth: int, heads: int, block: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.h = nn.ModuleList([self.Block(d, heads) for _ in range(depth)])
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=0.02)

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        x = self.wte(tokens) + self.wpe(torch.arange(T, device=tokens.device))
        for blk in self.h:
            x = blk(x)
        logits = self.lm_head(self.ln_f(x))[:, :-1]
        return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").mean(1)


def make_variants(before: tuple[types.ModuleType, ...] | None, multiple: int, device: torch.device,
                  before_multiple: int = 1, ablate: bool = False, batch: int = BATCH, only: str | None = None,
                  nanogpt: str | None = None):
    """name -> (model, loss closure on a batch, logits closure for the equality check, kind); the before-models'
    SwiGLU widths rounded to before_multiple (1: unrounded, as the code before issue 26 built them); the language
    models' batch of `batch` sequences (the masked-diffusion block's stays its preset's). only: that variant alone
    (no models for the equality check), as a worker process of `--processes` builds it. nanogpt: a nanoGPT checkout,
    whose GPT is timed too."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(VOCAB, (batch, SEQ), generator=g)
    sigma = torch.exp(torch.randn(batch, SEQ, generator=g) * 1.2 - 1.2)  # any noise levels: speed does not care
    noise = torch.randn(batch, SEQ, WIDTH, generator=g)
    E = F.normalize(torch.randn(VOCAB, WIDTH, generator=g), dim=-1)
    md_tokens = torch.randint(VOCAB, (64, 32), generator=g)
    md_t, md_u = torch.rand(64, generator=g), torch.rand(64, 32, generator=g)
    tokens, sigma, noise, E, md_tokens, md_t, md_u = (t.to(device) for t in (tokens, sigma, noise, E, md_tokens, md_t,
                                                                              md_u))

    def plain(mod, **kw):
        m = mod.CausalLM(VOCAB, depth=DEPTH, hidden_size=WIDTH, num_heads=HEADS, mlp_ratio=4.0, **kw)
        m.initialize_weights(torch.Generator().manual_seed(1))
        m.to(device)
        return m, lambda: m.loss(tokens), lambda: m(tokens)

    def block(mod, **kw):
        m = mod.ARDenoiser(VOCAB, depth=DEPTH // 3, hidden_size=WIDTH, num_heads=HEADS, mlp_ratio=4.0, **kw)
        m.initialize_weights(torch.Generator().manual_seed(2))
        m.to(device).E.copy_(E)
        return m, lambda: m.loss(tokens, sigma, noise), lambda: m.denoise(E[tokens] + sigma[..., None] * noise,
                                                                           sigma, tokens)[1]

    def rec(mod, **kw):
        m = mod.RecurrentDenoiser(VOCAB, prelude=2, core=4, coda=2, hidden_size=WIDTH, num_heads=HEADS, mlp_ratio=4.0,
                                  **kw)
        m.initialize_weights(torch.Generator().manual_seed(3))
        m.to(device).E.copy_(E)
        return m, lambda: m.loss(tokens, sigma, noise), lambda: m.denoise(E[tokens] + sigma[..., None] * noise,
                                                                           sigma, tokens)[1]

    def masked(mod, **kw):
        m = mod.MaskedDiffusionTransformer(VOCAB, 32, hidden_size=WIDTH, depth=DEPTH // 3, num_heads=HEADS)
        m.initialize_weights(torch.Generator().manual_seed(4))
        m.to(device)
        return m, lambda: m.loss(md_tokens, md_t, md_u), lambda: m(md_tokens, md_t)

    def wanted(name: str) -> bool:
        return only is None or name == only

    arlm_b, rec_b, mdlm_b = before or (None, None, None)
    timed, same = {}, {}  # same: kind -> (before-model, its logits, unrounded after-model, its logits)
    if wanted("gpt"):
        gpt = TextbookGPT(VOCAB, WIDTH, DEPTH, HEADS, SEQ).to(device)
        timed["gpt"] = (gpt, lambda: gpt.loss(tokens), None)
    if nanogpt is not None and wanted("nanogpt"):
        nano = nanogpt_model(nanogpt).to(device)
        targets = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -1)], 1)  # -1: nanoGPT's ignored target
        timed["nanogpt"] = (nano, lambda: nano(tokens, targets)[1], None)
    for kind, make, mod_b, mod_a in (("plain", plain, arlm_b, arlm), ("block", block, arlm_b, arlm),
                                     ("recurrent", rec, rec_b, recurrent), ("mdlm", masked, mdlm_b, mdlm)):
        if wanted(f"{kind}_after"):
            timed[f"{kind}_after"] = make(mod_a, **({} if kind == "mdlm" else {"mlp_multiple": multiple}))
        if mod_b is not None and wanted(f"{kind}_before"):
            kw = {} if kind == "mdlm" or before_multiple == 1 else {"mlp_multiple": before_multiple}
            timed[f"{kind}_before"] = make(mod_b, **kw)
            if only is None:
                same[kind] = (timed[f"{kind}_before"], make(mod_a, **kw))
    if ablate and (only is None or only.startswith("plain_without_")):
        timed.update({k: v for k, v in ablations(lambda: plain(arlm, mlp_multiple=multiple), arlm).items()
                      if wanted(k)})
    return timed, same


def nanogpt_model(checkout: str) -> nn.Module:
    """The GPT of a karpathy/nanoGPT checkout's model.py at the preset's size, without bias or dropout."""
    path = Path(checkout) / "model.py"
    if not path.is_file():
        raise SystemExit(f"--nanogpt: no model.py in {checkout}")
    spec = importlib.util.spec_from_file_location("nanogpt_checkout_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with torch.random.fork_rng():  # its initialisation draws from the global generator: seeded, and left as it was
        torch.manual_seed(0)
        return module.GPT(module.GPTConfig(block_size=SEQ, vocab_size=VOCAB, n_layer=DEPTH, n_head=HEADS,
                                           n_embd=WIDTH, dropout=0.0, bias=False))


class _GeluMLP(nn.Module):
    """The GPT's MLP in the place of SwiGLU (an ablation), with its output weight replaceable as SwiGLU's is."""

    def __init__(self, d: int):
        super().__init__()
        self.fc, self.w2 = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor, w2: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(F.gelu(self.fc(x)), self.w2.weight if w2 is None else w2)


def ablations(make_plain, arlm: types.ModuleType) -> dict[str, tuple]:
    """plain_without_PART -> (model, loss closure, None): the plain model with PART swapped for the GPT's, the swap
    made for the duration of each step (see the module's docstring)."""

    def unrotated_qkv(attn, x, pos):
        N, T, D = x.shape
        return tuple(t.view(N, T, attn.num_heads, -1).transpose(1, 2) for t in F.linear(x, attn.qkv.weight).split(D, 2))

    def layer_norm(x, shift, scale, eps=1e-6):
        return F.layer_norm(x, x.shape[-1:], 1 + scale, shift, eps)

    def fixed_modulation(layer, c):
        if not hasattr(layer, "fixed"):
            with torch.no_grad():
                layer.fixed = [tuple(t.clone() for t in layer.adaLN_modulation(c).chunk(6, dim=-1))]
        return layer.fixed

    out = {}
    each = ("rotary", "rmsnorm", "modulation", "swiglu")
    for parts in (*((p,) for p in each), each):
        model, loss, _ = make_plain()
        for layer in model.trunk.layers:
            if "modulation" in parts:
                layer.modulation = types.MethodType(fixed_modulation, layer)
            if "swiglu" in parts:
                layer.mlp = _GeluMLP(WIDTH).to(layer.attn.qkv.weight.device)
            if "rotary" in parts:
                layer.attn._qkv = types.MethodType(unrotated_qkv, layer.attn)

        def swapped(loss=loss, parts=parts):
            norm = arlm.modulated_rms_norm
            arlm.modulated_rms_norm = layer_norm if "rmsnorm" in parts else norm
            try:
                return loss()
            finally:
                arlm.modulated_rms_norm = norm

        out["plain_without_" + ("all" if len(parts) > 1 else parts[0])] = (model, swapped, None)
    return out


@torch.no_grad()
def generation_speed(arlm_modules: dict[str, types.ModuleType], multiple: int, device: torch.device,
                     repeats: int, before_multiple: int = 1) -> dict[str, float]:
    """Tokens/s of cached generation, before and after, interleaved (medians over repeats)."""
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(VOCAB, (8, 32), generator=g).to(device)
    E = F.normalize(torch.randn(VOCAB, WIDTH, generator=g), dim=-1).to(device)
    sigmas = (80.0, 1.0, 0.05)
    models = {}
    for when, mod in arlm_modules.items():
        m = before_multiple if when == "before" else multiple
        kw = {} if m == 1 else {"mlp_multiple": m}
        plain = mod.CausalLM(VOCAB, depth=DEPTH, hidden_size=WIDTH, num_heads=HEADS, mlp_ratio=4.0, **kw).eval()
        plain.initialize_weights(torch.Generator().manual_seed(1))
        plain.to(device)
        blocks = []
        for b in range(3):
            m = mod.ARDenoiser(VOCAB, depth=DEPTH // 3, hidden_size=WIDTH, num_heads=HEADS, mlp_ratio=4.0, **kw).eval()
            m.initialize_weights(torch.Generator().manual_seed(2 + b))
            m.to(device).E.copy_(E)
            blocks.append(m)
        models[when] = (mod, plain, blocks)

    def run_plain(mod, plain) -> None:
        cache = mod.KVCache(DEPTH)
        h = plain.trunk.extend(cache, prompt)[:, -1]
        for _ in range(32):
            h = plain.trunk.extend(cache, plain.next_logits(h).argmax(-1, keepdim=True))[:, -1]

    def run_chain(mod, blocks) -> None:
        caches = [mod.KVCache(DEPTH // 3) for _ in blocks]
        for m, c in zip(blocks, caches):
            m.trunk.extend(c, prompt)
        noise = torch.Generator().manual_seed(6)
        for _ in range(32):
            z = sigmas[0] * torch.randn(8, WIDTH, generator=noise).to(device)
            for b, (m, c) in enumerate(zip(blocks, caches)):
                D, logits = m.denoise_next(z, torch.full((8,), sigmas[b], device=device), c)
                z = D + (sigmas[b + 1] * torch.randn(8, WIDTH, generator=noise).to(device) if b + 1 < len(blocks)
                         else 0)
            token = logits.argmax(-1, keepdim=True)
            for m, c in zip(blocks, caches):
                m.trunk.extend(c, token)

    runs = {f"{kind}_{when}": (lambda f=f, a=a: f(*a))
            for when, (mod, plain, blocks) in models.items()
            for kind, f, a in (("plain", run_plain, (mod, plain)), ("chain", run_chain, (mod, blocks)))}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for name in runs:
        runs[name]()
    for r in range(repeats):
        names = list(runs)
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = _clock(device)
            runs[name]()
            times[name].append(_clock(device) - t0)
    return {k: 8 * 32 / statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def rounding_floor(model: nn.Module, logits, draws: int = 3) -> dict[str, float]:
    """max |logit| of `model` (logits: a closure) and the median over draws of max |delta logit| with every weight
    one ulp up or down (the weights restored after)."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    reference = logits()
    g = torch.Generator().manual_seed(0)
    moves = []
    for _ in range(draws):
        for p in model.parameters():
            up = torch.randint(0, 2, p.shape, generator=g, dtype=torch.bool).to(p.device)
            p.copy_(torch.nextafter(p, torch.where(up, torch.inf, -torch.inf).to(p.dtype)))
        moves.append(float((logits() - reference).abs().max()))
        model.load_state_dict(saved)
    return {"max_abs_logit": float(reference.abs().max()), "max_abs_delta_logit_one_ulp": statistics.median(moves)}


def adamw(model: nn.Module, device: torch.device, fused: bool = True) -> torch.optim.AdamW:
    """AdamW as `train.make_optimizer` makes it: its fused kernel on the CPU and CUDA (unless fused is False)."""
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0,
                             fused=True if fused and device.type in ("cpu", "cuda") else None)


def time_rounds(variants: dict[str, tuple], opts: dict[str, torch.optim.Optimizer], device: torch.device,
                repeats: int, steps: int, warmup: int, rewarm: int,
                report: bool = False) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """`interleave` of the variants (name -> (model, loss closure, ...)) all in this process: seconds and page
    faults per training step of each, one entry per round."""
    return interleave(list(variants), lambda name, untimed, timed: _turn(variants[name][1], opts[name], device,
                                                                         untimed, timed),
                      repeats, steps, warmup, rewarm, report)


def interleave(names: list[str], turn, repeats: int, steps: int, warmup: int, rewarm: int,
               report: bool = False) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """turn(name, untimed, timed) -> (seconds, minor page faults) per timed step, in rounds: `warmup` untimed steps
    each first, then `repeats` rounds in which every variant, in an order rotated each round, takes `rewarm` untimed
    steps and `steps` timed ones. Per variant, one entry per round: seconds, page faults. report: print each round's
    times."""
    for name in names:
        turn(name, warmup, 0)
    times: dict[str, list[float]] = {k: [] for k in names}
    faults: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate, so that no variant always runs first
            # rewarm: untimed, so that caches are warm again after the other variants ran
            seconds, pages = turn(name, rewarm, steps)
            times[name].append(seconds)
            faults[name].append(pages)
        if report:
            print(f"round {r + 1}/{repeats}: " + "  ".join(f"{k} {1e3 * times[k][-1]:.1f}" for k in names),
                  flush=True)
    return times, faults


def _turn(loss, opt: torch.optim.Optimizer, device: torch.device, untimed: int,
          timed: int) -> tuple[float, float] | None:
    """`untimed` training steps, then `timed` ones: seconds and minor page faults of this process per timed step
    (None if none timed)."""

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss().mean().backward()
        opt.step()

    for _ in range(untimed):
        step()
    if not timed:
        return None
    f0, t0 = _minor_faults(), _clock(device)
    for _ in range(timed):
        step()
    seconds = _clock(device) - t0
    return seconds / timed, (_minor_faults() - f0) / timed


def _minor_faults() -> int:
    """Minor page faults of this process so far (pages the kernel mapped in on first touch); 0 where unknown."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def _worker(conn, name: str, spec: dict) -> None:
    """One variant in a process of its own (`--processes`): built as in the parent, then turns on request ((untimed,
    timed) -> `_turn`'s seconds and page faults per step); on None, its model's weights back, for the equality
    check."""
    precision.flush_denormals()
    if spec["keep_freed_memory"]:
        precision.keep_freed_memory()
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    before = load_before(spec["base"]) if name.endswith("_before") else None
    variants, _ = make_variants(before, spec["mlp_multiple"], device, spec["before_multiple"], spec["ablate"],
                                only=name, nanogpt=spec["nanogpt"])
    model, loss = variants[name][:2]
    del variants
    opt = adamw(model, device, spec["fused"])
    conn.send("built")
    while (cmd := conn.recv()) is not None:
        conn.send(_turn(loss, opt, device, *cmd))
    conn.send({k: v.cpu().numpy() for k, v in model.state_dict().items()})  # arrays: tensors would go as shared memory


class _Workers:
    """A worker process per variant (spawned: each with its own allocator, as a training run has), driven one at a
    time by `interleave` (the others wait, idle, for their turn)."""

    def __init__(self, names: list[str], spec: dict):
        ctx = multiprocessing.get_context("spawn")
        self.pipes, self.procs = {}, {}
        for name in names:
            ours, theirs = ctx.Pipe()
            self.procs[name] = ctx.Process(target=_worker, args=(theirs, name, spec), daemon=True)
            self.procs[name].start()
            self.pipes[name] = ours
        for name in names:
            if self.pipes[name].recv() != "built":
                raise RuntimeError(f"worker for {name} failed")

    def turn(self, name: str, untimed: int, timed: int) -> tuple[float, float] | None:
        self.pipes[name].send((untimed, timed))
        return self.pipes[name].recv()

    def close(self) -> dict[str, dict[str, torch.Tensor]]:
        """Stops the workers; their models' weights."""
        weights = {}
        for name, pipe in self.pipes.items():
            pipe.send(None)
            weights[name] = {k: torch.from_numpy(v) for k, v in pipe.recv().items()}
            self.procs[name].join()
        return weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=15, help="interleaved rounds; each times every variant")
    ap.add_argument("--steps", type=int, default=5, help="training steps per variant per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    ap.add_argument("--adamw", choices=("fused", "foreach"), default="fused", help="AdamW's kernels, every variant")
    ap.add_argument("--rewarm", type=int, default=1, help="untimed steps before each variant's turn in a round")
    ap.add_argument("--base", default="97c5b76", help="the commit whose code is 'before'")
    ap.add_argument("--mlp-multiple", type=int, default=16,
                    help="model.mlp_multiple of the after-models (the presets')")
    ap.add_argument("--before-multiple", type=int, default=1,
                    help="model.mlp_multiple of the before-models (1: unrounded; 16 for a base after issue 26's "
                         "rounding, to time the code alone)")
    ap.add_argument("--only", nargs="*", help="variants to time (default: all)")
    ap.add_argument("--ablate", action="store_true", help="also the plain model without each of its parts "
                                                                "(the module's docstring)")
    ap.add_argument("--generate", action="store_true", help="also time cached generation, before and after")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="glibc's allocator keeps freed memory (as `train --keep-freed-memory`), for every variant")
    ap.add_argument("--processes", action="store_true",
                    help="each variant in a worker process of its own, the rounds still interleaved "
                         "(the module's docstring)")
    ap.add_argument("--nanogpt", metavar="DIR", help="also time the GPT of this karpathy/nanoGPT checkout (model.py)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    if args.only and "nanogpt" in args.only and not args.nanogpt:
        ap.error("--only nanogpt needs --nanogpt DIR, a karpathy/nanoGPT checkout")
    precision.flush_denormals()  # as training does, before torch's worker threads start
    if args.keep_freed_memory and not precision.keep_freed_memory():
        ap.error("--keep-freed-memory: the C library is not glibc")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        base = subprocess.run(["git", "rev-parse", args.base], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.strip()
        before = load_before(base)
    except (OSError, subprocess.CalledProcessError):  # a copy of the tree without its history (a device machine)
        print(f"no git history of {args.base} here: timing the working tree's code only", flush=True)
        base, before = None, None
    device = torch.device(args.device)
    variants, same = make_variants(before, args.mlp_multiple, device, args.before_multiple, args.ablate,
                                   nanogpt=args.nanogpt)
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only}
    if args.processes:
        spec = {"threads": args.threads, "device": args.device, "keep_freed_memory": args.keep_freed_memory,
                "base": base, "mlp_multiple": args.mlp_multiple, "before_multiple": args.before_multiple,
                "ablate": args.ablate, "fused": args.adamw == "fused", "nanogpt": args.nanogpt}
        workers = _Workers(list(variants), spec)
        times, faults = interleave(list(variants), workers.turn, args.repeats, args.steps, args.warmup, args.rewarm,
                                   report=True)
        for name, weights in workers.close().items():  # the timed models' weights, for the equality check below
            variants[name][0].load_state_dict(weights)
    else:
        opts = {k: adamw(m, device, args.adamw == "fused") for k, (m, _, _) in variants.items()}
        times, faults = time_rounds(variants, opts, device, args.repeats, args.steps, args.warmup, args.rewarm,
                                    report=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    load = _load_average()
    out: dict = {"machine": {"cpu": _cpu_model(), "torch": torch.__version__, "python": platform.python_version(),
                             "threads": args.threads, "device": _device_name(device), "load_average_after": load},
                 "base_commit": base, "kept_freed_memory": precision.kept_freed_memory, "processes": args.processes,
                 "mlp_multiple": args.mlp_multiple, "before_multiple": args.before_multiple, "repeats": args.repeats,
                 "steps_per_repeat": args.steps, "rewarm_steps": args.rewarm, "adamw": args.adamw, "batch": BATCH, "seq_len": SEQ, "width": WIDTH, "heads": HEADS,
                 "median_step_ms": {k: 1e3 * v for k, v in med.items()},
                 "steps_per_s": {k: 1 / v for k, v in med.items()},
                 "iqr_step_ms": {k: [1e3 * q for q in _quartiles(v)] for k, v in times.items()},
                 "minor_page_faults_per_step": {k: statistics.median(v) for k, v in faults.items()},
                 "params": {k: sum(p.numel() for p in m.parameters()) for k, (m, _, _) in variants.items()}}
    ratios = {}
    if "gpt" in med:
        for k in ("plain_before", "plain_after", *(k for k in med if k.startswith("plain_without_"))):
            if k in med:
                ratios[f"{k}/gpt"] = med[k] / med["gpt"]
                # the same ratio within each round (the pair ran a few seconds apart), its median over the rounds
                ratios[f"{k}/gpt, median of rounds"] = statistics.median(a / b for a, b in zip(times[k], times["gpt"]))
    if "nanogpt" in med:
        for k in ("gpt", "plain_after"):
            if k in med:
                ratios[f"{k}/nanogpt"] = med[k] / med["nanogpt"]
    for kind in ("plain", "block", "recurrent", "mdlm"):
        if f"{kind}_before" in med and f"{kind}_after" in med:
            ratios[f"{kind} speed-up (before/after step time)"] = med[f"{kind}_before"] / med[f"{kind}_after"]
    out["ratios"] = ratios
    # The same weights in both codes: the trained after-model's, where shapes agree, in an unrounded after-model,
    # which is then loaded strictly into the before-model (so the names and shapes of the weights are unchanged).
    delta, floor = {}, {}
    for kind, ((old, _, old_logits), (new, _, new_logits)) in same.items():
        if f"{kind}_after" not in variants:
            continue
        trained = variants[f"{kind}_after"][0].state_dict()
        state = new.state_dict()
        new.load_state_dict({k: trained[k] if trained[k].shape == v.shape else v for k, v in state.items()})
        old.load_state_dict(new.state_dict())
        old.eval(), new.eval()
        with torch.no_grad():
            delta[kind] = float((old_logits() - new_logits()).abs().max())
        floor[kind] = rounding_floor(new, new_logits)
    out["max_abs_delta_logit_fp32"] = delta
    out["rounding_floor_logit_fp32"] = floor
    if args.generate and before is not None:
        out["generated_tokens_per_s"] = gen = generation_speed({"before": before[0], "after": arlm}, args.mlp_multiple,
                                                               device, max(3, args.repeats // 2), args.before_multiple)
        for kind in ("plain", "chain"):
            ratios[f"{kind} generation speed-up (after/before tokens/s)"] = gen[f"{kind}_after"] / gen[f"{kind}_before"]
    shown = ("machine", "median_step_ms", "steps_per_s", "minor_page_faults_per_step", "ratios",
             "max_abs_delta_logit_fp32", "rounding_floor_logit_fp32", "params", "generated_tokens_per_s")
    print(json.dumps({k: out[k] for k in shown if k in out}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


def _clock(device: torch.device) -> float:
    """Wall time, after the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()


def _load_average() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def _quartiles(v: list[float]) -> list[float]:
    q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
    return [q[0], q[2]]


def _cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
