"""Runs `diffusionblocks ARGS` with a fault injected at the Nth step of its checkpoint writes.

    python tests/faults.py N MODE -- train --out RUN ...

The steps counted are the moments of a checkpoint's life: before a block's weights are written, before
and after its training state is written, before and after each rename into place; and of a copy's
(compose, train --from): before a file is copied, before and after a directory is renamed. At step N,
MODE "kill" SIGKILLs the process (a power cut, the OOM killer) and MODE "full" raises ENOSPC at a write
(a full disk). N = 0 injects nothing and prints every step's label, one per line, to stdout.
"""

import errno
import os
import shutil
import signal
import sys

import torch

from diffusionblocks import checkpoint
from diffusionblocks.cli import main

WRITES = ("weights", "state", "copy")  # the labels at which a full disk can strike: the writes, not the renames


def inject(n: int, mode: str) -> list[str]:
    labels: list[str] = []

    def hit(label: str) -> None:
        labels.append(label)
        if len(labels) != n:
            return
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "full" and label.split()[0] in WRITES:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    write_weights, save, replace, rename, copyfile = (checkpoint._write_weights, torch.save, os.replace, os.rename,
                                                      shutil.copyfile)

    def _write_weights(tmp, b, state_dict, step, cfg, train_time_s):
        hit(f"weights block {b} step {step}")
        write_weights(tmp, b, state_dict, step, cfg, train_time_s)

    def _save(obj, f, *args, **kwargs):
        hit(f"state {os.path.basename(str(f))} step {obj.get('step') if isinstance(obj, dict) else '?'}")
        save(obj, f, *args, **kwargs)
        hit(f"state-written {os.path.basename(str(f))}")

    def _replace(src, dst):
        hit(f"rename {os.path.basename(str(dst))}")
        replace(src, dst)
        hit(f"renamed {os.path.basename(str(dst))}")

    def _rename(src, dst):
        hit(f"rename-dir {os.path.basename(str(dst))}")
        rename(src, dst)
        hit(f"renamed-dir {os.path.basename(str(dst))}")

    def _copyfile(src, dst, **kwargs):
        hit(f"copy {os.path.basename(str(src))}")
        return copyfile(src, dst, **kwargs)

    checkpoint._write_weights, checkpoint.torch.save, checkpoint.os.replace = _write_weights, _save, _replace
    os.rename, shutil.copyfile = _rename, _copyfile
    return labels


if __name__ == "__main__":
    n, mode, sep, *argv = sys.argv[1:]
    assert sep == "--" and mode in ("kill", "full")
    torch.set_num_threads(1)
    labels = inject(int(n), mode)
    code = main(argv)
    if int(n) == 0:
        print("\n".join(labels))
    sys.exit(code)
