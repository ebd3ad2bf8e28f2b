"""The user's data (issue 30): image folders and Hugging Face datasets fitted to the model, text from several files,
globs, JSON lines or a Hugging Face text column; each bad input stops with one ConfigError naming what to fix."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image

from diffusionblocks import checkpoint, rundir
from diffusionblocks.cli import main
from diffusionblocks.config import ConfigError
from diffusionblocks.data import BatchSampler, DataConfig, load_image_data
from diffusionblocks.image_folder import fit_image
from diffusionblocks.tasks import apply_overrides, default_config, get_task
from diffusionblocks.text import TextConfig, load_text
from diffusionblocks.train import train

CLASSES = ("zebra", "ant", "mole")  # sorted: ant 0, mole 1, zebra 2
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def pixels(seed: int, h: int = 8, w: int = 8, mode: str = "L") -> Image.Image:
    """A random image of the given size and mode."""
    shape = (h, w) if mode == "L" else (h, w, 3)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode)


def write_folder(root: Path, per_class: int = 8, classes=CLASSES) -> list[tuple[str, Image.Image]]:
    """Class subfolders of lossless PNGs (the last of each class a nested one); returns (class, image) in the
    order the loader reads them: classes sorted, then paths sorted."""
    written = []
    for c in classes:
        for i in range(per_class):
            img = pixels(100 * CLASSES.index(c) + i)
            path = root / c / ("deep" if i == per_class - 1 else "") / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path)
            written.append((c, img))
    return sorted(written, key=lambda ci: ci[0])  # stable: path order within a class


def folder_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(dataset="folder", root=str(root), **kw)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    write_folder(root)
    (root / "README.txt").write_text("not an image: skipped")
    return root


@pytest.fixture(scope="module")
def hf_disk(tmp_path_factory) -> Path:
    """The folder's images as a Hugging Face dataset (Image and ClassLabel features), saved with save_to_disk, in
    the order the folder loader reads them."""
    src = tmp_path_factory.mktemp("src")
    written = write_folder(src)
    names = sorted(CLASSES)
    features = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict({"img": [img for _, img in written], "y": [names.index(c) for c, _ in written]},
                                    features=features)
    out = tmp_path_factory.mktemp("hf") / "digits"
    datasets.DatasetDict({"train": ds, "test": ds.select(range(0, len(ds), 4))}).save_to_disk(str(out))
    return out


# ---- image folders


def test_folder_labels_come_from_sorted_subfolders_in_path_order(folder, tmp_path):
    written = write_folder(tmp_path)
    data = load_image_data(folder_cfg(folder, holdout=4), 8, 1)
    both = torch.cat([data.train.images, data.test.images])
    assert data.train.classes == ("ant", "mole", "zebra") and data.train.num_classes == 3
    assert len(data.train) == 20 and len(data.test) == 4
    expected = torch.stack([torch.from_numpy(np.array(img)).float()[None] / 127.5 - 1 for _, img in written])
    labels = torch.tensor([sorted(CLASSES).index(c) for c, _ in written])
    # The split is the fixed permutation of the built-in sets: the union is the folder, in its order.
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    train_idx, test_idx = perm[:20].sort()[0], perm[20:].sort()[0]
    assert torch.equal(data.train.images, expected[train_idx]) and torch.equal(data.test.images, expected[test_idx])
    assert torch.equal(data.train.labels, labels[train_idx]) and torch.equal(data.test.labels, labels[test_idx])
    assert both.min() >= -1 and both.max() <= 1


def test_fit_image_resizes_the_shorter_side_and_crops_the_centre():
    tall = np.zeros((16, 8), dtype=np.uint8)
    tall[4:12] = 200  # the centre 8x8 square is bright, the margins dark
    assert (fit_image(Image.fromarray(tall), 8, 1) == 200).all()
    wide = pixels(5, 10, 31)
    out = fit_image(wide, 5, 1)  # 31x10 -> 16x5 (shorter side 5, bicubic), then the centre 5x5: columns 5..9
    assert np.array_equal(out[0], np.asarray(wide.resize((16, 5), Image.Resampling.BICUBIC))[:, 5:10])
    assert (fit_image(Image.new("L", (30, 10), 90), 5, 1) == 90).all()  # no shift, no ringing on a flat image
    assert fit_image(pixels(0, 3, 7, "RGB"), 12, 3).shape == (3, 12, 12)  # smaller images are enlarged


def test_grey_and_rgb_convert_to_the_models_channels():
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    assert (fit_image(red, 4, 1) == 76).all()  # ITU-R 601-2 luma: 299/1000 * 255
    grey = Image.new("L", (4, 4), 33)
    assert fit_image(grey, 4, 3).shape == (3, 4, 4) and (fit_image(grey, 4, 3) == 33).all()
    rgba = Image.new("RGBA", (4, 4), (1, 2, 3, 0))
    assert (fit_image(rgba, 4, 3)[:, 0, 0] == [1, 2, 3]).all()  # alpha dropped


def test_folder_reads_jpeg_and_mixed_sizes_fitted_to_the_model(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pixels(1, 20, 30, "RGB").save(tmp_path / "a" / "x.jpg", quality=90)
    pixels(2, 9, 9, "L").save(tmp_path / "a" / "y.JPEG")
    pixels(3, 64, 16, "RGB").save(tmp_path / "b" / "z.png")
    pixels(4, 5, 6, "L").save(tmp_path / "b" / "w.bmp")
    data = load_image_data(folder_cfg(tmp_path, holdout=1), 16, 3)
    assert data.train.images.shape[1:] == (3, 16, 16) and sorted(data.train.labels.tolist() + data.test.labels.tolist()) == [0, 0, 1, 1]


def test_images_directly_in_the_folder_are_unconditional(tmp_path):
    for i in range(5):
        pixels(i).save(tmp_path / f"{i}.png")
    data = load_image_data(folder_cfg(tmp_path), 8, 1)
    assert data.train.num_classes == 0 and data.train.classes == () and len(data.test) == 1  # a tenth, at least 1
    assert (data.train.labels == 0).all()
    cfg = apply_overrides(default_config(), [*TINY, "data.dataset=folder", f"data.root={tmp_path}",
                                             "model.num_classes=0"])
    assert len(get_task("generate").load_data(cfg).train) == 4
    with pytest.raises(ConfigError, match="has 0 classes but model.num_classes=10"):
        get_task("generate").load_data(apply_overrides(cfg, ["model.num_classes=10"]))


def test_folder_batches_are_a_function_of_seed_block_step(folder):
    a, b = (load_image_data(folder_cfg(folder, hflip=True, crop_padding=1), 8, 1).train for _ in range(2))
    assert torch.equal(a.images, b.images)
    sa, sb = (BatchSampler(d, 5, seed=3, stream=1, hflip=True, crop_padding=1) for d in (a, b))
    for step in (7, 0, 7, 2):
        assert all(torch.equal(x, y) for x, y in zip(sa.batch(step), sb.batch(step)))


def test_resume_on_a_folder_equals_the_uninterrupted_run(folder, tmp_path, one_thread):
    cfg = apply_overrides(default_config(), [*TINY, "data.dataset=folder", f"data.root={folder}", "model.num_classes=3",
                                             "data.holdout=4", "train.batch_size=4"])
    task = get_task(cfg.task)
    data = task.load_data(cfg)
    full = train(task, cfg, data.train, None, progress=False)
    rundir.save_config(tmp_path, cfg)
    train(task, apply_overrides(cfg, ["train.steps_per_block=3"]), data.train, tmp_path, progress=False)
    train(task, cfg, task.load_data(cfg).train, tmp_path, progress=False)
    for b in range(3):
        on_disk = checkpoint.load_train_state(tmp_path, b)["model"]
        assert all(torch.equal(full[b].denoiser.state_dict()[k].cpu(), on_disk[k]) for k in on_disk), b


def test_train_on_a_folder_end_to_end_writes_the_class_names(folder, tmp_path, one_thread, caplog):
    run = tmp_path / "run"
    with caplog.at_level("INFO"):
        assert main(["train", "--out", str(run), "--no-progress", *TINY, "data.dataset=folder",
                     f"data.root={folder}", "model.num_classes=3", "data.hflip=true", "data.crop_padding=1"]) == 0
    assert json.loads((run / "classes.json").read_text()) == ["ant", "mole", "zebra"]
    assert "3 classes (0..2): ant, mole, zebra" in caplog.text
    assert (run / "samples.png").is_file() and checkpoint.block_step(run, 2) == 6


def test_classify_on_a_folder(folder, tmp_path, one_thread):
    run = tmp_path / "vit"
    assert main(["train", "--out", str(run), "--no-progress", "task=classify", "model.hidden_size=16",
                 "model.num_heads=2", "model.depth=2", "blocks.num_blocks=2", "train.batch_size=8",
                 "train.steps_per_block=2", "data.dataset=folder", f"data.root={folder}", "model.num_classes=3"]) == 0
    assert json.loads((run / "classes.json").read_text()) == ["ant", "mole", "zebra"]


# ---- Hugging Face image datasets


def test_hf_save_to_disk_equals_the_folder_and_uses_its_test_split(folder, hf_disk):
    fromfolder = load_image_data(folder_cfg(folder, holdout=4), 8, 1)
    held = load_image_data(DataConfig(dataset="hf", root=str(hf_disk), image_column="img", label_column="y",
                                      holdout=4), 8, 1)
    assert held.train.classes == fromfolder.train.classes
    assert torch.equal(held.train.images, fromfolder.train.images)
    assert torch.equal(held.test.labels, fromfolder.test.labels)
    split = load_image_data(DataConfig(dataset="hf", root=str(hf_disk), image_column="img", label_column="y",
                                       hf_test_split="test"), 8, 1)
    assert len(split.train) == 24 and len(split.test) == 6
    assert torch.equal(split.test.images, split.train.images[::4])
    assert torch.equal(split.test.labels, split.train.labels[::4])


def test_hf_local_files_parquet_and_imagefolder(hf_disk, folder, tmp_path):
    ds = datasets.load_from_disk(str(hf_disk))["train"]
    ds.to_parquet(str(tmp_path / "part.parquet"))
    parquet = load_image_data(DataConfig(dataset="hf", root=str(tmp_path / "*.parquet"), hf_format="parquet",
                                         image_column="img", label_column="y", holdout=4), 8, 1)
    disk = load_image_data(DataConfig(dataset="hf", root=str(hf_disk), image_column="img", label_column="y",
                                      holdout=4), 8, 1)
    assert torch.equal(parquet.train.images, disk.train.images) and parquet.train.classes == disk.train.classes
    flat = tmp_path / "flat"  # the imagefolder builder labels by folder only when every file is as deep
    for c in CLASSES:
        for i in range(3):
            (flat / c).mkdir(parents=True, exist_ok=True)
            pixels(i).save(flat / c / f"{i}.png")
    imagefolder = load_image_data(DataConfig(dataset="hf", root=str(flat), hf_format="imagefolder"), 8, 3)
    assert imagefolder.train.classes == ("ant", "mole", "zebra") and imagefolder.train.images.shape[1] == 3
    assert len(imagefolder.train) + len(imagefolder.test) == 9


def test_hf_without_labels_is_unconditional_and_trains_end_to_end(hf_disk, tmp_path, one_thread):
    data = load_image_data(DataConfig(dataset="hf", root=str(hf_disk), image_column="img", label_column=""), 8, 1)
    assert data.train.num_classes == 0
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--no-progress", *TINY, "data.dataset=hf", f"data.root={hf_disk}",
                 "data.image_column=img", "data.label_column=y", "model.num_classes=3"]) == 0
    assert json.loads((run / "classes.json").read_text()) == ["ant", "mole", "zebra"]
    assert checkpoint.block_step(run, 2) == 6


# ---- bad input: one message each


def refused(cfg: DataConfig, *fragments: str, size: int = 8, channels: int = 1) -> None:
    with pytest.raises(ConfigError) as e:
        load_image_data(cfg, size, channels)
    assert all(f in str(e.value) for f in fragments), str(e.value)


def test_bad_folders_are_refused_with_one_message(folder, tmp_path):
    refused(folder_cfg(tmp_path / "nope"), "does not exist", "data.root")
    (tmp_path / "file.png").write_bytes(b"")
    refused(folder_cfg(tmp_path / "file.png"), "is not a folder")
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "notes.txt").write_text("x")
    refused(folder_cfg(empty), "has no images")
    broken = tmp_path / "broken"
    write_folder(broken, per_class=2)
    (broken / "ant" / "bad.png").write_bytes(b"not a png")
    refused(folder_cfg(broken), "cannot read image", "bad.png")
    mixed = tmp_path / "mixed"
    write_folder(mixed, per_class=2)
    pixels(0).save(mixed / "loose.png")
    refused(folder_cfg(mixed), "both directly in it", "loose.png", "class subfolders")
    refused(folder_cfg(folder), "grey (1 channel) or RGB (3)", "model.in_channels=2", channels=2)
    refused(folder_cfg(folder, split="test"), "data.split='test' is not available")
    refused(folder_cfg(folder, memory_limit_gb=1e-9), "data.memory_limit_gb")
    refused(folder_cfg(folder, holdout=24), "data.holdout=24 must be between 1 and 23")
    with pytest.raises(ConfigError, match="data.hf_format='hub' is not one of"):
        apply_overrides(default_config(), ["data.dataset=hf", "data.root=x", "data.hf_format=hub"])


def test_bad_hf_datasets_are_refused_with_one_message(hf_disk, tmp_path):
    def hf(**kw) -> DataConfig:
        return DataConfig(dataset="hf", **{"root": str(hf_disk), "image_column": "img", "label_column": "y", **kw})

    refused(hf(image_column="image"), "data.image_column='image' is not a column", "'img', 'y'")
    refused(hf(label_column="label"), "data.label_column='label' is not a column", "'img', 'y'")
    refused(hf(hf_split="validation"), "data.hf_split='validation' is not a split", "'train', 'test'")
    refused(hf(hf_test_split="dev"), "data.hf_test_split='dev' is not a split")
    refused(hf(root=str(tmp_path)), "is not a dataset written by save_to_disk")
    refused(hf(root=str(tmp_path / "none")), "is not a folder written by save_to_disk")
    refused(hf(root=str(tmp_path / "*.parquet"), hf_format="parquet"), "names no parquet file")
    refused(hf(), "grey (1 channel) or RGB (3)", channels=4)
    numbers = datasets.Dataset.from_dict({"img": [1, 2], "y": [0, 1]})
    numbers.save_to_disk(str(tmp_path / "numbers"))
    refused(hf(root=str(tmp_path / "numbers"), holdout=1), "row 0", "is not an image")
    named = datasets.Dataset.from_dict({"img": [pixels(0), pixels(1)], "y": ["cat", "dog"]})
    datasets.DatasetDict({"train": named, "test": named.select([0]).map(lambda r: {"y": "owl"})}).save_to_disk(
        str(tmp_path / "named"))
    assert load_image_data(hf(root=str(tmp_path / "named"), holdout=1), 8, 1).train.classes == ("cat", "dog")
    refused(hf(root=str(tmp_path / "named"), hf_test_split="test"), "label 'owl' is not among the classes")


# ---- text


def write_lines(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def passages() -> list[str]:
    """Tiny Shakespeare's first 12,000 characters as 40 passages."""
    text = SHAKESPEARE.read_text(encoding="utf-8")[:12_000]
    return [text[i:i + 300] for i in range(0, 12_000, 300)]


