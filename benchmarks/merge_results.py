"""Merge benchmark rows measured elsewhere (a GPU run's ``$OUT``) into the recorded results:
each file's rows go into ``benchmarks/results/<same file name>``, replacing the rows of the
same device, op, shape and dtype and keeping all others.

    python benchmarks/merge_results.py gpu-out              # every result file found there
    python benchmarks/merge_results.py gpu-out/bench_kdloss.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from _common import RESULTS_DIR, merge_rows, read_rows

RESULTS = RESULTS_DIR
KNOWN = ("bench_solvers.json", "bench_kdloss.json", "bench_diffusion_losses.json", "bench_inference.json",
         "bench_piflow.json", "ncu_solver_bytes.json")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+",
                        help=f"JSON row files named like the recorded ones ({', '.join(KNOWN)}), or folders: the "
                             "files of those names in them (a run cut short may have written only some)")
    parser.add_argument("--results", default=RESULTS, help="the folder of recorded results (default: %(default)s)")
    args = parser.parse_args(argv)
    paths = []
    for path in args.files:
        if os.path.isdir(path):
            found = [os.path.join(path, n) for n in KNOWN if os.path.isfile(os.path.join(path, n))]
            if not found:
                parser.error(f"{path}: holds none of {', '.join(KNOWN)}")
            paths += found
        else:
            paths.append(path)
    loaded = []
    for path in paths:  # every file is checked before any is merged
        name = os.path.basename(path)
        if name not in KNOWN:
            parser.error(f"{path}: not a benchmark result file; expected one of {', '.join(KNOWN)}")
        try:
            with open(path) as f:
                rows = json.load(f)
        except (OSError, ValueError) as exc:
            parser.error(f"{path}: cannot read its rows: {exc}")
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "device" in r and "op" in r for r in rows):
            parser.error(f"{path}: expected a JSON list of rows, each with a device and an op")
        target = os.path.join(args.results, name)
        try:  # (the files merged into too: a bad one would stop the merge after others were written)
            read_rows(target)
        except (OSError, ValueError) as exc:
            parser.error(f"{target}: cannot merge into it: {exc}")
        loaded.append((name, rows))
    for name, rows in loaded:
        target = os.path.join(args.results, name)
        merged = merge_rows(target, rows)
        print(f"{target}: {len(rows)} rows merged, {len(merged)} in all")


if __name__ == "__main__":
    sys.exit(main())
