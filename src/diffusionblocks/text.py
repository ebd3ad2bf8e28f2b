"""Text data for the language tasks: UTF-8 files, JSON lines, a Hugging Face dataset's text column, or text8 from its
standard zip, as characters or BPE tokens.

Text (format "text": one file, a glob, or the list data.paths; "jsonl": the field data.text_column of each line of
such files; "hf": the column data.text_column of a Hugging Face dataset, `hf_datasets.py`) is one corpus: the files
in sorted path order (a list: in its order), the lines or rows in order, joined by data.separator. The corpus is
split by position, the first 90% for training and the rest held out (a Hugging Face dataset may name a held-out
split instead); its vocabulary is the sorted set of characters of the training part. text8 (Mahoney's first 10^8
characters of a cleaned Wikipedia, 27 characters) is read from `text8.zip` as it is distributed and
split as is usual: 90M characters train, 5M validation, 5M test (the held-out split is the test part).
Training batches are windows of the token stream at offsets drawn from (seed, block, step).

Tokens are characters by default. `data.tokenizer="bpe"` trains a byte-level BPE of `data.bpe_vocab_size`
tokens on the training part with Hugging Face `tokenizers` (the optional extra `diffusionblocks[bpe]`),
offline and deterministically.

A run's vocabulary (its characters, or its BPE) is the run's: written into its vocab.json once, when the run
is created, and from then on every reading of data for it (resuming, fine-tuning from it, evaluating,
sampling, composing) encodes the text through that file. A character the vocabulary does not have is
refused, naming it: the model has no id for it, so it can neither train on it nor give it a probability.
A model with more ids than the vocabulary has tokens (`model.vocab_size` above them) never draws the ids
that mean nothing (`usable_logits`); its bits per character still count the probability it gives them.
"""

from __future__ import annotations

import glob
import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

try:
    import tokenizers  # the optional extra diffusionblocks[bpe], for data.tokenizer="bpe"
except ImportError:
    tokenizers = None

from .config import ConfigError, check_choice, shown_path
from .hf_datasets import HF_FORMATS, load_hf_text
from .seeding import make_generator

logger = logging.getLogger(__name__)

VOCAB_FILE = "vocab.json"  # a run's vocabulary, in its directory
TEXT8_SPLIT = (90_000_000, 5_000_000, 5_000_000)  # train, validation, test characters


@dataclass(frozen=True)
class TextConfig:
    """A text corpus and how it is read: as characters (the default) or as the tokens of a BPE trained on it."""

    path: str = "../shared/data/tinyshakespeare.txt"  # UTF-8 text file or a glob of them (formats "text", "jsonl"),
                                  # text8.zip (format "text8"), or the Hugging Face dataset (format "hf").
    format: str = "text"          # "text" (UTF-8 files, split 90/10 by position), "jsonl" (JSON lines, a text field
                                  # each), "hf" (a Hugging Face dataset's text column) or "text8" (the standard zip).
    train_fraction: float = 0.9   # The leading part trained on; the rest is held out (not text8, nor hf_test_split).
    tokenizer: str = "char"       # "char" (a token per character) or "bpe" (byte-level BPE trained on the training part).
    bpe_vocab_size: int = 4096    # Tokens of the BPE, its 256 bytes included.
    paths: tuple[str, ...] = ()   # Formats "text", "jsonl": files (or globs) read in this order instead of data.path.
    separator: str = "\n"         # Joins the files, lines or rows of a corpus.
    text_column: str = "text"     # Formats "jsonl", "hf": the field / column that holds the text.
    hf_format: str = "disk"       # Format "hf": "disk" (a save_to_disk folder) or a builder of local files: "parquet",
                                  # "json", "csv".
    hf_split: str = "train"       # Format "hf": the split trained on.
    hf_test_split: str = ""       # Format "hf": the held-out split; "" = the last 1 - train_fraction of hf_split.

    def validate(self) -> None:
        check_choice("data.format", self.format, ("text", "text8", "jsonl", "hf"))
        check_choice("data.hf_format", self.hf_format, tuple(f for f in HF_FORMATS if f != "imagefolder"))
        if self.paths and self.format not in ("text", "jsonl"):
            raise ConfigError(f"data.paths lists files of format 'text' or 'jsonl', not data.format={self.format!r} "
                              "(which reads data.path)")
        check_choice("data.tokenizer", self.tokenizer, ("char", "bpe"))
        if self.bpe_vocab_size < 257:
            raise ConfigError(f"data.bpe_vocab_size must be above the 256 bytes, got {self.bpe_vocab_size}")
        if not 0 < self.train_fraction < 1:
            raise ConfigError(f"data.train_fraction must be in (0, 1), got {self.train_fraction}")


