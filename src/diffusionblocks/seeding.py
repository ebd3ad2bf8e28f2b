"""Seeds: every random stream of a run is a pure function of named parts (seed, block, step, purpose...).

A resumed or block-parallel run therefore draws exactly the same batches, noise levels and samples as
one that ran straight through, on any machine (the lowest layer of the package, beside `errors`).
"""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*parts: int | str) -> int:
    """Returns a well-mixed seed in [0, 2**63) that depends only on `parts` (ints and strings).

    The same parts give the same seed on every machine, process and Python version (strings are
    encoded by their UTF-8 bytes, never by the salted ``hash()``); different parts give unrelated
    seeds. Each part is encoded with a type tag and its length before hashing with
    ``numpy.random.SeedSequence``, so e.g. ``(1, 23)``, ``(12, 3)``, ``(123,)`` and ``("1",)`` all differ.
    Use one string part to name the purpose, e.g. ``derive_seed(seed, block, step, "noise")``.
    """
    words: list[int] = [len(parts)]
    for part in parts:
        if isinstance(part, str):
            tag, payload = 2, part.encode("utf-8")
        elif isinstance(part, (int, np.integer)) and not isinstance(part, bool):
            value = int(part)
            tag = 0 if value >= 0 else 1
            payload = abs(value).to_bytes((abs(value).bit_length() + 7) // 8, "little")
        else:
            raise TypeError(f"derive_seed parts must be int or str, got {type(part).__name__}: {part!r}")
        padded = payload + b"\0" * (-len(payload) % 4)
        words += [tag, len(payload)] + np.frombuffer(padded, dtype="<u4").tolist()
    state = np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1


def make_generator(*parts: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """Returns a torch.Generator on `device` seeded with ``derive_seed(*parts)``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(*parts))
    return gen


def sample_seeds(seed: int, num: int) -> list[int]:
    """The seeds of samples 0..num-1 drawn under `seed`; every (seed, i) gets its own (seed * 1000 + i would give
    seed 0's sample 1000 the noise of seed 1's sample 0)."""
    return [derive_seed(seed, i, "sample") for i in range(num)]
