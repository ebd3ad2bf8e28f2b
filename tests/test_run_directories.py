"""Run directories under kills, races and damage (issue 24): compose claims --out in one rename, copied blocks are
checked against their recorded sha256 and judged by their source, and each input a user can get wrong gets one line."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusionblocks import checkpoint, compose, pretrained, rundir
from diffusionblocks.cli import main
from diffusionblocks.tasks import apply_overrides, read_config

HERE = Path(__file__).parent
# Two blocks of one layer, 4 steps each (checkpoints at 2 and 4): small enough to train in a second.
SMALL = ["model.hidden_size=16", "model.num_heads=2", "model.depth=2", "blocks.num_blocks=2", "train.batch_size=8",
         "train.steps_per_block=4", "train.log_every=1", "train.checkpoint_every=2", "train.lr_warmup_steps=1",
         "train.ema_halflife_steps=0", "sample.steps=2", "sample.samples_per_class=1"]


def run_cli(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.err, out.out


def refused(capsys, args, message) -> str:
    code, err, _ = run_cli(capsys, *args)
    assert code == 2, err
    assert err.count("\n") == 1 and message in err, err
    return err


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """Two runs of one model: seed 0, and seed 1."""
    root = tmp_path_factory.mktemp("sources")
    a, b = root / "a", root / "b"
    assert main(["train", "--out", str(a), "--no-progress", *SMALL]) == 0
    assert main(["train", "--out", str(b), "--no-progress", *SMALL, "train.seed=1"]) == 0
    return a, b


def weights(run: Path, B: int = 2) -> list[bytes]:
    return [checkpoint.block_weights_path(run, b).read_bytes() for b in range(B)]


def stagings(parent: Path) -> list[Path]:
    return sorted(parent.glob(".*.compose.*.tmp"))


def assert_whole(run: Path, source: Path) -> None:
    """`run` is the composition of both blocks of `source`: its files are the source's, as composition.json says."""
    assert weights(run) == weights(source)
    rows = checkpoint.read_composition(run)
    assert [r["run"] for r in rows] == [str(source.resolve())] * 2
    for r in rows:
        assert checkpoint.sha256_file(checkpoint.block_weights_path(run, r["block"])) == r["sha256"]
    assert read_config(run).name.endswith("-composed")
    umask = os.umask(0)
    os.umask(umask)
    assert run.stat().st_mode & 0o777 == 0o777 & ~umask  # a directory like any other, not a temporary's


def composed(tmp_path, name, *specs) -> Path:
    out = tmp_path / name
    args = [x for spec in specs for x in ("--block", spec)]
    assert main(["compose", *args, "--out", str(out)]) == 0
    return out


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 1  # in the tensors' bytes: the file still parses, only a checksum can tell
    path.write_bytes(bytes(data))


# ---- compose claims --out atomically


# One compose per line of stdin, started as soon as the line arrives: the parent writes the same line to two of
# these at once (the barrier), and reads each one's exit code and error line back.
COMPOSER = """
import contextlib, io, json, logging, sys
import torch
torch.set_num_threads(1)
logging.basicConfig(level=logging.WARNING)
from diffusionblocks.cli import main
from diffusionblocks.tasks import apply_overrides
print("ready", flush=True)
for line in sys.stdin:
    err = io.StringIO()
    source, out = json.loads(line)
    with contextlib.redirect_stderr(err):
        code = main(["compose", "--block", "0,1=" + source, "--out", out])
    print(json.dumps([code, err.getvalue()]), flush=True)
"""


