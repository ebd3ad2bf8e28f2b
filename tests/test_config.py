import json
from pathlib import Path

import pytest

from diffusionblocks.config import ConfigError, RunConfig
from diffusionblocks.tasks import apply_overrides, config_from_dict, default_config, load_config


def test_json_round_trip(tmp_path):
    cfg = apply_overrides(default_config(), ["blocks.layers_per_block=[3,2,1]", "train.betas=[0.9,0.95]"])
    path = tmp_path / "c.json"
    path.write_text(cfg.to_json())
    assert load_config(path) == cfg


def test_overrides_are_typed():
    cfg = apply_overrides(default_config(), ["train.lr=3e-4", "blocks.num_blocks=2", "sample.sampler=heun",
                                        "data.root=/some/dir", "train.ema_halflife_steps=10"])
    assert cfg.train.lr == 3e-4 and cfg.blocks.num_blocks == 2 and cfg.sample.sampler == "heun"
    assert cfg.data.root == "/some/dir" and isinstance(cfg.train.ema_halflife_steps, float)


@pytest.mark.parametrize("overrides,message", [
    (["train.lrr=1"], "unknown field 'train.lrr'"),
    (["trian.lr=1"], "unknown section 'trian'"),
    (["train.lr"], "not of the form"),
    (["blocks.num_blocks=two"], "blocks.num_blocks must be an integer"),
    (["blocks.num_blocks=7"], "blocks.num_blocks=7 is larger than the number of layers model.depth=6"),
    (["blocks.num_blocks=4"], "do not split evenly"),
    (["blocks.layers_per_block=[2,2,1]"], "adds up to 5 layers but model.depth=6"),
    (["blocks.layers_per_block=[3,3]"], "has 2 entries but blocks.num_blocks=3"),
    (["blocks.partition=log"], "blocks.partition='log' is not one of"),
    (["data.dataset=mnist"], "data.root is required"),
    (["model.image_size=9"], "not a multiple of model.patch_size"),
])
def test_bad_config_names_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=None) as e:
        apply_overrides(default_config(), overrides)
    assert message in str(e.value)


def test_unknown_field_in_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": {"depht": 4}}))
    with pytest.raises(ConfigError, match="unknown field 'model.depht'"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.json")
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(path)


def test_presets_load():
    presets = sorted((Path(__file__).resolve().parents[1] / "presets").glob("*.json"))
    assert presets
    for p in presets:
        cfg = load_config(p)
        assert cfg.blocks.num_blocks >= 1
    cifar = load_config(Path(__file__).resolve().parents[1] / "presets" / "cifar10-dit-s2.json")
    assert (cifar.model.depth, cifar.model.hidden_size, cifar.blocks.num_blocks) == (12, 384, 3)
    assert (cifar.blocks.gamma, cifar.train.batch_size, cifar.train.lr) == (0.05, 512, 1e-4)
    assert (cifar.sample.sampler, cifar.sample.steps, cifar.sample.guidance) == ("euler", 50, 2.0)


def test_switching_task_keeps_the_fields_the_config_changed():
    from diffusionblocks.tasks import default_config

    mnist = apply_overrides(default_config(), ["data.dataset=mnist", "data.root=/x", "train.seed=3", "name=m"])
    cfg = apply_overrides(mnist, ["task=classify"])
    assert (cfg.task, cfg.model.arch, cfg.data.dataset, cfg.data.root, cfg.train.seed, cfg.name) == \
        ("classify", "vit", "mnist", "/x", 3, "m")
    assert cfg.classify == default_config("classify").classify
    text = apply_overrides(default_config(), ["task=mdlm", "model.seq_len=64"])
    assert text.model.seq_len == 64 and text.noise.schedule == "linear" and text.model.depth == 6
    with pytest.raises(ConfigError, match="its task's RunConfig subclass"):
        RunConfig().validate()


def _configs_in(node, where: str):
    """(where, config dict) of every run config inside a parsed JSON file (a config.json, a report's runs)."""
    if isinstance(node, dict):
        if isinstance(node.get("task"), str) and isinstance(node.get("model"), dict):
            yield where, node
            return
        for k, v in node.items():
            yield from _configs_in(v, f"{where}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _configs_in(v, f"{where}[{i}]")


def test_presets_and_the_configs_of_committed_results_load_in_todays_form():
    """Each through its task's config class and upgrade_config: older forms (the classifier's switch and inference
    settings in "classify") read as today's (model.mode, sample.steps, sample.sampler)."""
    root = Path(__file__).resolve().parents[1]
    files = sorted(root.glob("presets/*.json")) + sorted((root / "benchmarks" / "results").rglob("*.json"))
    found = [(f"{f.relative_to(root)}{w}", d) for f in files for w, d in _configs_in(json.loads(f.read_text()), "")]
    assert len(found) >= 20
    for where, d in found:
        cfg = config_from_dict(d)
        assert config_from_dict(cfg.to_dict()) == cfg, where


def test_an_older_classifier_config_reads_in_todays_form():
    old = {"task": "classify", "model": {"arch": "vit", "class_dropout": 0.1},
           "classify": {"mode": "plain", "inference_steps": 3, "sampler": "heun", "label_embedding": "fixed"},
           "blocks": {"num_blocks": 1}, "sample": {"guidance": 2.0, "grid": "karras"}}
    cfg = config_from_dict(old)
    assert (cfg.model.mode, cfg.sample.steps, cfg.sample.sampler) == ("plain", 3, "heun")
    assert cfg.classify.label_embedding == "fixed" and "mode" not in cfg.to_dict()["classify"]
    assert config_from_dict({"task": "classify", "classify": {"mode": "diffusion"}}) == default_config("classify")
