"""Modular blocks, measured: adapting a model to a new domain by retraining one block, composing blocks
trained on different domains, and what block-wise training costs in iterations against end-to-end.

    python benchmarks/modular.py --out runs/modular [--domains thick,inverted] [--steps 1600] [--finetune-steps 400]

Domain A is the 8x8 digits with the main job's model (presets/digits-dit.json: DiT, 6 layers of width 96,
B=3); each domain B is `digits-<domain>`: the same images thickened or inverted (data.py). Every training is
`diffusionblocks train` in a fresh process (its time and peak memory from its train_summary.json). Samples
are judged by two reference classifiers trained on the real training images of every domain: one of the class
(conditional accuracy; its features give the Frechet distances to each domain's held-out images) and, per
domain B, a domain judge (the fraction of samples it puts in B). Rerunning with the same --out skips what is
done.

3. Convergence (run first: its models are the others' start): B=1 and B=3 from scratch on A, trained in --points legs (`train --resume` with a larger
   train.steps_per_block: a resumed block is bit-identical to one trained in one go), evaluated after each.
   At a point, every block of B=3 has had as many steps as B=1, so both have run the same layers: equal compute.
1. Adaptation: from the converged A models, fine-tune on B for --finetune-steps steps each: one block of B=3
   (each of the three in turn), every block of B=3, and the whole B=1 model.
2. Composition: B=3 trained from scratch on B; its blocks composed with A's (`diffusionblocks compose`) at
   both seams and in both orders, with the chain diagnostics of each block on its own domain.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffusionblocks import precision
from diffusionblocks.checkpoint import block_info
from diffusionblocks.data import DataConfig, load_image_data
from diffusionblocks.diagnostics import chain_diagnostics
from diffusionblocks.evaluation import features
from diffusionblocks.generate import class_labels_evenly, generate
from diffusionblocks.metrics import frechet_distance
from diffusionblocks.plotting import image_grid
from diffusionblocks.pretrained import from_pretrained
from diffusionblocks.reference import load_or_train_reference_classifier, predict, union
from diffusionblocks.tasks import read_config

PRESET = Path(__file__).resolve().parent.parent / "presets" / "digits-dit.json"


def cli(*args: str, log: Path) -> float:
    """Runs `diffusionblocks ARGS` in a fresh process, its output appended to log; returns its wall time."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ diffusionblocks {' '.join(args)}\n")
        f.flush()
        subprocess.run([sys.executable, "-m", "diffusionblocks", *args, "--no-progress"] if args[0] == "train"
                       else [sys.executable, "-m", "diffusionblocks", *args], check=True, stdout=f, stderr=f)
    return time.perf_counter() - t0


def training_cost(run: Path) -> dict:
    """Time, steps and peak memory of what the last `train` of run trained (not the blocks it copied)."""
    s = json.loads((run / "train_summary.json").read_text())
    rows = [b for b in s["blocks"] if b["block"] in s["trained_now"]]
    return {"train_s": sum(b["train_time_s"] for b in rows), "block_steps": sum(b["steps"] for b in rows),
            "steps_per_s": [round(b["steps_per_s"], 1) for b in rows],
            "peak_train_mem_mib": s["peak_train_memory_bytes"] / 2**20}