def test_several_files_a_glob_and_json_lines_are_one_corpus(passages, tmp_path):
    joined = "\n".join(passages)
    for i in range(4):  # names sort as 0..3; the list is read in its own order
        (tmp_path / f"part{i}.txt").write_text("\n".join(passages[i * 10:(i + 1) * 10]), encoding="utf-8")
    one = tmp_path / "all.txt"
    one.write_text(joined, encoding="utf-8")
    reference = load_text(TextConfig(path=str(one)), 16)
    globbed = load_text(TextConfig(path=str(tmp_path / "part*.txt")), 16)
    listed = load_text(TextConfig(paths=tuple(str(tmp_path / f"part{i}.txt") for i in range(4))), 16)
    write_lines(tmp_path / "a.jsonl", passages[:25])
    write_lines(tmp_path / "b.jsonl", passages[25:])
    jsonl = load_text(TextConfig(path=str(tmp_path / "*.jsonl"), format="jsonl"), 16)
    for other in (globbed, listed, jsonl):
        assert torch.equal(other.train.tokens, reference.train.tokens)
        assert torch.equal(other.test.tokens, reference.test.tokens) and other.vocab == reference.vocab
    backwards = load_text(TextConfig(paths=tuple(str(tmp_path / f"part{i}.txt") for i in (3, 2, 1, 0))), 16)
    assert backwards.vocab.decode(backwards.train.tokens).startswith(passages[30])
    sep = load_text(TextConfig(path=str(tmp_path / "*.jsonl"), format="jsonl", separator="\n\n"), 16)
    assert sep.vocab.decode(sep.train.tokens).startswith(passages[0] + "\n\n" + passages[1])


