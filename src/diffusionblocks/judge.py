"""The independent judge of generated text, and MAUVE on its features.

The judge is a plain causal language model (task arlm, model.mode "plain", B=1) of presets/shakespeare-judge.json's
sizes, larger than the compared models and trained longer, on the training split of the compared run's own data
section: same corpus, format and tokenizer, so its vocabulary is the run's. It is never one of the compared runs.

It is a run directory like any other, cached under `<cache>/judges/<name>-<key16>/` (cache: --cache-dir, else
$DIFFUSIONBLOCKS_CACHE, else ~/.cache/diffusionblocks), where the key is the sha256 of the judge's config (minus the
fields that do not change its weights) and of a fingerprint of the data (its vocabulary and training tokens). A
missing judge is trained on demand by the library's training loop (`train.train`, as `diffusionblocks train` runs
it) into the sibling `.<name>-<key16>.building/` (resumed from its checkpoints if a build was interrupted), then
renamed into place: a cache entry is complete or absent. Its `judge.json` records the key, the data fingerprint, the
steps and the judge's held-out bits per token on every held-out window, measured once after training. A run trained
elsewhere with the same config (`diffusionblocks train --config presets/shakespeare-judge.json`) joins the cache
through `install_judge`.

What the judge measures (`text_quality`): the generative bits per token of continuations under it (their
perplexity), MAUVE (Pillutla et al., 2021; the `mauve-text` package) between the judge's features of generated and
held-out continuations of the same prompts, distinct n-grams and the longest repeated run; `mauve_bounds` gives
MAUVE's ceiling (held-out text against other held-out text) and floor (unigram draws) on the same features.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, extras, rundir
from .config import ConfigError, RunConfig
from .latents import compute_device, default_cache_dir
from .models.arlm import CausalLM
from .pretrained import from_pretrained
from .report import markdown_table
from .seeding import make_generator
from .tasks import config_from_dict, get_task, read_config
from .text import VOCAB_FILE, TextSplits, TokenStream, held_out_windows, load_vocabulary, vocabulary_difference
from .train import train

logger = logging.getLogger(__name__)

JUDGE_FILE = "judge.json"
JUDGE_FORMAT = "diffusionblocks-judge/1"
JUDGE_TASK = "arlm"  # a judge is this task's plain causal model, whatever task the run it judges has

# presets/shakespeare-judge.json without its data section (the compared run's goes there); a test keeps them equal.
JUDGE_PRESET: dict[str, Any] = {
    "name": "shakespeare-judge",
    "task": JUDGE_TASK,
    "model": {"mode": "plain", "vocab_size": 65, "seq_len": 128, "hidden_size": 192, "depth": 6, "num_heads": 6,
              "mlp_ratio": 4.0, "mlp_multiple": 16},
    "blocks": {"num_blocks": 1, "partition": "equiprobable", "gamma": 0.1},
    "train": {"schedule": "sequential", "steps_per_block": 3000, "batch_size": 32, "lr": 1e-3, "lr_warmup_steps": 100,
              "weight_decay": 0.1, "ema_halflife_steps": 200, "log_every": 50, "checkpoint_every": 500},
    "sample": {"steps": 0, "bridge": "sample", "temperature": 0.8, "top_p": 0.95, "num": 4, "new_chars": 200,
               "prompt_chars": 32},
}

# Fields of the judge's config that do not change what it learns: left out of its key.
_NOT_IN_KEY = {"": ("name", "sample"), "data": ("path", "paths"),
               "train": ("log_every", "checkpoint_every", "compile", "data_on_device", "activation_checkpointing",
                         "blocks_to_train", "precision")}


class Judge(nn.Module):
    """A plain causal LM (a CausalLM: tokens -> logits, and `hidden`) and the longest context it was trained on
    (`window` tokens)."""

    def __init__(self, lm: nn.Module, window: int):
        super().__init__()
        self.lm, self.window = lm, int(window)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N, L <= window) -> next-token logits (N, L, V)."""
        return self.lm(tokens)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N, L <= window) -> final normalised hidden states (N, L, D)."""
        return self.lm.hidden(tokens)


# ---- the judge's run: config, key, cache


def judge_run_config(cfg: RunConfig, judge_config: dict[str, Any] | None = None) -> RunConfig:
    """The judge's config for the run `cfg`: `judge_config` (default JUDGE_PRESET) with the run's data section, a
    vocabulary at least the preset's, as a plain arlm run."""
    if not dataclasses.is_dataclass(getattr(cfg, "data", None)) or not hasattr(cfg.data, "tokenizer"):
        raise ConfigError(f"the independent judge scores text: task {cfg.task!r} has no text data section")
    d = copy.deepcopy(judge_config if judge_config is not None else JUDGE_PRESET)
    d["data"] = dataclasses.asdict(cfg.data)
    d.setdefault("model", {})
    d["model"]["vocab_size"] = max(int(d["model"].get("vocab_size", 0)), int(cfg.model.vocab_size))
    plain = d["model"].get("mode") == "plain" and d.get("blocks", {}).get("num_blocks", 1) == 1
    if d.get("task") != JUDGE_TASK or not plain:
        raise ConfigError(f"a judge config is a plain causal LM: task {JUDGE_TASK!r}, model.mode 'plain', "
                          "blocks.num_blocks 1")
    return config_from_dict(d)