class Vocabulary:
    """Characters <-> token ids 0..V-1, in sorted character order; `path`: the file it was read from, if any."""

    def __init__(self, chars: str, path: Path | None = None):
        self.chars = "".join(sorted(set(chars)))
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.path = path

    def __len__(self) -> int:
        return len(self.chars)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.chars == other.chars

    def encode(self, text: str, what: str = "text") -> torch.Tensor:
        unknown = sorted(set(text) - set(self.index))
        if unknown:
            where_from = f" of {str(self.path)!r}" if self.path is not None else ""
            raise ConfigError(f"{what} has character(s) {''.join(unknown)!r} outside the vocabulary{where_from} "
                              f"({len(self)} characters)")
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.chars[i] for i in ids.tolist())

    def to_json(self) -> str:
        return json.dumps({"chars": self.chars}, ensure_ascii=False) + "\n"

    def save(self, path: Path) -> None:
        """Writes the vocabulary to `path` (a run's is written atomically by its task: `TextTask.prepare_run`)."""
        Path(path).write_text(self.to_json(), encoding="utf-8")


class BPEVocabulary:
    """A byte-level BPE (Hugging Face `tokenizers`): any text <-> token ids 0..V-1."""

    def __init__(self, tokenizer, path: Path | None = None):
        self.tokenizer, self.path = tokenizer, path

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPEVocabulary:
        tk = _tokenizers()
        tokenizer = tk.Tokenizer(tk.models.BPE())
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                         show_progress=False)
        tokenizer.train_from_iterator([text[i:i + 10_000] for i in range(0, len(text), 10_000)], trainer=trainer)
        return cls(tokenizer)

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size()

    def __eq__(self, other) -> bool:
        return isinstance(other, BPEVocabulary) and self.tokenizer.to_str() == other.tokenizer.to_str()

    def encode(self, text: str, what: str = "text") -> torch.Tensor:
        return torch.tensor(self.tokenizer.encode(text).ids, dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> str:
        return self.tokenizer.decode(ids.tolist())

    def to_json(self) -> str:
        return json.dumps({"bpe": self.tokenizer.to_str()}) + "\n"

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")


def _tokenizers():
    if tokenizers is None:
        raise ConfigError("data.tokenizer='bpe' needs Hugging Face tokenizers: pip install 'diffusionblocks[bpe]'")
    return tokenizers


def _read_vocabulary_file(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{str(path)!r} is missing: the run's vocabulary")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(d.get("chars"), str) or isinstance(d.get("bpe"), str):
            return d
    except (ValueError, UnicodeDecodeError, AttributeError):
        pass
    raise ConfigError(f"{str(path)!r} is not a vocabulary (a JSON object with \"chars\" or \"bpe\")")


def load_vocabulary(path: Path) -> Vocabulary | BPEVocabulary:
    """A run's vocab.json: its characters, or its BPE."""
    path = Path(path)
    d = _read_vocabulary_file(path)
    if "bpe" in d:
        return BPEVocabulary(_tokenizers().Tokenizer.from_str(d["bpe"]), path)
    return Vocabulary(d["chars"], path)


def _parsed(path: Path) -> dict:
    """A vocabulary file's contents as what they mean: its characters in id order, or its BPE's JSON parsed."""
    d = _read_vocabulary_file(path)
    if "chars" in d:
        return {"chars": Vocabulary(d["chars"]).chars}
    try:
        return {"bpe": json.loads(d["bpe"])}
    except ValueError:
        raise ConfigError(f"{str(path)!r} holds a BPE that is not valid JSON") from None


def _tokens(d: dict) -> list[str]:
    """The token of each id of parsed vocabulary contents (a BPE's read from its JSON, without `tokenizers`)."""
    if "chars" in d:
        return list(d["chars"])
    model = d["bpe"]["model"]["vocab"]  # token -> id
    tokens = [""] * (max(model.values(), default=-1) + 1)
    for token, i in model.items():
        tokens[i] = token
    return tokens


def vocabulary_difference(a: Path, b: Path) -> str | None:
    """How two runs' vocabulary files differ, named by the first id that means another token ("id 12 is 'Z' in
    RUN_A but '~' in RUN_B"), or None when they map every token alike; a missing file is an error."""
    da, db = _parsed(Path(a)), _parsed(Path(b))
    if da == db:
        return None
    name_a, name_b = str(Path(a).parent), str(Path(b).parent)
    kinds = ["a BPE" if "bpe" in d else "characters" for d in (da, db)]
    if kinds[0] != kinds[1]:
        return f"{name_a!r} reads {kinds[0]} but {name_b!r} {kinds[1]}"
    ta, tb = _tokens(da), _tokens(db)
    for i in range(max(len(ta), len(tb))):
        x, y = (repr(t[i]) if i < len(t) else "no token" for t in (ta, tb))
        if x != y:
            return f"id {i} is {x} in {name_a!r} but {y} in {name_b!r}"
    return f"the BPEs of {name_a!r} and {name_b!r} have the same tokens but other merges or settings"


def usable_logits(logits: torch.Tensor, num_tokens: int | None) -> torch.Tensor:
    """logits (..., V) with the ids from num_tokens on, which no token of the vocabulary has, at -inf: a sampler
    never draws them. Unchanged when the vocabulary fills the model (num_tokens None or V)."""
    V = logits.shape[-1]
    if num_tokens is None or num_tokens >= V:
        return logits
    return logits.masked_fill(torch.arange(V, device=logits.device) >= num_tokens, float("-inf"))


@dataclass(frozen=True)
class TokenStream:
    """One split: token ids (int64, (n,)), the vocabulary they index, and the characters they encode."""

    tokens: torch.Tensor
    vocab: Vocabulary | BPEVocabulary
    name: str
    num_chars: int = 0

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def chars_per_token(self) -> float:
        """Characters per token (1 for characters): bits per token / this = bits per character."""
        return self.num_chars / len(self.tokens) if self.num_chars else 1.0


@dataclass(frozen=True)
class TextSplits:
    train: TokenStream
    test: TokenStream

    @property
    def vocab(self) -> Vocabulary | BPEVocabulary:
        return self.train.vocab


def read_text8(path: Path) -> tuple[str, str]:
    """(train, test) characters of text8.zip: the first 90M and the last 5M of its 100M."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if "text8" not in names:
                raise ConfigError(f"{str(path)!r} has no member 'text8' (it has {names[:3]})")
            raw = z.read("text8")
    except zipfile.BadZipFile:
        raise ConfigError(f"{str(path)!r} is not a zip file (data.format='text8' reads text8.zip)") from None
    text = raw.decode("ascii", errors="strict")
    n_train, n_valid, n_test = TEXT8_SPLIT
    if len(text) < n_train + n_valid + n_test:  # a smaller file (tests): the same proportions
        total = len(text)
        n_train, n_valid = total * 90 // 100, total * 5 // 100
    return text[:n_train], text[n_train + n_valid:]


def corpus_files(cfg: TextConfig) -> list[Path]:
    """The files of format "text" or "jsonl": data.paths in order (a glob: its matches sorted), else data.path (a
    glob: its matches sorted)."""
    patterns, field = (cfg.paths, "data.paths") if cfg.paths else ((cfg.path,), "data.path")
    files = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matches = sorted(Path(f) for f in glob.glob(str(Path(pattern).expanduser()), recursive=True)
                             if Path(f).is_file())
            if not matches:
                raise ConfigError(f"{field} {shown_path(pattern)} matches no file")
            files += matches
        elif not Path(pattern).expanduser().is_file():
            raise ConfigError(f"{field} {shown_path(pattern)} is not a file")
        else:
            files.append(Path(pattern).expanduser())
    return files


def _read_utf8(path: Path, field: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{field} {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json_lines(path: Path, column: str, field: str) -> list[str]:
    """The field `column` of every JSON line of a file (blank lines skipped); ConfigError naming the line."""
    texts = []
    for n, line in enumerate(_read_utf8(path, field).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"{field} {str(path)!r} line {n} is not JSON: {e}") from None
        if not isinstance(row, dict) or column not in row:
            have = ", ".join(map(repr, row)) if isinstance(row, dict) else f"a JSON {type(row).__name__}"
            raise ConfigError(f"{field} {str(path)!r} line {n} has no field data.text_column={column!r} "
                              f"(it has {have})")
        if not isinstance(row[column], str):
            raise ConfigError(f"{field} {str(path)!r} line {n}: field {column!r} is a JSON "
                              f"{type(row[column]).__name__}, not text")
        texts.append(row[column])
    return texts


def read_corpus(cfg: TextConfig) -> tuple[str, str, str, str]:
    """(training text, held-out text, the corpus' name, the field that names it for messages)."""
    if cfg.format in ("text8", "hf"):
        field, name = "data.path", Path(cfg.path).name
    else:
        files = corpus_files(cfg)
        field = "data.paths" if cfg.paths else "data.path"
        name = files[0].name if len(files) == 1 else f"{files[0].stem}+{len(files) - 1}"
    if cfg.format == "text8":
        path = Path(cfg.path)
        if not path.is_file():
            raise ConfigError(f"data.path {shown_path(cfg.path)} is not a file")
        return (*read_text8(path), name, field)
    test = None
    if cfg.format == "hf":
        text, test = load_hf_text(cfg.path, cfg.hf_format, cfg.hf_split, cfg.hf_test_split, cfg.text_column,
                                  cfg.separator)
    elif cfg.format == "jsonl":
        text = cfg.separator.join(t for f in files for t in read_json_lines(f, cfg.text_column, field))
    else:
        text = cfg.separator.join(_read_utf8(f, field) for f in files)
    shown = f"{field} {cfg.path!r}" if field == "data.path" else f"{field} {list(cfg.paths)!r}"
    if not text:
        raise ConfigError(f"{shown} is empty")
    if test is not None:
        if not test:
            raise ConfigError(f"{shown}: data.hf_test_split={cfg.hf_test_split!r} is empty")
        return text, test, name, shown
    cut = int(len(text) * cfg.train_fraction)
    return text[:cut], text[cut:], name, shown


def load_text(cfg: TextConfig, seq_len: int, vocab: Vocabulary | BPEVocabulary | None = None) -> TextSplits:
    """The corpus' train and held-out splits, encoded through `vocab` (a run's), or through a vocabulary made from
    the training part when None; raises ConfigError naming what is wrong with the file."""
    train, test, name, shown = read_corpus(cfg)
    if vocab is not None:
        chars = isinstance(vocab, Vocabulary)
        if chars != (cfg.tokenizer == "char"):
            raise ConfigError(f"data.tokenizer={cfg.tokenizer!r}, but the run's vocabulary {str(vocab.path)!r} is "
                              f"{'of characters' if chars else 'a BPE'}")
        unknown = (set(train) | set(test)) - set(vocab.index) if chars else set()  # a BPE encodes any text
        if unknown:
            raise ConfigError(f"{shown} has character(s) {''.join(sorted(unknown))!r} outside the "
                              f"run's vocabulary {str(vocab.path)!r} ({len(vocab)} characters), through which the "
                              "run reads its data")
    elif cfg.tokenizer == "bpe":
        vocab = BPEVocabulary.train(train, cfg.bpe_vocab_size)
        if len(vocab) < cfg.bpe_vocab_size:
            logger.warning("data.bpe_vocab_size=%d: the training text makes a BPE of only %d tokens (it has no more "
                           "merges to make)", cfg.bpe_vocab_size, len(vocab))
    else:
        vocab = Vocabulary(train)
        unknown = set(test) - set(vocab.index)
        if unknown:
            n = sum(c in unknown for c in test)
            raise ConfigError(f"{shown}: {n} of the {len(test)} held-out characters "
                              f"({100 * n / len(test):.2g}%) are {''.join(sorted(unknown))!r}, which the training part "
                              "(the vocabulary) never has, so their bits could not be counted: change the file or "
                              "data.train_fraction")
    splits = TextSplits(TokenStream(vocab.encode(train), vocab, f"{name}-train", len(train)),
                        TokenStream(vocab.encode(test), vocab, f"{name}-test", len(test)))
    for part, what in ((splits.train, "training"), (splits.test, "held-out")):
        if len(part) < seq_len + 1:
            raise ConfigError(f"{shown}: its {what} part has {len(part)} tokens, fewer than one "
                              f"sequence of model.seq_len={seq_len} (+1)")
    return splits


class WindowSampler:
    """Training batches of `seq_len`-token windows at offsets drawn from (seed, stream, step)."""

    def __init__(self, data: TokenStream, seq_len: int, batch_size: int, seed: int, stream: int):
        if len(data) < seq_len:
            raise ValueError(f"{data.name}: {len(data)} tokens, fewer than one window of {seq_len}")
        self.data, self.seq_len, self.batch_size, self.seed, self.stream = data, seq_len, batch_size, seed, stream

    def batch(self, step: int) -> torch.Tensor:
        """(batch_size, seq_len) token ids, drawn and gathered where the tokens are (see data.to_device)."""
        device = self.data.tokens.device
        g = make_generator(self.seed, self.stream, step, "windows", device=device)
        starts = torch.randint(len(self.data) - self.seq_len + 1, (self.batch_size,), generator=g, device=device)
        return self.data.tokens[starts[:, None] + torch.arange(self.seq_len, device=device)]  # (N, seq_len)


def held_out_windows(data: TokenStream, seq_len: int) -> torch.Tensor:
    """The held-out split cut into consecutive, non-overlapping windows, (M, seq_len)."""
    m = len(data) // seq_len
    return data.tokens[:m * seq_len].view(m, seq_len)


def shared_windows(data: TokenStream, seq_len: int, num: int = 256) -> torch.Tensor:
    """num of the held_out_windows spread evenly over the split (all of them when there are no more), (num, seq_len):
    one fixed set for every model and setting compared."""
    windows = held_out_windows(data, seq_len)
    if num >= len(windows):
        return windows
    return windows[torch.linspace(0, len(windows) - 1, num).round().long()]  # steps >= 1 apart: distinct