def test_hf_text_from_save_to_disk_parquet_and_a_test_split(passages, tmp_path):
    ds = datasets.Dataset.from_dict({"body": passages, "n": list(range(len(passages)))})
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds.select(range(36)), "validation": ds.select(range(36, 40))}).save_to_disk(
        str(tmp_path / "dict"))
    ds.to_parquet(str(tmp_path / "p.parquet"))
    one = tmp_path / "all.txt"
    one.write_text("\n".join(passages), encoding="utf-8")
    reference = load_text(TextConfig(path=str(one)), 16)
    for path, fmt in ((tmp_path / "single", "disk"), (tmp_path / "p.parquet", "parquet")):
        got = load_text(TextConfig(path=str(path), format="hf", hf_format=fmt, text_column="body"), 16)
        assert torch.equal(got.train.tokens, reference.train.tokens) and torch.equal(got.test.tokens,
                                                                                     reference.test.tokens)
    split = load_text(TextConfig(path=str(tmp_path / "dict"), format="hf", text_column="body",
                                 hf_test_split="validation"), 16)
    assert split.vocab.decode(split.test.tokens) == "\n".join(passages[36:])
    assert split.vocab.decode(split.train.tokens) == "\n".join(passages[:36])


def test_text_runs_from_json_lines_and_hf_train_resume_and_keep_their_vocabulary(passages, tmp_path, capsys,
                                                                                  one_thread):
    common = ["task=arlm", "model.seq_len=16", "model.hidden_size=16", "model.num_heads=2", "model.depth=2",
              "blocks.num_blocks=2", "train.batch_size=4", "train.steps_per_block=2", "train.log_every=1",
              "train.checkpoint_every=2", "train.lr_warmup_steps=1", "sample.num=0"]
    lines = write_lines(tmp_path / "data.jsonl", passages, field="body")
    datasets.Dataset.from_dict({"body": passages}).save_to_disk(str(tmp_path / "hf"))
    for name, data in (("jsonl", [f"data.path={lines}", "data.format=jsonl", "data.text_column=body"]),
                       ("hf", [f"data.path={tmp_path / 'hf'}", "data.format=hf", "data.text_column=body"])):
        run = tmp_path / f"run-{name}"
        assert main(["train", "--out", str(run), "--no-progress", *common, *data]) == 0
        vocab = (run / "vocab.json").read_bytes()
        assert main(["train", "--resume", str(run), "--no-progress", "train.steps_per_block=4"]) == 0
        assert (run / "vocab.json").read_bytes() == vocab
        assert [checkpoint.block_step(run, b) for b in range(2)] == [4, 4]
    both = [json.loads((tmp_path / f"run-{n}" / "vocab.json").read_text()) for n in ("jsonl", "hf")]
    assert both[0] == both[1]
    # A character the run's vocabulary lacks, added to the lines, is refused on resume, naming it.
    write_lines(lines, [p.replace("e", "~") for p in passages], field="body")
    assert main(["train", "--resume", str(tmp_path / "run-jsonl"), "--no-progress", "train.steps_per_block=6"]) == 2
    assert "'~'" in capsys.readouterr().err


