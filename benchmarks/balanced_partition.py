"""The fitted partition against the equal-density one at equal compute, with sampler steps per block (issue 28).

    python benchmarks/balanced_partition.py --config presets/shakespeare-arlm.json --out runs/balanced-arlm \
        --pilot-steps 500 --steps 1,2,4 --seeds 0
    python benchmarks/balanced_partition.py --config presets/digits-vit.json --out runs/balanced-vit --seeds 0,1,2
    python benchmarks/balanced_partition.py --config presets/digits-dit.json --out runs/balanced-digits --steps 0 \
        --points 8 --point-num 500 --seeds 0,1,2 train.steps_per_block=1600      # images: FD along training
    python benchmarks/balanced_partition.py --tiny --out /tmp/balanced-tiny          # smoke test, a few minutes

For each seed: B=1 (the task's end-to-end baseline, `compare`'s), B equiprobable and B balanced, at equal training
compute: a B=1 step costs as much as B block steps, so each equiprobable block trains train.steps_per_block steps
and each balanced block that many minus the pilot's (its pilot, one end-to-end block over the whole axis, costs
pilot_steps x B block steps); with --fitted-density also a balanced run whose blocks draw their training levels by
the pilot's fitted curve (its own pilot, the same). Every chain is then evaluated, as `evaluate` does (the task's own options, `--eval
name=value` to change one), at each of `--steps` multiples of B inference steps: once on the quantile grid (the
paper's) and, above one step per block, on the per-block grid (`sample.grid=blocks`); each setting is a composed
copy of the run whose sample section says it (RUN-steps6-blocks). The report (report.md, report.json) has one row
per run and setting: the task's headline figures (language: the chain's own BPC with its standard error, the
independent judge's perplexity of the samples, MAUVE, distinct-4, characters/s; classification: top-1), who decides
(each block's share of what its chain removes), and per partition its boundaries, the shares of the pilot's curve
each block's range holds, and their largest over smallest. With --points N every run is also evaluated at N points
along training (its own sample settings; RUN/points) and --curve plotted against compute (curves.png). Rerunning
the command resumes: finished runs and evaluations are kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from diffusionblocks import checkpoint, pilot, precision
from diffusionblocks.compare import comparison_configs
from diffusionblocks.compose import compose_run
from diffusionblocks.config import ConfigError, RunConfig
from diffusionblocks.metrics import shares_text
from diffusionblocks.report import markdown_table
from diffusionblocks.runs import evaluate_run, train_run
from diffusionblocks.tasks import apply_overrides, get_task, load_config, read_config

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("balanced_partition")
TINY = ["model.hidden_size=32", "model.num_heads=2", "model.depth=3", "model.seq_len=32", "train.batch_size=16",
        "train.steps_per_block=40", "train.log_every=10", "train.checkpoint_every=20", "train.lr_warmup_steps=5",
        "sample.num=2", "sample.new_chars=16", "sample.prompt_chars=8"]
TINY_EVAL = ["windows=16", "prompts=4", "new=16", "speed_prompts=1", "mauve_prompts=0", "chain_draws=2", "top_k=2",
             "judge=none"]


def run_configs(cfg: RunConfig, B: int, pilot_steps: int, seed: int, density: bool = False) -> dict[str, RunConfig]:
    """B=1, B equiprobable and B balanced for one seed, at equal compute (the pilot counted); with `density` also B
    balanced whose blocks draw their training levels from the pilot's fitted curve (blocks.density=fitted)."""
    cfg = apply_overrides(cfg, [f"train.seed={seed}"])
    base = comparison_configs(cfg, [B])
    S = cfg.train.steps_per_block
    if not 0 < pilot_steps < S:
        raise ConfigError(f"--pilot-steps must be in (0, train.steps_per_block={S}), got {pilot_steps}")
    equal = dataclasses.replace(base[B].blocks, partition="equiprobable", boundaries=None)
    balanced = dataclasses.replace(base[B].blocks, partition="balanced", boundaries=None, pilot_steps=pilot_steps)
    shorter = dataclasses.replace(base[B].train, steps_per_block=S - pilot_steps)
    runs = {"B1": base[1],
            f"B{B}-equiprobable": dataclasses.replace(base[B], name=f"{cfg.name}-B{B}-equiprobable", blocks=equal),
            f"B{B}-balanced": dataclasses.replace(base[B], name=f"{cfg.name}-B{B}-balanced", blocks=balanced,
                                                  train=shorter)}
    if density:
        runs[f"B{B}-balanced-density"] = dataclasses.replace(
            base[B], name=f"{cfg.name}-B{B}-balanced-density", train=shorter,
            blocks=dataclasses.replace(balanced, density="fitted"))
    return runs


