"""The shell commands of README.md and docs/*.md work as written.

Every `diffusionblocks` command (also after `torchrun ... -m`) must parse, and the config files it names
must load with its overrides. The cheap ones (the digits, the Gaussian mixture example) then run, in
the order the page gives them, in a scratch directory laid out like the repository, at a tiny size:
training and comparisons get a few steps, sampling and evaluation a few samples and steps.
"""

import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import pytest

from diffusionblocks.cli import _parse, _run_task, build_parser, main
from diffusionblocks.tasks import apply_overrides, available, get_task, load_config

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# What runs: the configs small enough for a test; the others (CIFAR, MNIST, text8, GPU presets) only parse.
CHEAP_CONFIGS = {None, "mixture.json", "presets/digits-thick-dit.json"}
SHORT_TRAIN = ["train.steps_per_block=3", "train.batch_size=16", "train.log_every=1", "train.checkpoint_every=2",
               "train.lr_warmup_steps=1"]
SHORT_DIGITS_SAMPLES = ["sample.steps=4", "sample.samples_per_class=2"]  # the samples a digits run draws when done


def commands(page: Path) -> list[tuple[str, list[str], bool]]:
    """(directory, argv after `diffusionblocks`, runnable) for each command of the page's bash blocks; a command that
    reads the run of one that cannot run here (a GPU preset, a user's own model directory) cannot run either."""
    out, cwd, unmade = [], ".", set()
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", page.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("cd "):
                cwd = line[3:].strip()
                continue
            words = shlex.split(line.replace('"$SLURM_ARRAY_TASK_ID"', "0"), comments=True)
            if not words:
                continue
            if words[0] == "diffusionblocks":
                argv, torchrun = words[1:], False
            elif words[0] == "torchrun" and "diffusionblocks" in words:
                argv, torchrun = words[words.index("diffusionblocks") + 1:], True
            else:
                continue
            config = argv[argv.index("--config") + 1] if "--config" in argv else None
            runnable = (not torchrun and argv[0] != "bench" and config in CHEAP_CONFIGS
                        and not any(a.startswith("/shared/") or a in unmade for a in argv))
            if not runnable and "--out" in argv:
                unmade.add(argv[argv.index("--out") + 1])
            out.append((cwd, argv, runnable))
    return out


def shrink(argv: list[str]) -> list[str]:
    """The same command at a tiny size: a few training steps, a few samples at a few steps."""
    verb = argv[0]
    argv = list(argv)
    config = argv[argv.index("--config") + 1] if "--config" in argv else None
    # The default DiT, or a digits preset of it.
    digits = (config is None or config.startswith("presets/digits")) and not any("runs/00000-mixture" in a for a in argv)
    if digits and verb in ("train", "compare") and "--resume" not in argv:
        argv += SHORT_DIGITS_SAMPLES
    if digits and verb in ("sample", "evaluate") and "--steps" not in argv:
        argv += ["--steps", "4"]
    if "--num" in argv:
        i = argv.index("--num") + 1
        argv[i] = str(min(int(argv[i]), 20))
    if verb in ("sample", "evaluate", "compare"):
        argv += ["--no-progress"] if verb != "compare" else []
        if verb != "compare" and "--num" not in argv:
            argv += ["--num", "20"]
    if verb == "compare":
        argv += ["--num", "20", "--no-progress", *SHORT_TRAIN] if "--num" not in argv else [*SHORT_TRAIN]
    if verb == "train":
        argv += ["--no-progress", *SHORT_TRAIN]
    return argv


def test_the_pages_have_commands():
    found = {page.name: commands(page) for page in PAGES}
    assert len(found["README.md"]) >= 15 and found["distributed.md"] and found["extending.md"]
    assert any(runnable for cmds in found.values() for *_, runnable in cmds)


def parses(argv: list[str]):
    """The parsed arguments; `sample` and `evaluate` take their run's task options, so any task's may do."""
    tasks = [None] if argv[0] not in ("sample", "evaluate") else [get_task(name) for name in available()]
    for task in tasks:
        try:
            return _parse(build_parser(task), argv)
        except SystemExit:
            continue
    raise AssertionError(f"`diffusionblocks {' '.join(argv)}` does not parse")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_parses_and_its_config_loads(page, monkeypatch):
    for cwd, argv, _ in commands(page):
        args = parses(argv)
        if getattr(args, "config", None):
            monkeypatch.chdir(ROOT / cwd)  # a task named "module:Class" is imported from there
            assert Path(args.config).is_file(), (page.name, argv)
            apply_overrides(load_config(args.config), args.overrides)


@pytest.mark.parametrize("page", [p for p in PAGES if any(r for *_, r in commands(p))], ids=lambda p: p.name)
def test_the_cheap_commands_run_as_written(page, tmp_path, monkeypatch, capsys, one_thread):
    # A scratch copy of the repository's layout: presets/, examples/ and ../shared beside it.
    work = tmp_path / "repo"
    work.mkdir()
    (work / "presets").symlink_to(ROOT / "presets")
    shutil.copytree(ROOT / "examples", work / "examples", ignore=shutil.ignore_patterns("runs", "__pycache__"))
    if (ROOT.parent / "shared").exists():
        (tmp_path / "shared").symlink_to((ROOT.parent / "shared").resolve())
    monkeypatch.setenv("DIFFUSIONBLOCKS_CACHE", str(tmp_path / "cache"))
    for cwd, argv, runnable in commands(page):
        if not runnable:
            continue
        monkeypatch.chdir(work / cwd)
        run = shrink(argv)
        assert _run_task(run) is not None or run[0] not in ("sample", "evaluate"), run
        t0 = time.perf_counter()
        code = main(run)
        print(f"{time.perf_counter() - t0:6.1f} s  {' '.join(run)}", file=sys.__stdout__)
        assert code == 0, (page.name, " ".join(argv), capsys.readouterr().err[-2000:])
