import json

import torch

from diffusionblocks import precision
from diffusionblocks.cli import main
from diffusionblocks.membench import MemCase, case_config, memory_cases, model_config, saved_activation_bytes
from diffusionblocks.memory import PeakMemory, peak_of_allocations
from diffusionblocks.tasks import get_task
from diffusionblocks.train import init_block_state


def test_cases_cover_every_configuration():
    names = [c.name for c in memory_cases([2, 3])]
    assert names == ["end-to-end", "end-to-end + ckpt", "B=2 interleaved", "B=2 sequential offloaded",
                     "B=2 sequential offloaded + ckpt", "B=3 interleaved", "B=3 sequential offloaded",
                     "B=3 sequential offloaded + ckpt"]
    assert case_config(model_config("dit-s2", 32, 3, 8), MemCase("sequential", 6)).layer_split() == (2,) * 6
    assert case_config(model_config("dit-s2", 32, 3, 8), MemCase("sequential", 5)).layer_split() == (3, 3, 2, 2, 2)


def test_saved_activations_shrink_with_blocks_and_checkpointing():
    def act(case):
        cfg = case_config(model_config("tiny", 8, 1, 16), case)
        s = init_block_state(get_task(cfg.task), cfg, 0, torch.device("cpu"))
        return saved_activation_bytes(s, cfg, (torch.randn(16, 1, 8, 8), torch.randint(10, (16,))))

    e2e, b3, b3_ckpt = act(MemCase("e2e", 1)), act(MemCase("sequential", 3)), act(MemCase("sequential", 3, True))
    assert b3 < 0.45 * e2e  # 4 of 12 layers, plus the block's own embedders and head
    assert b3_ckpt < 0.5 * b3


def test_the_peak_of_allocations_replays_them_in_time_order():
    assert peak_of_allocations([]) == 0
    assert peak_of_allocations([(3, -5), (1, 10), (2, 4), (4, 7)]) == 16  # 10, 14, 9, 16
    assert peak_of_allocations([(1, 8), (1, -8)]) == 8  # a tie counts the allocation first
    assert peak_of_allocations([(1, -3)]) == 0


def test_the_cpu_allocated_measure_counts_the_tensors_alive_at_the_peak():
    mib = 2 ** 20
    before = torch.empty(8 * mib, dtype=torch.uint8)
    with PeakMemory("cpu", "allocated") as mem:
        a = torch.ones(4 * mib, dtype=torch.uint8)
        b = torch.ones(2 * mib, dtype=torch.uint8)
        del a, before  # neither lowers the peak of a and b together
        c = torch.ones(3 * mib, dtype=torch.uint8)
        del b, c
    assert mem.kind == "cpu_peak_allocated_above_start"
    assert 6 * mib <= mem.peak_bytes < 6 * mib + 64 * 1024


def test_bench_memory_writes_its_table(tmp_path, capsys):
    out = tmp_path / "mem"
    code = main(["bench", "memory", "--model", "tiny", "--image-size", "8", "--channels", "1", "--batch", "4",
                 "--steps", "2", "--num-blocks", "2", "--device", "cpu", "--out", str(out)])
    assert code == 0
    assert {"memory.md", "memory.json", "memory.png"} <= {p.name for p in out.iterdir()}
    rows = {r["case"]: r for r in json.loads((out / "memory.json").read_text())}
    assert len(rows) == 5 and all(r["peak_bytes"] > 0 and r["kept_freed_memory"] == 0 for r in rows.values())
    kinds = ["cpu_peak_rss_above_start", "cpu_peak_allocated_above_start"]  # each in its own process
    assert all(list(r["peaks"]) == kinds and r["peaks"][kinds[0]] == r["peak_bytes"] for r in rows.values())
    e2e, seq_alloc = rows["end-to-end"]["peaks"][kinds[1]], rows["B=2 sequential offloaded"]["peaks"][kinds[1]]
    assert seq_alloc < e2e
    inter, seq = rows["B=2 interleaved"], rows["B=2 sequential offloaded"]
    assert inter["analytic"]["params"] == 4 * sum(inter["params_per_block"])  # every block resident
    assert seq["analytic"]["params"] == 4 * max(seq["params_per_block"])  # one block resident
    table = capsys.readouterr().out
    assert "| B=2 sequential offloaded | 6/6 |" in table and "| RSS MiB | / end-to-end | CPU allocated MiB |" in table


def test_bench_memory_measures_any_tasks_config(tmp_path, capsys, monkeypatch):
    """Also: the measuring processes take this one's allocator setting (`--keep-freed-memory`, set here as that flag
    would leave it, without changing this process' allocator), which the tensor-only measure does not see."""
    monkeypatch.setattr(precision, "kept_freed_memory", 256 << 20)
    shakespeare = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt")
    out = tmp_path / "mem"
    preset = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "presets" / "shakespeare-mdlm.json")
    code = main(["bench", "memory", "--config", preset, f"data.path={shakespeare}",
                 "model.hidden_size=32", "model.num_heads=2", "train.batch_size=8", "--steps", "2",
                 "--num-blocks", "3", "--device", "cpu", "--cpu-measure", "allocated", "--out", str(out)])
    assert code == 0
    rows = {r["case"]: r for r in json.loads((out / "memory.json").read_text())}
    seq, e2e = rows["B=3 sequential offloaded"], rows["end-to-end"]
    assert seq["layers_per_block"] == [2, 2, 2] and seq["analytic"]["activations"] < 0.6 * e2e["analytic"]["activations"]
    assert list(e2e["peaks"]) == ["cpu_peak_allocated_above_start"]
    assert seq["peak_bytes"] < 0.6 * e2e["peak_bytes"]  # tensors only: no allocator noise at this tiny size
    assert "shakespeare-mdlm (mdlm)" in capsys.readouterr().out
    assert {r["kept_freed_memory"] for r in rows.values()} == {256 << 20}


def test_bench_memory_refuses_an_unknown_measure(capsys):
    code = main(["bench", "memory", "--model", "tiny", "--cpu-measure", "rss,vms", "--device", "cpu"])
    assert code != 0 and "--cpu-measure" in capsys.readouterr().err