def test_bad_text_input_is_refused_with_one_message(passages, tmp_path):
    def refused_text(cfg: TextConfig, *fragments: str) -> None:
        with pytest.raises(ConfigError) as e:
            load_text(cfg, 16)
        assert all(f in str(e.value) for f in fragments), str(e.value)

    refused_text(TextConfig(path=str(tmp_path / "*.txt")), "data.path", "matches no file")
    refused_text(TextConfig(paths=(str(tmp_path / "missing.txt"),)), "data.paths", "is not a file")
    lines = write_lines(tmp_path / "d.jsonl", passages)
    refused_text(TextConfig(path=str(lines), format="jsonl", text_column="body"), "line 1",
                 "no field data.text_column='body'", "'text', 'id'")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    refused_text(TextConfig(path=str(tmp_path / "bad.jsonl"), format="jsonl"), "line 2 is not JSON")
    (tmp_path / "num.jsonl").write_text('{"text": 3}\n')
    refused_text(TextConfig(path=str(tmp_path / "num.jsonl"), format="jsonl"), "line 1", "not text")
    datasets.Dataset.from_dict({"body": passages}).save_to_disk(str(tmp_path / "hf"))
    refused_text(TextConfig(path=str(tmp_path / "hf"), format="hf"), "data.text_column='text' is not a column",
                 "'body'")
    refused_text(TextConfig(path=str(tmp_path / "hf"), format="hf", text_column="body", hf_test_split="test"),
                 "data.hf_test_split='test'", "single Dataset")
    with pytest.raises(ConfigError, match="data.paths lists files"):
        apply_overrides(default_config("arlm"), ['data.paths=["a.txt"]', "data.format=hf"])