class Judges:
    """The class classifier over every domain, the domain judges, and the held-out features of each domain."""

    def __init__(self, domains: list[str], cache: Path):
        self.data = {d: load_image_data(DataConfig(dataset=d)) for d in ["digits", *domains]}
        self.clf, _ = load_or_train_reference_classifier(union([s.train for s in self.data.values()]), cache)
        self.judge = {d: load_or_train_reference_classifier(
            union([self.data["digits"].train, self.data[d].train], by_domain=True), cache)[0] for d in domains}
        # FD to a domain is measured in the features of that domain's own reference classifier (the one
        # `diffusionblocks evaluate` uses for a run on it): the union's class features barely see the domain.
        self.fd_clf = {d: load_or_train_reference_classifier(s.train, cache)[0] for d, s in self.data.items()}
        self.test_features = {d: features(self.fd_clf[d], s.test.images) for d, s in self.data.items()}

    def fd(self, images: torch.Tensor) -> dict[str, float]:
        return {d: frechet_distance(features(self.fd_clf[d], images), ft) for d, ft in self.test_features.items()}

    def floors(self) -> dict:
        """What the numbers mean: the classifiers' held-out accuracy, and FDs between real image sets."""
        out = {"class_accuracy": {d: float((predict(self.clf, s.test.images) == s.test.labels).double().mean())
                                  for d, s in self.data.items()},
               "fd_train_vs_test": {d: self.fd(s.train.images)[d] for d, s in self.data.items()},
               "fd_between_domains": {d: self.fd(self.data["digits"].test.images)[d] for d in self.judge},
               "judge_accuracy": {}}
        for d, judge in self.judge.items():
            a, b = self.data["digits"].test.images, self.data[d].test.images
            right = (predict(judge, a) == 0).sum() + (predict(judge, b) == 1).sum()
            out["judge_accuracy"][d] = float(right) / (len(a) + len(b))
        return out

    def score(self, run: Path, num: int, seed: int = 0, profile: bool = True) -> tuple[dict, torch.Tensor]:
        """Conditional accuracy, FD to each domain's held-out images, each judge's fraction in its domain; with
        profile, the fraction of the denoised estimate D(x_i) judged in each domain at every step."""
        model, cfg = from_pretrained(run)
        s = cfg.sample
        labels = class_labels_evenly(num, cfg.model.num_classes)
        estimates: list[tuple[float, torch.Tensor]] = []
        t0 = time.perf_counter()
        images = generate(model, labels, image_shape=(1, cfg.model.image_size, cfg.model.image_size),
                          num_classes=cfg.model.num_classes, steps=s.steps, sampler=s.sampler, guidance=s.guidance,
                          grid=s.grid, seed=seed, batch_size=num,
                          callback=(lambda d: estimates.append((float(d["sigma"]), d["denoised"].clamp(-1, 1))))
                          if profile else None)
        sampling_s = time.perf_counter() - t0
        r = {"conditional_accuracy": float((predict(self.clf, images) == labels).double().mean()),
             "fd": self.fd(images),
             "in_domain": {d: float((predict(j, images) == 1).double().mean()) for d, j in self.judge.items()},
             "num": num, "sampling_s": sampling_s}
        if profile:
            r["profile"] = {"sigma": [sig for sig, _ in estimates],
                            **{d: [float((predict(j, x) == 1).double().mean()) for _, x in estimates]
                               for d, j in self.judge.items()}}
        return r, images


def cached(path: Path, make):
    """The JSON at path, or make()'s result written there."""
    if path.is_file():
        return json.loads(path.read_text())
    value = make()
    path.write_text(json.dumps(value, indent=1) + "\n")
    return value


def convergence(out: Path, judges: Judges, steps: int, points: int, num: int, log: Path) -> dict:
    """Experiment 3: B=1 and B=3 on domain A, evaluated at `points` equally spaced points of training."""
    curves = {}
    for B in (1, 3):
        run = out / "runs" / f"A-B{B}"
        rows = []
        for k in range(1, points + 1):
            at = steps * k // points

            def leg():
                overrides = [f"train.steps_per_block={at}", "train.checkpoint_every=100000"]
                if (run / "config.json").is_file():
                    wall = cli("train", "--resume", str(run), *overrides, log=log)
                else:
                    wall = cli("train", "--config", str(PRESET), "--out", str(run), f"blocks.num_blocks={B}",
                               f"name=digits-dit-B{B}", *overrides, log=log)
                infos = [block_info(run, b) for b in range(B)]
                r, _ = judges.score(run, num, profile=False)
                return {"steps": at, "train_s": sum(i["train_time_s"] for i in infos),
                        "block_steps": sum(i["step"] for i in infos), "leg_wall_s": wall,
                        "conditional_accuracy": r["conditional_accuracy"], "fd": r["fd"]["digits"]}

            rows.append(cached(out / "points" / f"A-B{B}-{at}.json", leg))
            print(f"convergence B={B} step {at}: {rows[-1]}", flush=True)
        curves[B] = rows
    return curves


