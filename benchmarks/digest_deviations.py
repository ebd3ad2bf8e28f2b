"""How far the text cases of the regression digests move under a code change: trains the cases named (default: the
arlm and recurrent ones) and prints, for each, the tolerant mode's deviations and failures against the reference
recording (tests/digests.py, docs/testing.md) and whether this environment's recording still holds bit for bit.

    python benchmarks/digest_deviations.py /tmp/scratch [--json out.json] [case ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import digests  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("scratch", type=Path)
    ap.add_argument("cases", nargs="*", default=["arlm", "arlm-plain", "recurrent", "recurrent-huginn"])
    ap.add_argument("--json")
    args = ap.parse_intermixed_args()  # case names before or after --json
    file = digests.load()
    ref, mine = digests.reference(file), digests.recording_for(digests.environment(), file)
    limits = file["tolerance"]["limits"]
    out = {"reference_environment": ref["environment"], "this_environment": digests.environment(), "cases": {}}
    for name in args.cases:
        got = digests.describe_run(digests.train_case(name, args.scratch))
        exact = None if mine is None or name not in mine["cases"] else \
            got["digests"] == digests.expected_digests(mine["cases"][name])
        row = {"deviations": digests.deviations(got, ref["cases"][name]),
               "tolerant_failures": digests.tolerant_failures(got, ref["cases"][name], limits),
               "exact_recording_holds": exact}
        out["cases"][name] = row
        print(name, json.dumps(row), flush=True)
    out["limits"] = limits
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
