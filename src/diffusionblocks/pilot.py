"""The pilot of a fitted ("balanced") partition (issue 28): a short end-to-end run over the whole noise axis, the curve
of what it leaves undecided at each noise level measured on held-out data and fitted monotone (`RemainingCurve`),
and the inner boundaries at equal shares of that curve (`balanced_boundaries`), written into the run's config before
its blocks train. For discrete targets the curve is the held-out cross-entropy at each level (the bits still
undecided); for continuous ones the information still to be revealed, I(s) = int_{sigma_min}^{s} mmse(sigma) /
sigma^2 dln sigma (the I-MMSE relation, 1/2 int mmse dsnr with snr = 1 / sigma^2).

The pilot is a run of its own in RUN/pilot (resumable, with its own train_summary.json); RUN/partition.json keeps its
steps and time (counted in equal-compute comparisons: a step of the L-layer pilot costs as much as B block steps), the
measured and fitted curve, both partitions' boundaries and the share of the curve each block's range holds;
RUN/partition.png draws them. A resumed or composed run reads its boundaries from its config and never refits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from .config import ConfigError, RunConfig
from .noise import NoiseAxis, Partition, RemainingCurve, balanced_boundaries
from .pretrained import from_pretrained
from .rundir import save_text
from .seeding import make_generator

PILOT_DIR = "pilot"
PARTITION_FILE = "partition.json"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FixedLevel:
    """Stands in for the partition in `Task.loss_inputs`: every noise level it draws is `level`."""

    level: float

    def sample(self, b: int, n: int, *, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu", stratified: bool = False) -> torch.Tensor:
        return torch.full((n,), self.level, dtype=torch.float64, device=device)


def needs_pilot(cfg: RunConfig) -> bool:
    """A balanced partition of B > 1 blocks whose boundaries are not fitted yet."""
    b = cfg.blocks
    return b.partition == "balanced" and b.num_blocks > 1 and b.boundaries is None


def check_pilot(task, cfg: RunConfig) -> None:
    """Stops before any training where the task cannot measure what remains undecided."""
    if needs_pilot(cfg) and task.remaining_measure(cfg) is None:
        raise ConfigError(f"blocks.partition='balanced' is not available for this {cfg.task} run (no pilot measure "
                          "of what remains undecided; see Task.remaining_measure): use 'equiprobable' or 'uniform', "
                          "or give blocks.boundaries")


def pilot_config(cfg: RunConfig) -> RunConfig:
    """The pilot: the same model and data as one end-to-end block over the whole axis (equal-density partition),
    for blocks.pilot_steps steps (default a quarter of train.steps_per_block); a decaying learning rate decays over
    the pilot's steps, its warm-up at most a quarter of them."""
    steps = cfg.blocks.pilot_steps or max(cfg.train.steps_per_block // 4, 1)
    blocks = dataclasses.replace(cfg.blocks, num_blocks=1, partition="equiprobable", boundaries=None,
                                 layers_per_block=None, density="train", curve=None)
    train = dataclasses.replace(cfg.train, steps_per_block=steps, blocks_to_train=None, schedule="sequential")
    if train.lr_schedule != "constant":
        train = dataclasses.replace(train, lr_warmup_steps=min(train.lr_warmup_steps, steps // 4))
    return dataclasses.replace(cfg, name=f"{cfg.name}-pilot", blocks=blocks, train=train)


def pilot_levels(axis: NoiseAxis, n: int) -> torch.Tensor:
    """n levels evenly spaced in the axis' coordinate (ln sigma, or t) from its lowest to its highest, (n,) float64."""
    lo, hi = (axis.warp(torch.tensor(v, dtype=torch.float64)) for v in (axis.lo, axis.hi))
    s = axis.unwarp(torch.linspace(float(lo), float(hi), n, dtype=torch.float64))
    s[0], s[-1] = axis.lo, axis.hi
    return s


def _to(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device)
    return type(batch)(_to(x, device) for x in batch) if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def measure_undecided(task, cfg: RunConfig, block: torch.nn.Module, test_data: Any, levels: torch.Tensor,
                      examples: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """The mean over `examples` held-out examples of `task.undecided` at each level, (n,) float64: every level sees
    the same examples, and draws its noise from (seed, "pilot", batch)."""
    sampler = task.batch_sampler(cfg, test_data, 0)
    batches = [sampler.batch(i) for i in range(math.ceil(examples / cfg.train.batch_size))]
    out = torch.zeros(len(levels), dtype=torch.float64)
    for k, level in enumerate(levels.tolist()):
        total, count = 0.0, 0
        for i, batch in enumerate(batches):
            inputs = task.loss_inputs(cfg, FixedLevel(level), 0, batch, make_generator(seed, "pilot", i))
            inputs = {key: _to(v, device) for key, v in inputs.items()}
            u = task.undecided(cfg, block, inputs, level)
            total, count = total + float(u.sum()), count + len(u)
        out[k] = total / count
    return out


def information_to_reveal(levels: torch.Tensor, mmse: torch.Tensor) -> torch.Tensor:
    """I(s_k) = int_{s_0}^{s_k} mmse(sigma) / sigma^2 dln sigma by the trapezoid rule over the ascending levels
    (the I-MMSE relation in ln sigma): the information a denoiser at s_k still has to reveal, from 0 at s_0."""
    f = mmse.double() / levels.double() ** 2
    steps = (f[1:] + f[:-1]) / 2 * torch.diff(torch.log(levels.double()))
    return torch.cat([torch.zeros(1, dtype=torch.float64), steps.cumsum(0)])


def fit_partition(task, cfg: RunConfig, run_dir: Path, device: torch.device,
                  train_pilot: Callable[[RunConfig, Path], None]) -> RunConfig:
    """cfg with blocks.boundaries fitted by the pilot in run_dir/pilot (trained by train_pilot(pilot config,
    directory), which resumes it when it was interrupted); writes partition.json and partition.png."""
    check_pilot(task, cfg)
    pilot_dir = Path(run_dir) / PILOT_DIR
    pcfg = pilot_config(cfg)
    logger.info("balanced partition: the pilot (%d end-to-end steps) in %s", pcfg.train.steps_per_block, pilot_dir)
    train_pilot(pcfg, pilot_dir)
    model, pcfg = from_pretrained(pilot_dir, device)
    data = task.load_run_data(pcfg, pilot_dir)
    axis = task.noise_axis(cfg)
    levels = pilot_levels(axis, cfg.blocks.pilot_levels)
    measured = measure_undecided(task, pcfg, model.blocks[0], data.test, levels, cfg.blocks.pilot_examples, device,
                                 cfg.train.seed)
    measure = task.remaining_measure(cfg)
    remaining = information_to_reveal(levels, measured) if measure == "mmse" else measured
    curve = RemainingCurve.fit(axis, levels, remaining)
    try:
        fitted = balanced_boundaries(axis, curve, cfg.blocks.num_blocks)
        balanced = Partition(axis, cfg.blocks.num_blocks, "balanced", cfg.blocks.gamma, fitted)
    except ValueError as e:  # a flat curve (the pilot learned nothing), or boundaries that coincide
        raise ConfigError(f"the pilot in {pilot_dir} gave no usable balanced partition ({e}): train a new run with "
                          "a longer pilot (blocks.pilot_steps) or another blocks.partition") from None
    equal = Partition(axis, cfg.blocks.num_blocks, "equiprobable", cfg.blocks.gamma)
    summary = json.loads((pilot_dir / "train_summary.json").read_text())
    record = {
        "measure": measure, "pilot": {
            "dir": PILOT_DIR, "steps": pcfg.train.steps_per_block, "layers": pcfg.model.depth,
            "block_steps": pcfg.train.steps_per_block * cfg.blocks.num_blocks,  # a pilot step costs B block steps
            "wall_time_s": summary.get("wall_time_s"), "examples": cfg.blocks.pilot_examples},
        "levels": levels.tolist(), "measured": measured.tolist(), "remaining": remaining.tolist(),
        "fitted": curve(levels, axis).tolist(), "boundaries": {"balanced": list(fitted),
                                                               "equiprobable": equal.boundaries[1:-1].tolist()},
        "shares": {"balanced": curve.shares(balanced), "equiprobable": curve.shares(equal)}}
    record["largest_over_smallest"] = {k: max(v) / max(min(v), 1e-12) for k, v in record["shares"].items()}
    if measure == "cross-entropy":  # a pilot that cannot read its target even at the lowest noise measured nothing
        record["undecided_at_lowest"] = float(measured[0] / measured[-1]) if measured[-1] > 0 else float("nan")
        if not record["undecided_at_lowest"] <= 0.5:
            logger.warning("balanced partition: the pilot leaves %.0f%% of its cross-entropy at sigma_max undecided "
                           "even at the lowest noise level: it has not learned to read its target, and the curve it "
                           "measured says little; a longer pilot (blocks.pilot_steps) gives a curve worth fitting",
                           100 * record["undecided_at_lowest"])
    save_text(Path(run_dir) / PARTITION_FILE, json.dumps(record, indent=2) + "\n")
    plot_partition(record, task.noise_symbol, Path(run_dir) / "partition.png")
    logger.info("balanced partition: boundaries %s (equiprobable %s); shares of the curve %s (equiprobable %s)",
                _levels(fitted), _levels(record["boundaries"]["equiprobable"]), _shares(record["shares"]["balanced"]),
                _shares(record["shares"]["equiprobable"]))
    knots = tuple((float(level), float(r)) for level, r in zip(levels.tolist(), curve(levels, axis).tolist()))
    return dataclasses.replace(cfg, blocks=dataclasses.replace(cfg.blocks, boundaries=tuple(fitted), curve=knots))


def describe(run_dir: Path) -> str:
    """One line on a balanced run's partition: its pilot and the shares of the fitted curve per block."""
    path = Path(run_dir) / PARTITION_FILE
    if not path.is_file():
        return "partition: balanced, its boundaries given in the config (no pilot in this run)"
    r = json.loads(path.read_text())
    return (f"partition: balanced, fitted by a pilot of {r['pilot']['steps']} end-to-end steps ({PILOT_DIR}/; "
            f"{r['pilot']['block_steps']} block steps of compute); shares of its curve per block, noisiest first: "
            f"{_shares(r['shares']['balanced'])} (equiprobable: {_shares(r['shares']['equiprobable'])})")


def _levels(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _shares(values) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"


def plot_partition(record: dict[str, Any], symbol: str, path: Path) -> None:
    """The measured and fitted curve over the noise axis, with both partitions' boundaries."""
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    levels = record["levels"]
    label = "information to reveal (I-MMSE)" if record["measure"] == "mmse" else "cross-entropy (nats)"
    ax.plot(levels, record["remaining"], "o", ms=3, color="0.5", label=f"measured {label}")
    ax.plot(levels, record["fitted"], "-", color="C0", label="fitted (monotone)")
    for kind, style in (("equiprobable", ":"), ("balanced", "--")):
        for i, s in enumerate(record["boundaries"][kind]):
            ax.axvline(s, ls=style, color="C1" if kind == "balanced" else "C2",
                       label=f"{kind}: {_shares(record['shares'][kind])}" if i == 0 else None)
    if symbol == "sigma":
        ax.set_xscale("log")
    ax.set_xlabel(symbol)
    ax.set_ylabel("what remains undecided")
    ax.set_title(f"pilot: {record['pilot']['steps']} steps; shares of the curve per block (noisiest first)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