def adaptation(out: Path, judges: Judges, domain: str, steps: int, num: int, log: Path) -> dict:
    """Experiment 1: the A models fine-tuned on `domain` for `steps` steps, one block, every block, or end to end."""
    variants = {"A, not fine-tuned (B=3)": (None, []), "A, not fine-tuned (B=1)": ("A-B1", None),
                "(a) lowest-noise block 2 only": ("A-B3", ["--blocks", "2"]),
                "middle block 1 only": ("A-B3", ["--blocks", "1"]),
                "(b) highest-noise block 0 only": ("A-B3", ["--blocks", "0"]),
                "(c) every block (B=3)": ("A-B3", []),
                "(d) end to end (B=1)": ("A-B1", [])}
    results = {}
    for i, (name, (src, extra)) in enumerate(variants.items()):
        if src is None or extra is None:
            run, cost = out / "runs" / (src or "A-B3"), None
        else:
            run = out / "runs" / f"{domain}-ft{i}"
            if not (run / "train_summary.json").is_file():
                cli("train", "--from", str(out / "runs" / src), "--out", str(run), *extra,
                    f"data.dataset=digits-{domain}", f"train.steps_per_block={steps}",
                    f"name=ft-{domain}-{i}", log=log)
            cost = training_cost(run)

        def score(run=run):
            r, images = judges.score(run, num)
            torch.save(images, run / f"samples-{num}.pt")
            return r

        r = cached(run / f"modular-adapt-{domain}-{num}.json", score)
        results[name] = {"run": str(run), **r, "cost": cost}
        print(f"adaptation {domain} {name}: {results[name]['in_domain']['digits-' + domain]:.3f} in B, acc "
              f"{r['conditional_accuracy']:.3f}, FD to B {r['fd']['digits-' + domain]:.2f}", flush=True)
    return results


def _blocks(start: int, stop: int) -> str:
    return f"block {start}" if stop == start + 1 else f"blocks {start}-{stop - 1}"


def composition(out: Path, judges: Judges, domain: str, steps: int, num: int, log: Path) -> dict:
    """Experiment 2: B=3 trained on `domain` from scratch, composed with A's B=3 at each seam, both ways."""
    a, b = out / "runs" / "A-B3", out / "runs" / f"{domain}-B3"
    if not (b / "train_summary.json").is_file():
        cli("train", "--config", str(PRESET), "--out", str(b), f"data.dataset=digits-{domain}",
            f"train.steps_per_block={steps}", f"name=digits-{domain}-dit", log=log)
    models = {"A (B=3)": (a, ["digits"] * 3), f"{domain} (B=3)": (b, [f"digits-{domain}"] * 3)}
    for seam in (1, 2):
        for hi, lo, hi_d, lo_d in ((a, b, "digits", f"digits-{domain}"), (b, a, f"digits-{domain}", "digits")):
            name = f"{'A' if hi == a else domain} {_blocks(0, seam)} + {domain if lo == b else 'A'} {_blocks(seam, 3)}"
            run = out / "runs" / f"{domain}-compose-{'AB' if hi == a else 'BA'}{seam}"
            if not (run / "config.json").is_file():
                cli("compose", "--block", f"{','.join(map(str, range(seam)))}={hi}",
                    "--block", f"{','.join(map(str, range(seam, 3)))}={lo}", "--out", str(run),
                    f"data.dataset={lo_d}", log=log)
            models[name] = (run, [hi_d] * seam + [lo_d] * (3 - seam))
    results = {}
    for name, (run, domains) in models.items():
        def score(run=run, domains=domains):
            r, images = judges.score(run, num)
            torch.save(images, run / f"samples-{num}.pt")
            model, cfg = from_pretrained(run)
            s = cfg.sample
            r["chain"] = chain_diagnostics(model, [judges.data[d].test for d in domains], judges.clf,
                                           num=len(judges.data["digits"].test), steps=s.steps, sampler=s.sampler,
                                           guidance=s.guidance, grid=s.grid)
            r["chain"].pop("per_step")
            r["block_domains"] = domains
            return r

        results[name] = {"run": str(run), **cached(run / f"modular-compose-{domain}-{num}.json", score)}
        print(f"composition {domain} {name}: {results[name]['in_domain']['digits-' + domain]:.3f} in B", flush=True)
    return results