def data_fingerprint(data: TextSplits) -> str:
    """sha256 hex digest of the vocabulary's JSON and the training tokens' int64 bytes."""
    digest = hashlib.sha256(data.vocab.to_json().encode())
    digest.update(data.train.tokens.to("cpu", torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _keyed(jcfg: RunConfig) -> dict[str, Any]:
    """The judge's config as a dict, without the fields in _NOT_IN_KEY and without those at their class's default, so
    that a field added to the config later (with a default that keeps what older code did) leaves keys as they were
    (a default changed later changes no key either: a change of what a judge is then needs a new JUDGE_FORMAT)."""
    d = jcfg.to_dict()
    for section, names in _NOT_IN_KEY.items():
        where = d if not section else d.get(section, {})
        for name in names:
            where.pop(name, None)
    return _without_defaults(d, type(jcfg)().to_dict())


def _without_defaults(d: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    """d without the entries equal to default's (recursively in sections)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and isinstance(default.get(k), dict):
            v = _without_defaults(v, default[k])
            if v:
                out[k] = v
        elif k not in default or default[k] != v:
            out[k] = v
    return out


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}."""
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def judge_key(jcfg: RunConfig, fingerprint: str) -> str:
    """sha256 hex digest of the judge's config (the fields that change its weights) and the data's fingerprint."""
    text = json.dumps({"config": _keyed(jcfg), "data": fingerprint}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def judge_dir(jcfg: RunConfig, key: str, cache_dir: str | Path | None = None) -> Path:
    """The cache entry <cache>/judges/<name>-<key16>."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in jcfg.name)
    return Path(cache_dir or default_cache_dir()) / "judges" / f"{safe}-{key[:16]}"


def _device(module: nn.Module) -> torch.device:
    """Where the module's parameters are (the CPU when it has none)."""
    return next(module.parameters(), torch.empty(0)).device


@torch.no_grad()
def held_out_bits(judge: Judge, windows: torch.Tensor, batch_size: int = 64) -> float:
    """Bits per token of each held-out window's tokens 1..L-1 given those before (what `next_token_bits` of
    chain_likelihood.py gives for a plain run)."""
    total, count = 0.0, 0
    device = _device(judge)
    for i in range(0, len(windows), batch_size):
        x = windows[i:i + batch_size].to(device)
        ce = F.cross_entropy(judge(x)[:, :-1].transpose(1, 2), x[:, 1:], reduction="sum")
        total, count = total + float(ce), count + x[:, 1:].numel()
    return total / max(count, 1) / math.log(2)


def _load(run_dir: Path, device: str | torch.device | None) -> tuple[Judge, RunConfig]:
    model, jcfg = from_pretrained(run_dir, compute_device(device))
    if not isinstance(model.blocks[0], CausalLM):
        raise ConfigError(f"judge {str(run_dir)!r}: a judge is a plain run (task arlm, model.mode='plain'), not a "
                          f"{jcfg.blocks.num_blocks}-block chain of {jcfg.task!r}")
    return Judge(model.blocks[0], jcfg.model.seq_len).eval(), jcfg


def _record(run_dir: Path, jcfg: RunConfig, data: TextSplits, key: str, fingerprint: str,
            device: str | torch.device) -> dict[str, Any]:
    """judge.json of a trained judge run: its key, data, steps and held-out bits on every held-out window."""
    judge, _ = _load(run_dir, device)
    windows = held_out_windows(data.test, jcfg.model.seq_len)
    bits = held_out_bits(judge, windows)
    info = {"format": JUDGE_FORMAT, "key": key, "data_fingerprint": fingerprint, "name": jcfg.name,
            "steps": checkpoint.block_step(run_dir, 0), "held_out_windows": len(windows), "seq_len": jcfg.model.seq_len,
            "held_out_bits_per_token": bits, "held_out_bpc": bits / data.test.chars_per_token}
    (run_dir / JUDGE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def _read_record(entry: Path, key: str) -> dict[str, Any] | None:
    try:
        info = json.loads((entry / JUDGE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if info.get("format") == JUDGE_FORMAT and info.get("key") == key else None


def _check_vocabulary(judge_run: Path, run_dir: str | Path | None) -> None:
    """A judge reads the run's ids as the run's tokens: their vocab.json must be equal."""
    if run_dir is None:
        return
    difference = vocabulary_difference(Path(run_dir) / VOCAB_FILE, Path(judge_run) / VOCAB_FILE)
    if difference is not None:
        raise ConfigError(f"--judge {judge_run}: its vocabulary is not the run's: {difference}")


def _judge_data(cfg: RunConfig, judge_config: dict[str, Any] | None) -> tuple[RunConfig, TextSplits, str, str]:
    jcfg = judge_run_config(cfg, judge_config)
    data = get_task(JUDGE_TASK).load_data(jcfg)
    fingerprint = data_fingerprint(data)
    return jcfg, data, fingerprint, judge_key(jcfg, fingerprint)


def load_or_train_judge(cfg: RunConfig, *, cache_dir: str | Path | None = None, device: str | torch.device = "cpu",
                        progress: bool = False, judge_config: dict[str, Any] | None = None,
                        run_dir: str | Path | None = None) -> tuple[Judge, dict[str, Any]]:
    """The independent judge of the run `cfg` (trained on its data section's training split), from the cache, trained
    and cached first if missing. run_dir: the judged run, whose vocab.json the judge's must equal.

    Returns (judge in eval mode, its judge.json with "run": the entry and "cached": whether it was there)."""
    device = compute_device(device)
    jcfg, data, fingerprint, key = _judge_data(cfg, judge_config)
    entry = judge_dir(jcfg, key, cache_dir)
    info = _read_record(entry, key)
    cached = info is not None
    if not cached:
        if entry.exists():
            raise ConfigError(f"{str(entry)!r} exists but is not a judge of this key (no valid {JUDGE_FILE}); move it "
                              "away and run again")
        info = _build_entry(jcfg, data, entry, key, fingerprint, device, progress)
        cached = info.pop("cached")
    _check_vocabulary(entry, run_dir)
    judge, _ = _load(entry, device)
    return judge, {**info, "run": str(entry), "cached": cached}


def _build_entry(jcfg: RunConfig, data: TextSplits, entry: Path, key: str, fingerprint: str,
                 device: str | torch.device, progress: bool) -> dict[str, Any]:
    """Trains the judge in the sibling `.<entry>.building` under its block lock (one process builds it; another is
    told so), records it, and renames it into `entry`; returns its judge.json, "cached": whether another process
    finished it first."""
    building = entry.parent / f".{entry.name}.building"
    building.mkdir(parents=True, exist_ok=True)
    claims = rundir.BlockClaims(building)
    try:
        claims.claim(0)
    except ConfigError:
        raise ConfigError(f"another process is building this judge in {building}: wait for it to end") from None
    try:
        info = _read_record(entry, key)
        if info is not None:  # finished by another process while this one waited
            shutil.rmtree(building, ignore_errors=True)
            return {**info, "cached": True}
        _build(jcfg, data, building, device, progress)
        info = _record(building, jcfg, data, key, fingerprint, device)
        os.rename(building, entry)  # the entry appears complete, or not at all
        rundir.block_lock_path(entry, 0).unlink(missing_ok=True)  # the lock came along; it is released below
    finally:
        claims.release()
    logger.info("independent judge %s: held-out BPC %.4f after %d steps", entry, info["held_out_bpc"], info["steps"])
    return {**info, "cached": False}


def _build(jcfg: RunConfig, data: TextSplits, building: Path, device: str | torch.device, progress: bool) -> None:
    """Trains the judge in `building` (its block 0 claimed by the caller): resumed when it holds this config's
    checkpoints, started afresh otherwise; left only when a checkpoint was written (a later call resumes it)."""
    task = get_task(JUDGE_TASK)
    try:
        resumable = read_config(building).to_dict() == jcfg.to_dict()
    except ConfigError:
        resumable = False
    if resumable:
        logger.info("resuming the judge's interrupted build in %s", building)
    else:
        for path in building.iterdir():  # what another config left, all but the lock this process holds
            if path.is_dir():
                shutil.rmtree(path)
            elif path != rundir.block_lock_path(building, 0):
                path.unlink()
    try:
        rundir.save_config(building, jcfg)
        task.prepare_run(jcfg, building, data)
        logger.info("training the independent judge (%d layers, width %d, %d steps) in %s", jcfg.model.depth,
                    jcfg.model.hidden_size, jcfg.train.steps_per_block, building)
        train(task, jcfg, data.train, building, device=device, progress=progress, claim=False)
    except BaseException:
        if checkpoint.block_step(building, 0) is None and not rundir.block_state_path(building, 0).exists():
            shutil.rmtree(building, ignore_errors=True)
        raise


def install_judge(run: str | Path, cfg: RunConfig, cache_dir: str | Path | None = None, *,
                  device: str | torch.device = "cpu", judge_config: dict[str, Any] | None = None) -> Path:
    """Copies a judge trained elsewhere (e.g. `diffusionblocks train --config presets/shakespeare-judge.json`) into
    the cache entry of the run `cfg`, after checking that it is that judge: a plain run of the judge's config on the
    same data, trained to its last step, with the vocabulary the data gives. Returns the entry."""
    run = Path(run)
    jcfg, data, fingerprint, key = _judge_data(cfg, judge_config)
    their_cfg = read_config(run)
    mine, theirs = _flat(_keyed(jcfg)), _flat(_keyed(their_cfg))
    differs = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if differs:
        raise ConfigError(f"{str(run)!r} is not the judge of this data: its config differs in "
                          + ", ".join(f"{k} ({theirs.get(k)!r}, the judge's: {mine.get(k)!r})" for k in differs))
    if load_vocabulary(run / VOCAB_FILE) != data.vocab:
        raise ConfigError(f"{str(run)!r}: its vocabulary is not the one the run's data section gives")
    if data_fingerprint(get_task(JUDGE_TASK).load_run_data(their_cfg, run)) != fingerprint:
        raise ConfigError(f"{str(run)!r} was trained on other text ({their_cfg.data.path!r}) than the run's "
                          f"({jcfg.data.path!r})")
    step = checkpoint.block_step(run, 0)
    if step is None or step < jcfg.train.steps_per_block:
        raise ConfigError(f"{str(run)!r} is not trained to the end ({step or 0} of {jcfg.train.steps_per_block} steps)")
    entry = judge_dir(jcfg, key, cache_dir)
    if _read_record(entry, key) is not None:
        raise ConfigError(f"the cache already has this judge: {entry}")
    building = entry.parent / f".{entry.name}.installing"
    shutil.rmtree(building, ignore_errors=True)
    try:
        shutil.copytree(run, building, ignore=shutil.ignore_patterns("*.lock", "*.state.pt", "eval-*"))
        _record(building, jcfg, data, key, fingerprint, device)
        os.rename(building, entry)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return entry


def explicit_judge(run: str | Path, *, run_dir: str | Path | None = None,
                   device: str | torch.device = "cpu") -> tuple[Judge, dict[str, Any]]:
    """A judge run named by the user (`--judge RUN`): a plain run whose vocabulary is the judged run's. Its held-out
    bits come from its judge.json, or are measured now on every window of its own held-out split."""
    run = Path(run)
    judge, jcfg = _load(run, device)
    _check_vocabulary(run, run_dir)
    try:
        info = json.loads((run / JUDGE_FILE).read_text())
    except (OSError, ValueError):
        data = get_task(JUDGE_TASK).load_run_data(jcfg, run)
        windows = held_out_windows(data.test, jcfg.model.seq_len)
        bits = held_out_bits(judge, windows)
        info = {"name": jcfg.name, "steps": checkpoint.block_step(run, 0), "held_out_windows": len(windows),
                "seq_len": jcfg.model.seq_len, "held_out_bits_per_token": bits,
                "held_out_bpc": bits / data.test.chars_per_token}
    return judge, {**info, "run": str(run), "cached": False}


def resolve_judge(spec: str | None, cfg: RunConfig, run_dir: str | Path, *, cache_dir: str | Path | None = None,
                  device: str | torch.device = "cpu", progress: bool = False) -> tuple[Judge | None, dict | None]:
    """`--judge`: "auto" (or None) the cached independent judge of the run's data, "none" no judge, else a run."""
    if spec is not None and spec.lower() == "none":
        return None, None
    if spec is None or spec == "auto":
        return load_or_train_judge(cfg, cache_dir=cache_dir, device=device, progress=progress, run_dir=run_dir)
    if Path(spec).resolve() == Path(run_dir).resolve():
        raise ConfigError(f"--judge {spec}: the judged run cannot judge itself")
    return explicit_judge(spec, run_dir=run_dir, device=device)


def prepare_judging(spec: str | None, cfg: RunConfig, run_dir: str | Path, test: TokenStream, *, mauve_prompts: int,
                    prompt_len: int, new: int, cache_dir: str | Path | None = None,
                    device: str | torch.device | None = None,
                    progress: bool = False) -> tuple[Judge | None, dict | None, torch.Tensor | None]:
    """What an evaluation judges with: (the judge, its judge.json, the held-out reference continuations for MAUVE).
    What MAUVE needs (mauve-text, enough held-out text) is checked before a judge is trained; mauve_prompts 0, or
    no judge, means no reference."""
    reference = None
    if mauve_prompts > 0 and (spec is None or spec.lower() != "none"):
        require_mauve()
        reference, _, _ = held_out_continuations(test, mauve_prompts, prompt_len, new)
    judge, info = resolve_judge(spec, cfg, run_dir, cache_dir=cache_dir, device=device, progress=progress)
    return judge, info, reference


# ---- what the judge measures


def _segments(T: int, prompt_len: int, window: int) -> Iterator[tuple[int, int]]:
    """(start s, first scored position t) of each forward pass over texts[:, s:s + window]: every position from
    prompt_len on is scored once, with at least window / 2 tokens before it (or all there are)."""
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be at least 1 (the first token has no context), got {prompt_len}")
    t = prompt_len
    while t < T:
        s = max(0, t - window // 2)
        yield s, t
        t = min(s + window, T)


@torch.no_grad()
def generative_bits(judge: Judge, ids: torch.Tensor, prompt_len: int, batch_size: int = 50) -> float:
    """Bits per token of the continuations, ids (N, T) after their first prompt_len >= 1 tokens, under the judge:
    -mean log2 p_judge(x_t | x_<t) over t >= prompt_len (the log of their generative perplexity)."""
    N, T = ids.shape
    device = _device(judge)
    total, count = 0.0, 0
    for s, t in _segments(T, prompt_len, judge.window):
        seg = ids[:, s:s + judge.window].to(device)  # (N, w)
        logits = torch.cat([judge(seg[i:i + batch_size]) for i in range(0, N, batch_size)])  # (N, w, V)
        lo = t - s
        ce = F.cross_entropy(logits[:, lo - 1:-1].transpose(1, 2).float(), seg[:, lo:], reduction="sum")
        total, count = total + float(ce), count + seg[:, lo:].numel()
    return total / max(count, 1) / math.log(2)


@torch.no_grad()
def features(judge: Judge, ids: torch.Tensor, prompt_len: int, batch_size: int = 50) -> torch.Tensor:
    """(N, D) float32 on the CPU: the judge's final normalised hidden state at each continuation position (ids[:, t],
    t >= prompt_len, read with the prompt and at least window / 2 tokens before it as context, as generative_bits
    reads it), averaged over the continuation.

    The mean of the states the judge's head reads, rather than the last one: a text's MAUVE feature should describe
    the whole continuation (GPT-2's last state, MAUVE's default, summarises a sequence because GPT-2 was trained on
    much longer contexts than a continuation; a 6-layer character model's last state is mostly about the next few
    characters)."""
    N, T = ids.shape
    device = _device(judge)
    total = None
    for s, t in _segments(T, prompt_len, judge.window):
        seg = ids[:, s:s + judge.window].to(device)
        h = torch.cat([judge.hidden(seg[i:i + batch_size]).float() for i in range(0, N, batch_size)])  # (N, w, D)
        part = h[:, t - s:].sum(1)  # (N, D): the positions this pass scores
        total = part if total is None else total + part
    if total is None:
        raise ValueError(f"ids of length {T} have no continuation after prompt_len={prompt_len}")
    return (total / (T - prompt_len)).cpu()


def require_mauve(flag: str = "--mauve-prompts 0") -> None:
    """Stops before any work when mauve-text is missing, naming the extra that installs it and how to do without."""
    if not extras.installed("mauve"):
        raise ConfigError(f"MAUVE needs mauve-text and faiss-cpu: pip install -e '.[mauve]' (or pass {flag} to "
                          "measure without it)")


def mauve_score(p_feats: torch.Tensor, q_feats: torch.Tensor, *, num_buckets: str | int = "auto",
                seed: int = 0) -> dict[str, Any]:
    """MAUVE between two sets of features (N_p, D) and (N_q, D) by `mauve.compute_mauve` (PCA to 90% of the
    variance, k-means into num_buckets clusters, "auto": min(N_p, N_q) / 10, the area under the divergence curve);
    returns {"mauve", "frontier_integral", "num_p", "num_q", "clusters"}."""
    if len(p_feats) < 2 or len(q_feats) < 2 or p_feats.shape[1:] != q_feats.shape[1:]:
        raise ValueError(f"MAUVE needs two sets of at least 2 features of one width, got {tuple(p_feats.shape)} and "
                         f"{tuple(q_feats.shape)}")
    mauve = extras.load("mauve", "MAUVE")
    out = mauve.compute_mauve(p_features=np.asarray(p_feats, dtype=np.float32),
                              q_features=np.asarray(q_feats, dtype=np.float32), num_buckets=num_buckets,
                              seed=seed, verbose=False, device_id=-1)
    return {"mauve": float(out.mauve), "frontier_integral": float(out.frontier_integral), "num_p": len(p_feats),
            "num_q": len(q_feats), "clusters": int(out.num_buckets)}


def distinct_n(texts: list, n: int) -> float:
    """Distinct n-grams over all n-grams of the texts (pooled): 1 = no n-gram repeats. A text is a string or a
    sequence of token ids."""
    grams = [tuple(t[i:i + n]) for t in texts for i in range(len(t) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def longest_repeated_run(text, max_unit: int = 16) -> int:
    """Characters (tokens) covered by the longest stretch of one unit (1 to max_unit of them) repeated back to back
    at least twice: 'abababx' -> 6, 'aaaa' -> 4, no repetition -> 0."""
    best = 0
    for u in range(1, max_unit + 1):
        run = 0
        for i in range(u, len(text)):
            run = run + 1 if text[i] == text[i - u] else 0
            if run >= u:  # at least two copies of the unit
                best = max(best, run + u)
    return best


def text_quality(judge: Judge, generated_ids: torch.Tensor, reference_ids: torch.Tensor, prompt_len: int, *,
                 seed: int = 0, num_buckets: str | int = "auto",
                 reference_features: torch.Tensor | None = None, chars_per_token: float = 1.0) -> dict[str, Any]:
    """Generated continuations (N, P + new) against held-out ones of the same prompts (M, P + new): their bits per
    character (bits per token / chars_per_token: 1 for characters, the held-out split's for a BPE) and perplexity
    per character under the judge, MAUVE on the judge's features (with its sample counts and clusters), and
    distinct 2- and 4-grams and the longest repeated run of the generated continuations (over token ids).
    reference_features: features(judge, reference_ids, prompt_len), when already computed."""
    if generated_ids.shape[1] != reference_ids.shape[1]:
        raise ValueError(f"generated and reference continuations differ in length: {generated_ids.shape[1]} vs "
                         f"{reference_ids.shape[1]} tokens")
    bits = generative_bits(judge, generated_ids, prompt_len) / chars_per_token
    rows = [row.tolist() for row in generated_ids[:, prompt_len:].cpu()]
    runs = [longest_repeated_run(r) for r in rows]
    return {"gen_bits": bits, "gen_ppl": 2 ** bits,
            **mauve_score(features(judge, generated_ids, prompt_len),
                          features(judge, reference_ids, prompt_len) if reference_features is None
                          else reference_features, num_buckets=num_buckets, seed=seed),
            "distinct_2": distinct_n(rows, 2), "distinct_4": distinct_n(rows, 4),
            "longest_run_mean": sum(runs) / len(runs), "longest_run_max": max(runs),
            "num": len(generated_ids), "prompt_len": prompt_len, "new": generated_ids.shape[1] - prompt_len}


def held_out_continuations(test: TokenStream, num: int, prompt_len: int,
                           new: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Two sets of num held-out windows of prompt_len + new tokens, (num, prompt_len + new) each: the reference
    (starts k * stride, stride = (n - L) // num, spread over the split) and the ceiling's other set (starts half a
    stride later), and the fraction of the other set's continuation tokens that also lie in a reference continuation
    (0 when the split holds 2 * num disjoint windows; tinyshakespeare's 111k characters at 500 x 160 do not)."""
    L, n = prompt_len + new, len(test.tokens)
    stride = (n - L) // num if num else 0
    if num < 1 or stride < 1:
        raise ConfigError(f"the held-out text has {n} tokens: too few for {num} windows of {prompt_len} + {new}")
    starts = torch.arange(num) * stride
    other = starts + stride // 2
    index = torch.arange(L)
    reference, second = test.tokens[starts[:, None] + index], test.tokens[other[:, None] + index]
    covered = torch.zeros(n, dtype=torch.bool)
    for s in starts.tolist():
        covered[s + prompt_len:s + L] = True
    shared = sum(int(covered[s + prompt_len:s + L].sum()) for s in other.tolist())
    return reference, second, shared / (num * new)


def unigram_continuations(train_tokens: torch.Tensor, prompts: torch.Tensor, new: int, num_tokens: int,
                          generator: torch.Generator) -> torch.Tensor:
    """prompts (N, P) followed by `new` tokens drawn i.i.d. from the training split's unigram distribution: the
    degenerate sampler of MAUVE's floor. Returns (N, P + new)."""
    counts = torch.bincount(train_tokens.cpu(), minlength=num_tokens).double()
    draws = torch.multinomial(counts / counts.sum(), prompts.shape[0] * new, replacement=True, generator=generator)
    return torch.cat([prompts.cpu(), draws.view(prompts.shape[0], new)], dim=1)


def mauve_bounds(judge: Judge, data: TextSplits, num: int, prompt_len: int, new: int, *, seed: int = 0,
                 num_buckets: str | int = "auto", reference_features: torch.Tensor | None = None) -> dict[str, Any]:
    """MAUVE's ceiling and floor on the judge's features, against the reference held-out continuations
    (`held_out_continuations`) that generated text is measured against: the ceiling, other held-out continuations
    (their overlap with the reference stated); the floor, unigram draws after the reference prompts. A judge whose
    features tell text from noise has the ceiling near 1 and the floor near 0. data: the TextSplits (the floor draws
    from data.train's unigram distribution); reference_features: the reference's features, when already computed.
    gen_bits: per character (data.test's characters per token)."""
    reference, other, overlap = held_out_continuations(data.test, num, prompt_len, new)
    floor_ids = unigram_continuations(data.train.tokens, reference[:, :prompt_len], new, len(data.vocab),
                                      make_generator(seed, "judge-unigram-floor"))
    q = features(judge, reference, prompt_len) if reference_features is None else reference_features
    per_char = data.test.chars_per_token
    ceiling = {**mauve_score(features(judge, other, prompt_len), q, num_buckets=num_buckets, seed=seed),
               "gen_bits": generative_bits(judge, other, prompt_len) / per_char, "overlap": overlap}
    floor = {**mauve_score(features(judge, floor_ids, prompt_len), q, num_buckets=num_buckets, seed=seed),
             "gen_bits": generative_bits(judge, floor_ids, prompt_len) / per_char}
    return {"ceiling": ceiling, "floor": floor, "num": num, "prompt_len": prompt_len, "new": new}


# ---- how reports show it


def judge_paragraph(judge: dict[str, Any], judged: list[tuple[str, float]]) -> list[str]:
    """A report's lines on its judge (judge.json's record): which run, its held-out BPC, and a warning naming every
    judged model (label, held-out BPC) whose BPC the judge's is not below."""
    worse = [f"{label} ({bpc:.4f})" for label, bpc in judged if not judge["held_out_bpc"] < bpc]
    lines = [f"Judge: `{judge['run']}`, a plain causal LM trained on the training split ({judge.get('steps')} steps), "
             f"never one of the compared runs; its held-out BPC {judge['held_out_bpc']:.4f} over "
             f"{judge.get('held_out_windows')} windows of {judge.get('seq_len')}.", ""]
    if worse:
        lines += [f"**WARNING: the judge's held-out BPC {judge['held_out_bpc']:.4f} is NOT below every judged model's: "
                  f"{', '.join(worse)}. Its perplexities and MAUVE cannot rank these models.**", ""]
    return lines


def mauve_table(bounds: dict[str, Any], generated: list[tuple[str, dict]]) -> list[str]:
    """A report's MAUVE section: each generated set (label, text_quality's result) against the held-out continuations
    of the same prompts, then mauve_bounds' ceiling and floor rows, each with its sample counts and clusters."""
    def row(what: str, m: dict) -> dict[str, str]:
        return {"text": what, "MAUVE": f"{m['mauve']:.3f}", "gen. ppl (judge)": f"{2 ** m['gen_bits']:.2f}",
                "distinct-4": f"{m['distinct_4']:.3f}" if "distinct_4" in m else "-",
                "samples": f"{m['num_p']} vs {m['num_q']}", "clusters": str(m["clusters"])}

    c, f = bounds["ceiling"], bounds["floor"]
    rows = [row(what, m) for what, m in generated]
    rows.append(row(f"ceiling: other held-out text ({c['overlap']:.0%} of its characters also in the reference)", c))
    rows.append(row("floor: unigram draws of the training split", f))
    return ["", "## MAUVE", "",
            f"MAUVE (mauve-text, PCA to 90% of the variance, k-means; Pillutla et al. 2021) of {bounds['num']} "
            f"continuations of {bounds['new']} characters after held-out prompts of {bounds['prompt_len']}, against the "
            "held-out continuations of the same prompts, on the independent judge's features (its final normalised "
            "hidden states averaged over the continuation). gen. ppl: these continuations' perplexity under the judge.",
            ""] + markdown_table(["text", "MAUVE", "gen. ppl (judge)", "distinct-4", "samples", "clusters"], rows) + [
            "", "The judge's features tell held-out text from unigram noise: ceiling above floor." if
            c["mauve"] > f["mauve"] else
            "**WARNING: MAUVE's ceiling is not above its floor: the judge's features do not tell text from noise.**"]


def bounds_lines(judge: dict[str, Any]) -> list[str]:
    """An evaluation's printed lines on its judge: the run, its held-out BPC, MAUVE's ceiling and floor."""
    lines = [f"  judge {judge['run']}: held-out BPC {judge['held_out_bpc']:.4f}"]
    for bound, b in judge.get("bounds", {}).items():
        if isinstance(b, dict):
            lines.append(f"  MAUVE {bound}: {b['mauve']:.3f} ({b['num_p']} vs {b['num_q']}, {b['clusters']} clusters)")
    return lines


def judge_section(configs: dict[int, RunConfig], results: dict[int, dict[str, Any]]) -> tuple[dict | None, list[str]]:
    """The independent judge the runs were evaluated with (the same for all, and none of them) and the report's lines
    on it: its held-out BPC against every judged model's (flagged when not below all), MAUVE's ceiling and floor."""
    judges = {r["judge"]["run"] for r in results.values() if "judge" in r}
    if not judges:
        return None, ["**No judge**: the runs were evaluated with `--judge none`; no generative perplexity or MAUVE.", ""]
    if len(judges) > 1 or any("judge" not in r for r in results.values()):
        raise ConfigError(f"the runs were evaluated with different judges ({', '.join(sorted(judges))}): evaluate "
                          "them with one")
    judge = next(r["judge"] for r in results.values())
    compared = {Path(r["run"]).resolve() for r in results.values()}
    if Path(judge["run"]).resolve() in compared:
        raise ConfigError(f"the judge {judge['run']} is one of the compared runs: use an independent judge")
    return judge, judge_paragraph(judge, [(f"B={B}", r["bpc"]) for B, r in results.items()])


def mauve_section(results: dict[int, dict[str, Any]], judge: dict | None,
                  generated: list[tuple[str, dict]] | None = None) -> list[str]:
    """The report's MAUVE table (`judge.mauve_table`): each run and bridge against held-out continuations of the same
    prompts, with the ceiling and floor rows. generated: (row label, text_quality result) of each generated set, when
    not every run's and bridge's samples."""
    bounds = (judge or {}).get("bounds")
    if not bounds:
        return []
    if generated is None:
        generated = [(f"B={B}, {'plain' if name == 'plain' else 'bridge ' + name}", s["mauve"])
                     for B, r in results.items() for name, s in r["samples"].items() if "mauve" in s]
    return mauve_table(bounds, generated)
