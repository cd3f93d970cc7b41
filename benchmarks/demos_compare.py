"""Compare two demonstration datasets file by file, to prove a change to ``prunebench demos`` keeps
its demonstrations unchanged (the same attempts succeed, every recorded array equal):

    git stash; prunebench demos --tasks 0 1 --per-task 2 -o before; git stash pop
    prunebench demos --tasks 0 1 --per-task 2 -o after
    python benchmarks/demos_compare.py before after

Arrays that only one side records (a field added by the change) are listed, not compared.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def compare(before: Path, after: Path) -> list[str]:
    """The differences, one line each; [] when the datasets agree."""
    names = {p.relative_to(before) for p in before.glob("task*/seed*.*")}
    other = {p.relative_to(after) for p in after.glob("task*/seed*.*")}
    problems = [f"only in {before}: {p}" for p in sorted(names - other)]
    problems += [f"only in {after}: {p}" for p in sorted(other - names)]
    for name in sorted(p for p in names & other if p.suffix == ".npz"):
        with np.load(before / name) as a, np.load(after / name) as b:
            for key in sorted(set(a.files) ^ set(b.files)):
                print(f"{name}: {key} only in {'before' if key in a.files else 'after'} (not compared)")
            problems += [f"{name}: {key} differs" for key in sorted(set(a.files) & set(b.files))
                         if not np.array_equal(a[key], b[key])]
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    problems = compare(args.before, args.after)
    print("\n".join(problems) or "identical: the same attempts, every shared array equal")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