# ---- report


def _grid_figure(path: Path, entries: dict[str, tuple[Path, str]], num: int) -> None:
    """One panel per model: 6 samples of each class, a row per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(entries)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, (run, caption)) in zip(axes.flat, entries.items()):
        images = torch.load(run / f"samples-{num}.pt")
        per_class = images.view(10, num // 10, *images.shape[1:])[:, :6].flatten(0, 1)  # (60, C, H, W)
        g = image_grid(per_class, nrow=6)
        ax.imshow(g[..., 0], cmap="gray", interpolation="nearest")
        ax.set_title(f"{title}\n{caption}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_convergence(path: Path, curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for B, rows in curves.items():
        label = "end to end (B=1)" if B == 1 else f"DiffusionBlocks (B={B})"
        axes[0].plot([r["steps"] for r in rows], [r["fd"] for r in rows], "o-", label=label)
        axes[1].plot([r["train_s"] for r in rows], [r["fd"] for r in rows], "o-", label=label)
        axes[2].plot([r["steps"] for r in rows], [r["conditional_accuracy"] for r in rows], "o-", label=label)
    axes[0].set_xlabel("steps (per block; equal layer evaluations)")
    axes[1].set_xlabel("training seconds (sum over blocks)")
    axes[2].set_xlabel("steps (per block)")
    for ax in axes[:2]:
        ax.set_ylabel("FD to held-out digits")
        ax.set_yscale("log")
    axes[2].set_ylabel("conditional accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_profiles(path: Path, results: dict, domain: str, title: str) -> None:
    """Fraction of D(x_i) judged in domain B along the chain, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    for name, r in results.items():
        ax.plot(r["profile"]["sigma"], r["profile"][domain], lw=1.4, label=name)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("sigma of the step (sampling goes left to right)")
    ax.set_ylabel(f"D(x) judged {domain}")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _first_reaching(rows: list[dict], fd: float) -> int | None:
    return next((r["steps"] for r in rows if r["fd"] <= fd), None)


