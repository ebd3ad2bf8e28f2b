"""A run that dies at any instant resumes right, two jobs never train one block, and bad input gets one message."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusionblocks import checkpoint, rundir
from diffusionblocks.cli import main
from diffusionblocks.tasks import read_config

HERE = Path(__file__).parent
# Two blocks of one layer, two checkpoints each (steps 2 and 4): small enough to kill many times.
SMALL = ["model.hidden_size=16", "model.num_heads=2", "model.depth=2", "blocks.num_blocks=2", "train.batch_size=8",
         "train.steps_per_block=4", "train.log_every=1", "train.checkpoint_every=2", "train.lr_warmup_steps=1",
         "sample.steps=2", "sample.samples_per_class=1"]


def run_cli(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.err, out.out


def final_tensors(run: Path, B: int) -> dict[str, torch.Tensor]:
    """Every tensor a resume must reproduce: each block's inference weights and its training state's weights."""
    out = {}
    for b in range(B):
        out.update({f"w{b}.{k}": v for k, v in load_file(str(checkpoint.block_weights_path(run, b))).items()})
        state = checkpoint.load_train_state(run, b)
        out.update({f"s{b}.{k}": v for k, v in state["model"].items()})
        out[f"step{b}"] = torch.tensor(state["step"])
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:3]


def faulty(n: int, mode: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(HERE / "faults.py"), str(n), mode, "--", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_thread):
    """An uninterrupted run, and the labels of every step of its checkpoint writes."""
    run = tmp_path_factory.mktemp("ref") / "run"
    proc = faulty(0, "kill", "train", "--out", str(run), "--no-progress", *SMALL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return final_tensors(run, 2), out.splitlines()


def status_steps(capsys, run: Path) -> dict[int, tuple[str, int]]:
    """`status`'s word and step for each block: {b: ("trained" | "partial" | "missing", step)}."""
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    steps = {}
    for m in re.finditer(r"block (\d+) \([^)]*\): (trained|partial|missing)(?:, \d+%)?(?:, step (\d+)/)?", out):
        steps[int(m.group(1))] = (m.group(2), int(m.group(3) or 0))
    return steps


