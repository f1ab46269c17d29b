"""Summarises a `mutmut run` (make mutate): the score per module, then every survivor.

mutmut keeps, beside each mutated module under mutants/, a .meta file with the exit code
of the tests for each mutant: 1 killed, 0 survived, None not run (no test reached it),
anything else a timeout or crash (counted as killed: the tests noticed).
Run `.venv/bin/mutmut show <name>` to see one survivor's change.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

MUTANTS = Path("mutants")


def main() -> int:
    metas = sorted(MUTANTS.rglob("*.py.meta"))
    if not metas:
        print("no mutmut results under mutants/: run `make mutate`", file=sys.stderr)
        return 1
    totals: Counter[str] = Counter()
    survivors: list[str] = []
    print(f"{'module':<32} {'mutants':>8} {'killed':>7} {'survived':>9} {'untested':>9} score")
    for meta in metas:
        module = str(meta.relative_to(MUTANTS)).removesuffix(".py.meta").replace("/", ".")
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        counts: Counter[str] = Counter()
        for name, code in sorted(codes.items()):
            if code is None:
                counts["untested"] += 1
            elif code == 0:
                counts["survived"] += 1
                survivors.append(name)
            else:
                counts["killed"] += 1
        total = sum(counts.values())
        totals.update(counts)
        totals["mutants"] += total
        score = counts["killed"] / total if total else 1.0
        print(
            f"{module:<32} {total:>8} {counts['killed']:>7} {counts['survived']:>9}"
            f" {counts['untested']:>9} {score:6.1%}"
        )
    score = totals["killed"] / totals["mutants"]
    print(
        f"{'all':<32} {totals['mutants']:>8} {totals['killed']:>7} {totals['survived']:>9}"
        f" {totals['untested']:>9} {score:6.1%}"
    )
    print(f"\nsurvivors ({len(survivors)}):")
    for name in survivors:
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