def trained(run: Path, steps: int) -> bool:
    """Every block of the run has its weights of step `steps` or later."""
    if not (run / "config.json").is_file():
        return False
    return all((checkpoint.block_step(run, b) or 0) >= steps for b in range(read_config(run).blocks.num_blocks))


def train(c: RunConfig, run: Path, device: str | None, steps: int | None = None) -> None:
    """Trains the run to `steps` steps per block (default: its config's), continuing it where it has a config."""
    steps = c.train.steps_per_block if steps is None else steps
    if trained(run, steps):
        return
    leg = [f"train.steps_per_block={steps}"]
    if (run / "config.json").is_file():
        train_run(resume=run, overrides=leg, device=device, progress=False)
    else:
        train_run(c, out=run, overrides=leg, device=device, progress=False)


def leg_steps(c: RunConfig, budget: int, points: int) -> list[tuple[int, int]]:
    """(compute, steps per block) at `points` equal fractions of the budget (B=1 steps, or steps per block of an
    equiprobable run): a balanced run's blocks have the pilot's steps fewer, and no point before its pilot ends."""
    pilot_steps = c.blocks.pilot_steps if c.blocks.partition == "balanced" else 0
    at = [budget * k // points for k in range(1, points + 1)]
    return [(a, a - pilot_steps) for a in at if a - pilot_steps > 0]


def curve(run: Path, c: RunConfig, budget: int, points: int, values: dict[str, Any],
          device: str | None) -> list[dict[str, Any]]:
    """The run's evaluation (its own inference settings) along training, at `leg_steps`, each cached in
    RUN/points/STEPS.json; the run ends at its full budget."""
    rows = []
    for compute, steps in leg_steps(c, budget, points):
        cache = run / "points" / f"{steps}.json"
        if not cache.is_file():
            train(c, run, device, steps)
            out = run / "points" / f"evaluation-{steps}"
            ev = evaluate_run(run, out=str(out), progress=False, overwrite=True, **values,
                              **({"device": device} if device else {}))
            scalars = {k: v for k, v in ev.result.items() if isinstance(v, (int, float))}
            cache.write_text(json.dumps({"compute": compute, "steps_per_block": steps, **scalars}, indent=2) + "\n")
        rows.append(json.loads(cache.read_text()))
        print(f"{run.name} at {compute} steps of compute: {rows[-1]}", flush=True)
    return rows


def plot_curves(curves: dict[str, list[list[dict[str, Any]]]], metric: str, path: Path, title: str) -> None:
    """`metric` against training compute, one line per run (the mean over seeds, each seed's points faint)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for i, (name, seeds) in enumerate(curves.items()):
        color = f"C{i}"
        for rows in seeds:
            ax.plot([r["compute"] for r in rows], [r[metric] for r in rows], color=color, alpha=0.25, lw=1)
        at = sorted({r["compute"] for rows in seeds for r in rows})
        mean = [sum(r[metric] for rows in seeds for r in rows if r["compute"] == a)
                / sum(1 for rows in seeds for r in rows if r["compute"] == a) for a in at]
        ax.plot(at, mean, "o-", color=color, label=name)
    ax.set_xlabel("training compute (B=1 steps; the pilot counted)")
    ax.set_ylabel(metric)
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def settings(B: int, multiples: list[int], cfg: RunConfig) -> list[tuple[int, str]]:
    """(steps, grid) to evaluate a chain at: B k steps on the quantile grid, and on the per-block one for k > 1,
    where the run's sample section has a grid (the language and classification chains). No multiples (--steps 0):
    the run's own inference settings (images: the preset's sampler and its steps)."""
    if not multiples or not hasattr(cfg.sample, "grid"):
        return [(0, "")]
    out = []
    for k in multiples:
        out.append((B * k, "quantile"))
        if k > 1:
            out.append((B * k, "blocks"))
    return out


def view(run: Path, B: int, steps: int, grid: str) -> Path:
    """The run itself, or a composed copy of its blocks whose sample section asks for these inference settings."""
    if not grid:
        return run
    out = run.parent / f"{run.name}-steps{steps}-{grid}"
    if not (out / "config.json").is_file():
        if out.exists():
            shutil.rmtree(out)
        compose_run({b: run for b in range(B)}, out, [f"sample.steps={steps}", f"sample.grid={grid}",
                                                      f"name={run.name}-steps{steps}-{grid}"])
    return out


def evaluate(run: Path, values: dict[str, Any], device: str | None) -> dict[str, Any]:
    out = run / "evaluation-balanced"
    if (out / "evaluation.json").is_file():
        return json.loads((out / "evaluation.json").read_text())
    ev = evaluate_run(run, out=str(out), progress=False, overwrite=True, **values,
                      **({"device": device} if device else {}))
    print(ev.summary, flush=True)
    return ev.result


def headline(r: dict[str, Any], cfg: RunConfig) -> dict[str, str]:
    """The figures of an evaluation for the table: a language model's, a classifier's, or its scalars."""
    if "samples" in r and "chain_likelihood" in r:
        c = r.get("chain_likelihood", {})
        bridge = cfg.sample.bridge if cfg.model.mode == "diffusion" else next(iter(r["samples"]))
        s = r["samples"].get(bridge) or next(iter(r["samples"].values()))
        return {"BPC": f"{c['bpc']:.4f} +- {c['bpc_se']:.4f}" if c else "",
                "judge ppl": f"{s['gen_ppl']:.2f}" if "gen_ppl" in s else "",
                "MAUVE": f"{s['mauve']['mauve']:.3f}" if "mauve" in s else "",
                "distinct-4": f"{s['distinct_4']:.3f}", "chars/s": f"{s['chars_per_s']:.0f}"}
    if "top1" in r:
        return {"top-1": f"{r['top1']:.4f}"}
    return {k: f"{v:.4g}" for k, v in r.items() if isinstance(v, float)}


def partition_cells(run: Path) -> dict[str, str]:
    """The fitted partition's record, where the run has one."""
    path = run / pilot.PARTITION_FILE
    if not path.is_file():
        return {}
    p = json.loads(path.read_text())
    return {"boundaries (balanced / equiprobable)": " / ".join(", ".join(f"{s:.3g}" for s in p["boundaries"][k])
                                                                for k in ("balanced", "equiprobable")),
            "curve shares (balanced / equiprobable)": " / ".join(
                "[" + ", ".join(f"{v:.2f}" for v in p["shares"][k]) + "]" for k in ("balanced", "equiprobable")),
            "largest / smallest": " / ".join(f"{p['largest_over_smallest'][k]:.2f}"
                                               for k in ("balanced", "equiprobable")),
            "pilot": f"{p['pilot']['steps']} steps ({p['pilot']['block_steps']} block steps)"}