def resume_and_check(capsys, caplog, run: Path, expected: dict) -> None:
    """Resumes a broken run; status before must say what the resume then does, and the end must be exact."""
    before = status_steps(capsys, run) if (run / "config.json").is_file() else None
    weights = {b: checkpoint.block_weights_path(run, b).read_bytes()
               for b in range(2) if checkpoint.block_weights_path(run, b).is_file()}
    caplog.clear()
    with caplog.at_level("INFO", logger="diffusionblocks"):
        if before is None:  # killed before the run had a config: the same command starts it again
            code, err, _ = run_cli(capsys, "train", "--out", str(run), "--no-progress", *SMALL)
        else:
            code, err, _ = run_cli(capsys, "train", "--resume", str(run), "--no-progress")
    assert code == 0, err
    assert_same(final_tensors(run, 2), expected)
    assert not list(run.glob(".*.tmp")) and not list(run.glob("*.lock"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted((r["block"], r["step"]) for r in rows) == [(b, s) for b in range(2) for s in range(1, 5)]
    if before is None:
        return
    for b, (word, step) in before.items():
        resumed_at = f"block {b}: continuing from its checkpoint at step {step} of 4"
        if word == "trained":  # not trained again: its weights file is untouched
            assert checkpoint.block_weights_path(run, b).read_bytes() == weights[b]
        elif step > 0:
            assert resumed_at in caplog.text, (before, caplog.text)
        else:
            assert f"block {b}: continuing" not in caplog.text


def kill_points(labels: list[str]) -> list[int]:
    """Every step of block 0's two checkpoints (step 2, and step 4: its last) and of block 1's last one."""
    points, inside = [], False
    for i, label in enumerate(labels, start=1):
        if label.startswith("weights"):
            inside = label in ("weights block 0 step 2", "weights block 0 step 4", "weights block 1 step 4")
        if label.startswith("rename config") or label.startswith("renamed config"):
            inside = False
        if inside:
            points.append(i)
    return points


def test_a_run_killed_at_any_step_of_its_checkpoints_resumes_bit_identical(reference, tmp_path, capsys, caplog):
    expected, labels = reference
    points = kill_points(labels)
    assert len(points) >= 18, labels  # 3 checkpoints x (write weights, write state, 2 renames)
    runs = {n: tmp_path / f"k{n}" for n in points}
    # Two killed runs at a time (each on one thread), then each resumed here.
    for i in range(0, len(points), 2):
        procs = {n: faulty(n, "kill", "train", "--out", str(runs[n]), "--no-progress", *SMALL) for n in points[i:i + 2]}
        for n, proc in procs.items():
            proc.communicate(timeout=300)
            assert proc.returncode == -signal.SIGKILL, (n, labels[n - 1], proc.returncode)
    for n in points:
        resume_and_check(capsys, caplog, runs[n], expected)


@pytest.mark.parametrize("where", [r"weights block 0 step 4", r"state \.block_00\.state\.pt\..* step 4",
                                   r"weights block 1 step 2"])
def test_a_full_disk_stops_with_one_line_and_the_resume_is_exact(reference, tmp_path, capsys, caplog, where):
    expected, labels = reference
    n = next(i for i, label in enumerate(labels, start=1) if re.fullmatch(where, label))
    run = tmp_path / "full"
    proc = faulty(n, "full", "train", "--out", str(run), "--no-progress", *SMALL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    message = err.strip().splitlines()[-1]
    assert "No space left on device" in message and "could not write" in message and f"--resume {run}" in message
    assert len(err.strip().splitlines()) == 1 or "Traceback" not in err
    assert not list(run.glob(".*.tmp"))
    resume_and_check(capsys, caplog, run, expected)


def test_weights_older_than_their_state_are_rewritten_by_resume(reference, tmp_path, capsys, caplog):
    """A weights file restored from a backup (or deleted): --resume rewrites it from the training state."""
    expected, _ = reference
    run = tmp_path / "r"
    assert main(["train", "--out", str(run), "--no-progress", *SMALL]) == 0
    checkpoint.block_weights_path(run, 1).unlink()
    status = status_steps(capsys, run)
    assert status[1] == ("trained", 4)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert_same(final_tensors(run, 2), expected)


def test_two_jobs_never_train_one_block(tmp_path, capsys, one_thread):
    run = tmp_path / "shared"
    args = ["train", "--out", str(run), "--blocks", "0", "--no-progress", *SMALL, "train.steps_per_block=300",
            "train.log_every=10"]
    # Started at the same instant: one trains, the other refuses (while the first holds the block, or after).
    a, b = faulty(-1, "kill", *args), faulty(-1, "kill", *args)
    results = [(p.wait(timeout=300), p.stderr.read()) for p in (a, b)]
    assert sorted(code for code, _ in results) == [0, 2], results
    refusal = next(err for code, err in results if code == 2).strip().splitlines()  # (after the log's lines)
    assert [line for line in refusal if "error" in line.lower()] == refusal[-1:], refusal
    assert re.search(r"block 0 of .* is being trained by another job \(pid \d+ on .*, since", refusal[-1]) or \
        "already have checkpoints" in refusal[-1], refusal
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted((r["block"], r["step"]) for r in rows) == [(0, s) for s in range(10, 301, 10)]


def test_a_second_job_is_refused_naming_the_holder_and_sigterm_stops_the_first(tmp_path, capsys, one_thread):
    run = tmp_path / "shared"
    args = ["train", "--out", str(run), "--blocks", "0", "--no-progress", *SMALL, "train.steps_per_block=100000",
            "train.checkpoint_every=50"]
    long = faulty(-1, "kill", *args)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and rundir.lock_holder(run, 0) is None:
            time.sleep(0.05)
        refused(capsys, args, f"is being trained by another job (pid {long.pid} on ")
        refused(capsys, ["train", "--resume", str(run), "--blocks", "0"], f"(pid {long.pid} on ")
        assert main(["status", str(run)]) == 0
        assert "a job holds its lock" in capsys.readouterr().out
        while time.time() < deadline and (checkpoint.block_step(run, 0) or 0) < 50:
            time.sleep(0.05)
        long.send_signal(signal.SIGTERM)
        _, err = long.communicate(timeout=120)
    finally:
        long.kill()
    assert long.returncode == 143
    assert err.strip().splitlines()[-1] == f"terminated; continue with `diffusionblocks train --resume {run}`"
    assert rundir.lock_holder(run, 0) is None
    # The corrected command: finish the block with fewer steps than it was started with, from its checkpoint.
    step = checkpoint.state_step(run, 0)
    code, err, _ = run_cli(capsys, "train", "--resume", str(run), "--no-progress", f"train.steps_per_block={step + 3}")
    assert code == 0, err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["block"] == 0]
    assert steps == list(range(1, step + 4))  # each row once: the killed job's rows after its checkpoint are gone


# ---- every input a user can get wrong: one line, exit code 2, nothing left behind, and the fix then works


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, one_thread):
    run = tmp_path_factory.mktemp("small") / "run"
    assert main(["train", "--out", str(run), "--no-progress", *SMALL]) == 0
    return run


def refused(capsys, args, message) -> None:
    code, err, _ = run_cli(capsys, *args)
    assert code == 2, err
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("bad,message,fix", [
    (["sample.samples_per_class=0"], "sample.samples_per_class must be at least 1, got 0", ["sample.samples_per_class=1"]),
    (["train.lr=NaN"], "train.lr must be a finite number, got nan", ["train.lr=1e-3"]),
    (["train.betas=[1.5,2]"], "train.betas must both be in [0, 1), got [1.5, 2.0]", ["train.betas=[0.9,0.99]"]),
    (["train.grad_clip=-1"], "train.grad_clip must be >= 0, got -1.0", ["train.grad_clip=0"]),
    (["noise.sigma_max=Infinity"], "noise.sigma_max must be a finite number", ["noise.sigma_max=80"]),
])
def test_a_bad_config_is_refused_before_anything_is_written(tmp_path, capsys, one_thread, bad, message, fix):
    run = tmp_path / "r"
    refused(capsys, ["train", "--out", str(run), *SMALL, *bad], message)
    assert not run.exists()
    code, err, _ = run_cli(capsys, "train", "--out", str(run), "--no-progress", *SMALL, *fix)
    assert code == 0, err


def test_a_batch_that_does_not_split_over_torchrun_ranks_leaves_nothing(tmp_path, capsys, monkeypatch, one_thread):
    run = tmp_path / "r"
    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun sets it: 2 ranks per block for B=2
    refused(capsys, ["train", "--out", str(run), "--schedule", "parallel", *SMALL, "train.batch_size=7"],
            "train.batch_size=7 does not split evenly over the 2 data-parallel ranks of a block")
    assert not run.exists()
    monkeypatch.setenv("WORLD_SIZE", "1")  # (the corrected batch, here in one process)
    code, err, _ = run_cli(capsys, "train", "--out", str(run), "--schedule", "parallel", "--no-progress", *SMALL)
    assert code == 0, err


def test_output_paths_are_checked_before_any_work(tmp_path, capsys, monkeypatch, small_run, one_thread):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    refused(capsys, ["train", "--out", str(a_file), *SMALL], f"--out {str(a_file)!r} is a file, not a directory")
    refused(capsys, ["train", "--out", str(a_file / "run"), *SMALL], f"{str(a_file)!r} is a file")
    refused(capsys, ["sample", str(small_run), "--num", "2", "--out", str(a_file / "x.png")], f"{str(a_file)!r} is a file")
    (tmp_path / "x.png").mkdir()
    refused(capsys, ["sample", str(small_run), "--num", "2", "--out", str(tmp_path / "x.png")], "is a directory")
    refused(capsys, ["evaluate", str(small_run), "--num", "4", "--out", str(a_file)], "is a file, not a directory")
    assert a_file.read_text() == "mine"
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: make the check see what a user would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    else:
        locked.chmod(0o555)
    refused(capsys, ["train", "--out", str(locked / "run"), *SMALL], f"{str(locked)!r} is not writable")
    refused(capsys, ["sample", str(small_run), "--num", "2", "--out", str(locked / "x.png")], "is not writable")
    monkeypatch.undo()
    locked.chmod(0o755)
    assert not (locked / "run").exists()
    code, err, _ = run_cli(capsys, "sample", str(small_run), "--num", "2", "--steps", "2", "--out", str(locked / "x.png"))
    assert code == 0 and (locked / "x.png").is_file(), err


def test_a_binary_config_file_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("bin.json").write_bytes(b"\x00\xff\xfe")
    refused(capsys, ["train", "--config", "bin.json"], "config file 'bin.json' is not valid JSON")
    assert not Path("runs").exists()


@pytest.mark.parametrize("args,message", [
    (["--steps", "-3"], "--steps must be at least 1, got -3"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--guidance", "nan"], "--guidance must be a finite number >= 0, got nan"),
    (["--num", "0"], "--num must be at least 1, got 0"),
])
def test_evaluate_arguments_are_checked_before_sampling(small_run, tmp_path, capsys, args, message):
    refused(capsys, ["evaluate", str(small_run), "--out", str(tmp_path / "ev"), *args], message)
    assert not (tmp_path / "ev").exists()


def test_a_block_file_of_another_block_or_run_is_refused(small_run, tmp_path, capsys, one_thread):
    import shutil

    run = tmp_path / "mixed"
    shutil.copytree(small_run, run)
    shutil.copy(checkpoint.block_weights_path(run, 0), checkpoint.block_weights_path(run, 1))
    refused(capsys, ["sample", str(run), "--num", "2", "--out", str(tmp_path / "a.png")],
            "holds block 0's weights, not block 1's")
    refused(capsys, ["train", "--resume", str(run)], "holds block 0's weights, not block 1's")
    other = tmp_path / "other"
    assert main(["train", "--out", str(other), "--no-progress", *SMALL, "model.hidden_size=32"]) == 0
    shutil.copy(checkpoint.block_weights_path(other, 1), checkpoint.block_weights_path(run, 1))
    refused(capsys, ["sample", str(run), "--num", "2", "--out", str(tmp_path / "a.png")],
            "was trained with another model.hidden_size (32, not 16)")
    shutil.copy(checkpoint.block_weights_path(small_run, 1), checkpoint.block_weights_path(run, 1))
    code, err, _ = run_cli(capsys, "sample", str(run), "--num", "2", "--steps", "2", "--out", str(tmp_path / "a.png"))
    assert code == 0, err


def test_resume_refuses_to_untrain_a_block(small_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(small_run, run)
    refused(capsys, ["train", "--resume", str(run), "train.steps_per_block=2"],
            "train.steps_per_block=2 is below the 4 steps block 0 has trained")
    code, err, _ = run_cli(capsys, "train", "--resume", str(run), "--no-progress", "train.steps_per_block=5")
    assert code == 0, err
    assert checkpoint.state_step(run, 0) == 5


def test_a_block_whose_state_was_deleted_is_done_or_trained_again(small_run, tmp_path, capsys, caplog):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(small_run, run)
    checkpoint.block_state_path(run, 1).unlink()  # states are large: a user may delete finished ones
    weights = checkpoint.block_weights_path(run, 1).read_bytes()
    code, err, _ = run_cli(capsys, "train", "--resume", str(run), "--no-progress")
    assert code == 0, err  # nothing to do: block 1's weights are final
    assert checkpoint.block_weights_path(run, 1).read_bytes() == weights
    assert main(["status", str(run)]) == 0
    assert "2/2 trained" in capsys.readouterr().out
    # More steps cannot continue from weights alone: status says so, and --resume trains the block again.
    with caplog.at_level("INFO", logger="diffusionblocks"):
        code, err, _ = run_cli(capsys, "train", "--resume", str(run), "--no-progress", "train.steps_per_block=6")
    assert code == 0, err
    assert checkpoint.state_step(run, 0) == 6 and checkpoint.state_step(run, 1) == 6
    assert "block 1: its weights (step 4) have no training state to continue from" in caplog.text


def test_the_documented_resume_of_a_parallel_run(tmp_path, capsys, one_thread):
    run = tmp_path / "par"
    assert main(["train", "--out", str(run), "--schedule", "parallel", "--no-progress", *SMALL,
                 "train.steps_per_block=2"]) == 0
    code, err, _ = run_cli(capsys, "train", "--resume", str(run), "--schedule", "parallel", "--no-progress",
                           "train.steps_per_block=4")
    assert code == 0, err


def test_ctrl_c_names_the_run_and_the_same_command_starts_a_run_that_never_checkpointed(tmp_path, capsys,
                                                                                      monkeypatch, one_thread):
    from diffusionblocks import train as train_module

    run = tmp_path / "r"
    real, calls = train_module.train_step, []

    def interrupted(task, state, *args, **kwargs):
        calls.append(state.step)
        if len(calls) == 1:  # before the first checkpoint
            raise KeyboardInterrupt
        return real(task, state, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", interrupted)
    code, err, _ = run_cli(capsys, "train", "--out", str(run), "--no-progress", *SMALL)
    assert code == 130 and err == f"interrupted; continue with `diffusionblocks train --resume {run}`\n"
    assert not list(run.glob("*.lock"))
    code, err, _ = run_cli(capsys, "train", "--out", str(run), "--no-progress", *SMALL)  # the same command again
    assert code == 0, err


def test_overrides_may_stand_anywhere_among_the_options(tmp_path, capsys, one_thread):
    run = tmp_path / "r"
    code, err, _ = run_cli(capsys, "train", *SMALL[:4], "--out", str(run), *SMALL[4:], "--no-progress",
                           "train.seed=3")
    assert code == 0, err
    assert read_config(run).train.seed == 3
    with pytest.raises(SystemExit) as e:  # argparse's usage line and its message
        main(["train", "--out", str(tmp_path / "x"), "--bogus", *SMALL])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_a_relative_data_path_says_where_it_was_looked_for(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(capsys, ["train", "data.dataset=mnist", "data.root=data/mnist"],
            f"data.root 'data/mnist' (relative to the working directory {str(tmp_path)!r}) does not exist")
