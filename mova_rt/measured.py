"""Tables built from committed GPU measurements (`mova-rt bench --ops` results files): the one
command line both use, for `auto`'s kernel table (mova_rt/autoselect.py) and the fp8 GEMM
dispatch table (mova_rt/fp8/dispatch.py): read the results, build, write atomically, say what
was chosen. Bad input: one `error:` line, exit 2, nothing written."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable


def table_main(argv, prog: str, description: str, build: Callable, default_out: str,
               describe: Callable) -> int:
    """build([(file name, results dict)]) -> table (ValueError for unusable results);
    describe(entry) -> one line per table entry."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("results", nargs="+", help="mova-rt bench --ops JSON files of GPU runs")
    ap.add_argument("--out", default=default_out)
    args = ap.parse_args(argv)
    try:
        loaded = []
        for name in args.results:
            with open(name, encoding="utf-8") as fh:
                loaded.append((name, json.load(fh)))
        table = build(loaded)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(table, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, args.out)
    for e in table["entries"]:
        print(describe(e))
    print(f"wrote {args.out}: {len(table['entries'])} entries from {len(table['sources'])} files")
    return 0