def write_report(out: Path, args: argparse.Namespace, floors: dict, curves: dict, adapt: dict, comp: dict) -> None:
    cfg = read_config(out / "runs" / "A-B3")
    num = args.num
    lines = ["# Modular blocks: adaptation by one block, composition across runs, the cost of convergence", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}. Command: `python "
             f"benchmarks/modular.py --out {args.out} --domains {','.join(args.domains)} --steps {args.steps} "
             f"--finetune-steps {args.finetune_steps} --points {args.points} --num {num}` "
             f"({(time.time() - args.t0) / 60:.0f} minutes for what this invocation ran).", "",
             f"Model: DiT, {cfg.model.depth} layers of width {cfg.model.hidden_size}, patch {cfg.model.patch_size}, "
             f"batch {cfg.train.batch_size}, lr {cfg.train.lr}, EMA half-life {cfg.train.ema_halflife_steps} steps "
             "(the main job's); domain A: the 8x8 digits (1,500 training, 297 held-out images); domain B: the same "
             "images " + ", ".join(f"`digits-{d}`" for d in args.domains) + ". Sampling: Euler, 50 steps, guidance "
             f"2, {num} samples (100 per class, seed 0) per model, 500 for the convergence curves. One seed per "
             "model: differences of a few hundredths in accuracy or judge fraction are within noise.", "",
             "Judges: a reference classifier of the class trained on the training images of every domain "
             "(conditional accuracy), per domain B a domain judge trained on A and B, and each domain's own reference "
             "classifier (the one `diffusionblocks evaluate` uses), in whose features the FD to that domain is taken.",
             "", "| judge | held-out accuracy |", "|---|---|"]
    for d, acc in floors["class_accuracy"].items():
        lines.append(f"| class classifier on {d} | {acc:.4f} |")
    for d, acc in floors["judge_accuracy"].items():
        lines.append(f"| domain judge digits vs {d} | {acc:.4f} |")
    lines += ["", "FD floors (all real training images vs the held-out images of the same domain): " + ", ".join(
        f"{d} {v:.2f}" for d, v in floors["fd_train_vs_test"].items()) + "; real A (held-out digits) against "
        "domain B's held-out images: " + ", ".join(f"{d} {v:.2f}" for d, v in floors["fd_between_domains"].items())
        + ". A model's FD to B well under that to A is on B's side.", ""]

    for domain in args.domains:
        lines += [f"## 1. Adaptation to digits-{domain} by fine-tuning ({args.finetune_steps} steps each)", "",
                  f"From the step-{args.steps} A models of section 1; the fine-tuned blocks train on digits-{domain} "
                  "(same lr, warm-up and EMA as from scratch), the others are copied unchanged. In B: the domain "
                  "judge's fraction of samples in digits-" + domain + ". Train s and memory: the fine-tuning job "
                  "(peak resident memory above the process' start, CPU).", "",
                  "| variant | in B | cond. acc. | FD to B | FD to A | train s (steps/s) | peak train MiB |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in adapt[domain].items():
            c = r["cost"]
            cost = ("-", "-") if c is None else (f"{c['train_s']:.1f} ({c['block_steps'] / c['train_s']:.0f})",
                                                 f"{c['peak_train_mem_mib']:.0f}")
            lines.append(f"| {name} | {r['in_domain']['digits-' + domain]:.3f} | {r['conditional_accuracy']:.3f} | "
                         f"{r['fd']['digits-' + domain]:.2f} | {r['fd']['digits']:.2f} | {cost[0]} | {cost[1]} |")
        lines += ["", f"![where the domain is decided](profile-adapt-{domain}.png)", "",
                  f"![samples](samples-adapt-{domain}.png)", ""]
        lines += [f"## 2. Composition of A (digits) and B (digits-{domain}) blocks", "",
                  "Each model's blocks come byte for byte from the two B=3 runs (trained from scratch, "
                  f"{args.steps} steps per block); `compose` takes the config of block 0's source, evaluated here "
                  "on both domains alike.", "",
                  "| model | in B | cond. acc. | FD to B | FD to A |", "|---|---|---|---|---|"]
        for name, r in comp[domain].items():
            lines.append(f"| {name} | {r['in_domain']['digits-' + domain]:.3f} | {r['conditional_accuracy']:.3f} | "
                         f"{r['fd']['digits-' + domain]:.2f} | {r['fd']['digits']:.2f} |")
        lines += ["", "Chain diagnostics per block (oracle: the block's own domain's held-out images + sigma eps; "
                  "chain: the sampler's state; input shift: pixel FD between the two; the seam is the first block "
                  "of the second run):", "",
                  "| model | block | domain | oracle acc. | chain acc. | gap | input shift FD |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in comp[domain].items():
            for b in r["chain"]["per_block"]:
                lines.append(f"| {name} | {b['block']} | {r['block_domains'][b['block']]} | {b['oracle_accuracy']:.3f}"
                             f" | {b['chain_accuracy']:.3f} | {b['composition_gap']:+.3f} | {b['input_shift_fd']:.4f} |")
        lines += ["", f"![where the domain is decided](profile-compose-{domain}.png)", "",
                  f"![samples](samples-compose-{domain}.png)", ""]
    lines += ["## 3. The cost of convergence: B=1 and B=3 at equal compute", "",
              f"Both from scratch on domain A, {args.steps} steps (B=3: per block), evaluated every "
              f"{args.steps // args.points} steps. At each point the two models have run the same number of layer "
              "evaluations. Train s: the sum over blocks of their training time (sequential schedule).", "",
              "| steps | B=1 FD | B=3 FD | B=1 acc. | B=3 acc. | B=1 train s (steps/s) | B=3 train s (steps/s per block) |",
              "|---|---|---|---|---|---|---|"]
    for r1, r3 in zip(curves["1"], curves["3"]):
        lines.append(f"| {r1['steps']} | {r1['fd']:.2f} | {r3['fd']:.2f} | {r1['conditional_accuracy']:.3f} | "
                     f"{r3['conditional_accuracy']:.3f} | {r1['train_s']:.0f} ({r1['steps'] / r1['train_s']:.1f}) | "
                     f"{r3['train_s']:.0f} ({3 * r3['steps'] / r3['train_s']:.1f}) |")
    f1, f3 = curves["1"][-1]["fd"], curves["3"][-1]["fd"]
    lines += ["", f"Final FD: B=1 {f1:.2f}, B=3 {f3:.2f}. B=3 first reaches B=1's final FD at step "
              f"{_first_reaching(curves['3'], f1)}; B=1 first reaches B=3's final FD at step "
              f"{_first_reaching(curves['1'], f3)} (None: not within {args.steps} steps).", "",
              "![convergence](convergence.png)", ""]

    (out / "report.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/modular")
    parser.add_argument("--domains", default="thick", help="comma-separated domains B: thick, inverted")
    parser.add_argument("--steps", type=int, default=1600, help="steps (per block) of the models trained from scratch")
    parser.add_argument("--finetune-steps", type=int, default=400, help="steps (per trained block) of each fine-tuning")
    parser.add_argument("--points", type=int, default=10, help="evaluations along training (convergence)")
    parser.add_argument("--num", type=int, default=1000, help="samples per model (convergence points: half)")
    args = parser.parse_args()
    args.domains = [d for d in args.domains.split(",") if d]
    args.t0 = time.time()
    precision.flush_denormals()
    out = Path(args.out)
    for sub in ("runs", "points", "cache"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    judges = Judges([f"digits-{d}" for d in args.domains], out / "cache")
    floors = cached(out / "floors.json", judges.floors)
    curves = {str(B): rows for B, rows in convergence(out, judges, args.steps, args.points, args.num // 2, log).items()}
    adapt, comp = {}, {}
    for domain in args.domains:
        adapt[domain] = adaptation(out, judges, domain, args.finetune_steps, args.num, log)
        comp[domain] = composition(out, judges, domain, args.steps, args.num, log)
    (out / "report.json").write_text(json.dumps({"floors": floors, "convergence": curves, "adaptation": adapt,
                                                 "composition": comp}, indent=1) + "\n")
    _plot_convergence(out / "convergence.png", curves)
    for domain in args.domains:
        _plot_profiles(out / f"profile-adapt-{domain}.png", adapt[domain], f"digits-{domain}",
                       f"A models fine-tuned on digits-{domain}: where along the chain the domain is decided")
        _plot_profiles(out / f"profile-compose-{domain}.png", comp[domain], f"digits-{domain}",
                       f"A and digits-{domain} blocks composed")
        for kind, results in (("adapt", adapt[domain]), ("compose", comp[domain])):
            _grid_figure(out / f"samples-{kind}-{domain}.png",
                         {name: (Path(r["run"]), f"in B {r['in_domain']['digits-' + domain]:.2f}, acc "
                                 f"{r['conditional_accuracy']:.2f}") for name, r in results.items()}, args.num)
    write_report(out, args, floors, curves, adapt, comp)
    print((out / "report.md").read_text())


if __name__ == "__main__":
    main()