def test_two_composes_into_one_out_at_once_never_both_succeed(runs, tmp_path):
    a, b = runs
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {src: subprocess.Popen([sys.executable, "-c", COMPOSER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True, env=env) for src in (a, b)}
    try:
        assert all(p.stdout.readline().strip() == "ready" for p in procs.values())
        for trial in range(4):
            out = tmp_path / f"out{trial}"
            if trial % 2:
                out.mkdir()  # an empty directory is a valid --out: it is claimed as atomically
            for src, p in procs.items():  # released together
                p.stdin.write(json.dumps([str(src), str(out)]) + "\n")
                p.stdin.flush()
            results = {src: json.loads(p.stdout.readline()) for src, p in procs.items()}
            codes = sorted(code for code, _ in results.values())
            assert codes == [0, 2], results
            winner = next(src for src, (code, _) in results.items() if code == 0)
            loser_err = next(err for code, err in results.values() if code == 2)
            assert loser_err.count("\n") == 1 and ("was filled by another command" in loser_err or
                                                   "already exists" in loser_err), loser_err
            assert_whole(out, winner)
            assert not stagings(tmp_path)
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait(timeout=60)


@pytest.mark.parametrize("empty_out", [False, True])
def test_the_loser_of_a_race_for_out_says_so_in_one_line_and_leaves_the_winners_run(runs, tmp_path, capsys,
                                                                                     monkeypatch, empty_out):
    """Deterministically: a second compose into the same --out completes while the first is about to rename."""
    a, b = runs
    out = tmp_path / "out"
    if empty_out:
        out.mkdir()
    publish = compose.publish

    def the_other_wins_first(target, out_):
        monkeypatch.setattr(compose, "publish", publish)
        compose.compose_run({0: b, 1: b}, out_)  # passes the early check too: --out is still free
        publish(target, out_)

    monkeypatch.setattr(compose, "publish", the_other_wins_first)
    refused(capsys, ["compose", "--block", f"0,1={a}", "--out", str(out)],
            f"--out {str(out)!r} was filled by another command while this one composed")
    assert_whole(out, b)
    assert not stagings(tmp_path)


def kill_points(labels: list[str]) -> list[int]:
    """The steps of a compose at which to kill it: a copy, a file's rename, the metadata's, the run's rename."""
    wanted = ("copy block_01.safetensors", "renamed block_00.safetensors", "rename composition.json",
              "rename-dir out", "renamed-dir out")
    return [labels.index(label) + 1 for label in wanted]


def faulty(n: int, mode: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(HERE / "faults.py"), str(n), mode, "--", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_compose_killed_at_any_step_leaves_nothing_that_blocks_the_retry(runs, tmp_path, capsys):
    a, _ = runs
    args = ["compose", "--block", f"0,1={a}"]
    proc = faulty(0, "kill", *args, "--out", str(tmp_path / "labels" / "out"))
    labels, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    points = kill_points(labels.splitlines())
    dirs = {n: tmp_path / f"k{n}" for n in points}
    for i in range(0, len(points), 2):  # two at a time
        procs = {n: faulty(n, "kill", *args, "--out", str(dirs[n] / "out")) for n in points[i:i + 2]}
        for n, p in procs.items():
            p.communicate(timeout=120)
            assert p.returncode == -signal.SIGKILL, n
    for n, label in zip(points, ("copy", "renamed", "rename", "rename-dir", "renamed-dir")):
        out = dirs[n] / "out"
        if label == "renamed-dir":  # killed after the run was whole and in place: it is the result
            assert not stagings(dirs[n])
            assert_whole(out, a)
            continue
        assert not out.exists() and [p.name for p in dirs[n].iterdir()] == [stagings(dirs[n])[0].name], label
        code, err, _ = run_cli(capsys, *args, "--out", str(out))  # the same command again
        assert code == 0, (label, err)
        assert_whole(out, a)
        assert not stagings(dirs[n])  # the killed one's was removed: its process has ended
        assert main(["status", str(out)]) == 0


def test_a_full_disk_during_compose_stops_with_one_line_and_leaves_nothing(runs, tmp_path):
    a, _ = runs
    out = tmp_path / "parent" / "out"
    proc = faulty(4, "full", "compose", "--block", f"0,1={a}", "--out", str(out))  # the copy of block 1
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert err.strip().splitlines()[-1] == (f"diffusionblocks compose: error: could not write the composed run "
                                            f"{str(out)!r}: No space left on device; nothing of it was left behind")
    assert not (tmp_path / "parent").exists()  # not even the parent this compose created


def test_a_stale_staging_directory_of_a_live_compose_is_left_alone(runs, tmp_path):
    a, _ = runs
    live = tmp_path / f".out.compose.{socket.gethostname()}.{os.getpid()}.abcd1234.tmp"
    live.mkdir()  # as a compose of this (live) process would have it
    composed(tmp_path, "out", f"0,1={a}")
    assert live.is_dir()


# ---- the recorded sha256 is checked


def test_a_damaged_copy_is_refused_by_status_sample_compose_and_from(runs, tmp_path, capsys):
    a, b = runs
    c = composed(tmp_path, "c", f"0={a}", f"1={b}")
    flip_a_bit(checkpoint.block_weights_path(c, 1))
    message = f"checkpoint {str(checkpoint.block_weights_path(c, 1))!r} is damaged or was replaced"
    png = str(tmp_path / "x.png")
    for args in (["status", str(c)], ["sample", str(c), "--num", "2", "--out", png],
                 ["sample", str(c), "--stream", "--num", "2", "--no-progress", "--out", png],
                 ["evaluate", str(c), "--num", "4", "--no-progress", "--out", str(tmp_path / "ev")],
                 ["compose", "--block", f"0,1={c}", "--out", str(tmp_path / "d")],
                 ["train", "--from", str(c), "--blocks", "0", "--out", str(tmp_path / "ft"), "--no-progress"],
                 ["train", "--resume", str(c), "--no-progress"]):
        err = refused(capsys, args, message)
        assert f"copy the block again from {str(b.resolve())!r}" in err
    assert not any((tmp_path / name).exists() for name in ("x.png", "d", "ft", "ev"))
    shutil.copy(checkpoint.block_weights_path(b, 1), checkpoint.block_weights_path(c, 1))  # copied again
    code, err, _ = run_cli(capsys, "status", str(c))
    assert code == 0 and "2/2 trained" in _, err


def test_a_plain_run_is_loaded_without_hashing_and_a_composed_one_hashes_each_block_once(runs, tmp_path,
                                                                                         monkeypatch):
    a, b = runs
    c = composed(tmp_path, "c", f"0={a}", f"1={b}")
    hashed = []
    real = checkpoint.sha256_file
    monkeypatch.setattr(checkpoint, "sha256_file", lambda path: hashed.append(Path(path).name) or real(path))
    from diffusionblocks.generate import generate

    for stream in (False, True):
        model, _ = pretrained.from_pretrained(a, stream=stream)
        generate(model, torch.arange(4), image_shape=(1, 8, 8), num_classes=10, steps=6)
        assert hashed == []
    model, _ = pretrained.from_pretrained(c, stream=True)
    for seed in range(2):  # every sample passes through both blocks: each is loaded four times
        generate(model, torch.arange(4), image_shape=(1, 8, 8), num_classes=10, steps=6, seed=seed)
    assert model.blocks.loads == 4 and sorted(hashed) == ["block_00.safetensors", "block_01.safetensors"]


# ---- a copied block is judged by its source and never retrained here


@pytest.fixture(scope="module")
def partial(runs, tmp_path_factory):
    """Run a, asked afterwards for 8 steps per block (as `train --resume a train.steps_per_block=8` would): its
    blocks stopped at 4 of their 8."""
    a, _ = runs
    p = tmp_path_factory.mktemp("partial") / "p"
    shutil.copytree(a, p)
    rundir.save_config(p, apply_overrides(read_config(p), ["train.steps_per_block=8"]))
    return p


def test_a_copy_its_source_left_partly_trained_is_kept_and_described(runs, partial, tmp_path, capsys, caplog):
    a, _ = runs
    c = composed(tmp_path, "c", f"0={a}", f"1={partial}")
    code, err, out = run_cli(capsys, "status", str(c))
    assert code == 0, err
    assert "block 0 (sigma" in out and "trained, step 4/4 of its source" in out
    assert "partial, 50%, step 4/8 of its source" in out and "cut short" not in out
    assert f"fine-tune it with train --from {c} --blocks 1" in out and "1/2 trained" in out
    before = weights(c)
    with caplog.at_level("INFO", logger="diffusionblocks"):
        code, err, _ = run_cli(capsys, "train", "--resume", str(c), "--no-progress")
    assert code == 0, err
    assert weights(c) == before and "training block(s) [], " in caplog.text
    assert f"block 1 is a copy of block 1 of {partial.resolve()}, which stopped at step 4 of its 8" in caplog.text
    refused(capsys, ["train", "--resume", str(c), "--blocks", "1"], "has no training state to continue it")
    assert weights(c) == before


def test_a_copy_trained_to_its_sources_end_is_complete_whatever_the_runs_own_steps(runs, partial, tmp_path, capsys):
    a, _ = runs
    c = composed(tmp_path, "c", f"0={partial}", f"1={a}")  # config of block 0's source: 8 steps per block
    code, err, out = run_cli(capsys, "status", str(c))
    assert code == 0 and "8 steps per block" in out and "block 1 (sigma" in out
    assert "trained, step 4/4 of its source" in out and "its weights are from step 4" not in out
    before = weights(c)
    code, err, _ = run_cli(capsys, "train", "--resume", str(c), "--no-progress", "train.steps_per_block=12")
    assert code == 0, err
    assert weights(c) == before


def test_from_a_composed_run_fine_tunes_the_named_block_and_keeps_the_others(runs, tmp_path, capsys, caplog):
    a, b = runs
    c = composed(tmp_path, "c", f"0={a}", f"1={b}")
    new = tmp_path / "new"
    code, err, _ = run_cli(capsys, "train", "--from", str(c), "--blocks", "1", "--out", str(new), "--no-progress",
                           "train.steps_per_block=6")
    assert code == 0, err
    assert weights(new)[0] == weights(a)[0] and checkpoint.state_step(new, 1) == 6
    code, err, out = run_cli(capsys, "status", str(new))
    assert code == 0 and "2/2 trained" in out and "cut short" not in out, out
    assert f"block 0 kept from {a.resolve()} (digits-dit, step 4, via {c.resolve()})" in out
    assert f"block 1 fine-tuned from {c.resolve()}" in out
    before = weights(new)
    with caplog.at_level("INFO", logger="diffusionblocks"):
        code, err, _ = run_cli(capsys, "train", "--resume", str(new), "--no-progress")
    assert code == 0, err
    assert weights(new) == before and f"block 0: a copy of block 0 of {a.resolve()}" in caplog.text


def test_a_fine_tune_stopped_before_its_first_checkpoint_resumes_from_its_source(runs, tmp_path, capsys,
                                                                                   monkeypatch):
    from diffusionblocks import train as train_module

    a, b = runs
    c = composed(tmp_path, "c", f"0={a}", f"1={b}")
    args = ["--blocks", "1", "--no-progress", "train.steps_per_block=2", "train.checkpoint_every=2"]
    whole = tmp_path / "whole"
    assert main(["train", "--from", str(c), "--out", str(whole), *args]) == 0
    new = tmp_path / "new"
    real = train_module.train_step

    def interrupted(state, *a_, **kw):
        monkeypatch.setattr(train_module, "train_step", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train_step", interrupted)
    code, err, _ = run_cli(capsys, "train", "--from", str(c), "--out", str(new), *args)
    assert code == 130, err
    code, err, out = run_cli(capsys, "status", str(new))
    assert code == 0 and f"missing: to be fine-tuned from block 1 of {c.resolve()}" in out, out
    good = checkpoint.block_weights_path(c, 1).read_bytes()
    flip_a_bit(checkpoint.block_weights_path(c, 1))  # the weights it starts from must be those it was to start from
    refused(capsys, ["train", "--resume", str(new), "--no-progress"], "is damaged or was replaced")
    checkpoint.block_weights_path(c, 1).write_bytes(good)
    code, err, _ = run_cli(capsys, "train", "--resume", str(new), "--no-progress")
    assert code == 0, err
    for r in (new, whole):
        assert checkpoint.state_step(r, 1) == 2
    s_new, s_whole = (checkpoint.load_train_state(r, 1)["model"] for r in (new, whole))
    assert all(torch.equal(s_new[k], s_whole[k]) for k in s_whole)  # from c's block 1, not from scratch


# ---- leftovers of killed commands, and inputs that get one line


def test_a_config_temporary_left_by_a_killed_resume_is_removed_by_the_next(runs, tmp_path, capsys):
    a, _ = runs
    run = tmp_path / "r"
    shutil.copytree(a, run)
    proc = faulty(1, "kill", "train", "--resume", str(run), "--no-progress")  # at the rename of its config.json
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in run.glob(".config.json.*.tmp")] == [f".config.json.{socket.gethostname()}.{proc.pid}.tmp"]
    code, err, _ = run_cli(capsys, "train", "--resume", str(run), "--no-progress")
    assert code == 0, err
    assert not list(run.glob(".*.tmp"))


def test_a_directory_holding_only_a_killed_commands_leftovers_is_a_fresh_out(tmp_path, capsys, one_thread):
    run = tmp_path / "r"
    run.mkdir()
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    (run / f".config.json.{socket.gethostname()}.{ended.pid}.tmp").write_text("{")
    (run / "block_00.lock").write_text("")  # a lock nobody holds
    for args in (["status", str(run)], ["train", "--resume", str(run)]):
        refused(capsys, args, f"{str(run)!r} holds no run, only what a killed command left (no config.json): "
                              f"start the run with `diffusionblocks train --out {run}`")
    code, err, _ = run_cli(capsys, "train", "--out", str(run), "--no-progress", *SMALL)
    assert code == 0, err
    assert not list(run.glob(".*.tmp"))
    (run / "notes.txt").write_text("mine")  # anything else is not a leftover: still refused
    other = tmp_path / "o"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    refused(capsys, ["train", "--out", str(other), *SMALL], "already exists and is not empty")


@pytest.mark.parametrize("name,source,message", [
    ("bad_syntax", "x = (\n", "importing module 'bad_syntax' failed: SyntaxError: '(' was never closed (bad_syntax.py:1)"),
    ("raises", "raise RuntimeError('needs a GPU')\n", "importing module 'raises' failed: RuntimeError: needs a GPU "
                                                      "(raises.py:1)"),
    ("lacks_a_dependency", "import no_such_dependency\n", "importing module 'lacks_a_dependency' failed: "
     "ModuleNotFoundError: No module named 'no_such_dependency' (lacks_a_dependency.py:1)"),
])
def test_a_task_module_that_fails_to_import_is_named_in_one_line(tmp_path, capsys, monkeypatch, name, source,
                                                                  message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # get_task adds the working directory
    Path(f"{name}.py").write_text(source)
    err = refused(capsys, ["train", "--task", f"{name}:Task"], message)
    assert "(--traceback prints its traceback)" in err and not Path("runs").exists()
    code, err, _ = run_cli(capsys, "train", "--task", f"{name}:Task", "--traceback")
    assert code == 2 and "Traceback (most recent call last)" in err and f'{name}.py", line 1' in err
    assert err.strip().splitlines()[-1].startswith(f"diffusionblocks train: error: task='{name}:Task'")


def test_a_directory_as_config_and_a_file_as_run_are_named(runs, tmp_path, capsys):
    a, _ = runs
    refused(capsys, ["train", "--config", str(a)],
            f"config file {str(a)!r} is a directory, not a JSON file (the config of that run is "
            f"{str(a / 'config.json')!r}; `train --resume {a}` continues it)")
    refused(capsys, ["train", "--config", str(tmp_path)], f"config file {str(tmp_path)!r} is a directory")
    refused(capsys, ["compose", "--block", f"0,1={a / 'config.json'}", "--out", str(tmp_path / "c")],
            f"{str(a / 'config.json')!r} is a file, not a run directory")
    assert not (tmp_path / "c").exists()


def test_status_into_a_closed_pipe_stops_quietly(runs):
    a, _ = runs
    read, write = os.pipe()
    os.close(read)  # `status RUN | head` once head has gone
    proc = subprocess.run([sys.executable, "-m", "diffusionblocks", "status", str(a)], stdout=write,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    assert proc.returncode == 128 + signal.SIGPIPE and proc.stderr == ""