def _number(cell: str) -> float | None:
    """The figure a table cell starts with ("2.7303 +- 0.0164" -> 2.7303), or None."""
    try:
        return float(cell.split()[0])
    except (ValueError, IndexError):
        return None


def over_seeds(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """One row per (run, steps, grid): each numeric column's mean and standard deviation over the seeds."""
    groups: dict[tuple[str, str, str], list[dict[str, str]]] = {}
    for row in rows:
        groups.setdefault((row["run"], row["steps"], row["grid"]), []).append(row)
    skip = {"seed", "run", "steps", "grid", "pilot", "largest / smallest"}
    columns = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in skip
               and all(_number(row.get(k, "")) is not None for row in rows if row.get(k))]
    out = []
    for (run, steps, grid), members in groups.items():
        cells = {"run": run, "steps": steps, "grid": grid, "seeds": str(len(members))}
        for k in columns:
            v = [_number(m[k]) for m in members if _number(m.get(k, "")) is not None]
            if v:
                mean = sum(v) / len(v)
                sd = (sum((x - mean) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0
                cells[k] = f"{mean:.4g} +- {sd:.2g}"
            else:
                cells[k] = ""
        out.append(cells)
    return out


def parse_values(items: list[str], options_class: type) -> dict[str, Any]:
    """name=value pairs as the task's evaluate options, typed by their defaults."""
    fields = {f.name: f for f in dataclasses.fields(options_class)}
    out = {}
    for item in items:
        name, _, raw = item.partition("=")
        if name not in fields:
            raise ConfigError(f"--eval {item!r}: the evaluate options are {', '.join(sorted(fields))}")
        default = fields[name].default
        out[name] = raw if isinstance(default, str) or default is None else type(default)(raw)
    return out


def main(argv: list[str] | None = None) -> int:
    precision.flush_denormals()  # first: torch's worker threads take the mode they start with
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "presets" / "shakespeare-arlm.json"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--num-blocks", type=int, default=3)
    ap.add_argument("--pilot-steps", type=int, default=0, help="default: a quarter of train.steps_per_block")
    ap.add_argument("--steps", default="1,2", help="inference steps per token / image as multiples of B "
                    "(0: the run's own sample settings)")
    ap.add_argument("--points", type=int, default=0, help="evaluate each run at this many points along training "
                    "(its own sample settings; the last at the full budget) and plot --curve against compute")
    ap.add_argument("--point-num", type=int, default=0, help="samples of an evaluation along training (default: "
                    "the evaluation's)")
    ap.add_argument("--curve", default="fd", help="the evaluation's figure to plot along training (--points)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--runs", default="", help="only these of the runs (comma-separated names: B1, B3-equiprobable, "
                    "B3-balanced, B3-balanced-density); default every one")
    ap.add_argument("--fitted-density", action="store_true", help="also B balanced with blocks.density=fitted (its "
                    "blocks draw their training levels by the pilot's fitted curve, as CDCD's time warping)")
    ap.add_argument("--eval", action="append", default=[], help="an evaluate option, name=value (repeatable)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--tiny", action="store_true", help="a tiny model and evaluation: a smoke test")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_config(args.config)
        fields = {f"{k}.{f}" for k, v in cfg.to_dict().items() if isinstance(v, dict) for f in v}
        tiny = [o for o in TINY if o.split("=")[0] in fields] if args.tiny else []  # the task's own fields
        cfg = apply_overrides(cfg, [*tiny, *args.overrides])
        if cfg.train.lr_schedule != "constant":
            raise ConfigError("the curve's runs train in legs, each resumed with more steps: a decaying "
                              "train.lr_schedule fixes a run's steps; keep it constant")
        task = get_task(cfg.task)
        names = {f.name for f in dataclasses.fields(task.evaluate_options)}
        tiny_eval = [v for v in TINY_EVAL if v.split("=")[0] in names] if args.tiny else []
        values = parse_values([*tiny_eval, *args.eval], task.evaluate_options)
        # Along training: fewer samples where asked, no chain diagnostics (the final evaluation has them).
        point_values = {**values, **({"diagnostics": False} if "diagnostics" in names else {}),
                        **({"num": args.point_num} if args.point_num else {})}
        B = args.num_blocks
        pilot_steps = args.pilot_steps or max(cfg.train.steps_per_block // 4, 1)
        multiples = [int(k) for k in args.steps.split(",") if int(k) > 0]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        rows, record = [], []
        curves: dict[str, list[list[dict[str, Any]]]] = {}
        seeds = [int(s) for s in args.seeds.split(",")]
        for seed in seeds:
            for name, c in run_configs(cfg, B, pilot_steps, seed, args.fitted_density).items():
                if args.runs and name not in args.runs.split(","):
                    continue
                run = out / f"seed{seed}" / name
                if args.points:
                    curves.setdefault(name, []).append(
                        curve(run, c, cfg.train.steps_per_block, args.points, point_values, args.device))
                train(c, run, args.device)
                for steps, grid in settings(B, multiples, c) if name != "B1" else [(0, "")]:
                    v = view(run, B, steps, grid)
                    r = evaluate(v, values, args.device)
                    c_v = read_config(v)
                    decision = (r.get("decision") or r.get("chain", {}).get("decision") or {}).get("chain")
                    one_pass = getattr(c_v.model, "mode", None) == "plain"  # no chain: its sample section unused
                    ran = "one pass" if one_pass else steps or c_v.sample.steps or "the run's default"
                    row = {"seed": str(seed), "run": name, "steps": str(ran),
                           "grid": "" if one_pass else grid or getattr(c_v.sample, "grid", ""), **headline(r, c_v),
                           "who decides": shares_text(decision) if decision else "", **partition_cells(run)}
                    rows.append(row)
                    record.append({**row, "evaluation": str(v / "evaluation-balanced" / "evaluation.json")})
                if (run / "partition.png").is_file():
                    shutil.copyfile(run / "partition.png", out / f"partition-seed{seed}.png")
        header = list(dict.fromkeys(k for row in rows for k in row))
        lines = [f"# Balanced against equiprobable partitions: {cfg.name}, B={B}", "",
                 f"Equal compute: B=1 {cfg.train.steps_per_block} steps; each equiprobable block as many; each "
                 f"balanced block {cfg.train.steps_per_block - pilot_steps} after a pilot of {pilot_steps} end-to-end "
                 f"steps ({pilot_steps * B} block steps). Command: `python benchmarks/balanced_partition.py "
                 f"{' '.join(sys.argv[1:] if argv is None else argv)}`", ""]
        lines += markdown_table(header, [{k: row.get(k, "") for k in header} for row in rows])
        if len(seeds) > 1:
            lines += ["", "## Mean over the seeds (+- their standard deviation)", ""]
            summary = over_seeds(rows)
            lines += markdown_table(list(summary[0]), summary)
        if curves:
            lines += ["", f"## {args.curve} along training (the run's own sample settings)", ""]
            lines += markdown_table(["seed", "run", "compute", "steps per block", args.curve], [
                {"seed": str(seeds[i]), "run": name, "compute": str(r["compute"]), "steps per block": str(r["steps_per_block"]),
                 args.curve: f"{r[args.curve]:.4g}"} for name, runs in curves.items() for i, rows in enumerate(runs)
                for r in rows])
            plot_curves(curves, args.curve, out / "curves.png", f"{cfg.name}, B={B}: {args.curve} along training")
            lines += ["", "![along training](curves.png)"]
            (out / "curves.json").write_text(json.dumps(curves, indent=2) + "\n")
        (out / "report.md").write_text("\n".join(lines) + "\n")
        (out / "report.json").write_text(json.dumps(record, indent=2) + "\n")
        print("\n".join(lines))
    except ConfigError as e:
        print(f"balanced_partition: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
