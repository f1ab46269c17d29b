"""Summarises a `mutmut run` (make mutate): the score per module, then every survivor.

mutmut keeps, beside each mutated module under mutants/, a .meta file with the exit code
of the tests for each mutant (mutmut.stats.status_by_exit_code): 0 survived, 5 or 33 no
test reached the mutated function, a failure, timeout or crash killed it. The score
counts only killed mutants; survivors and untested ones are listed.
Run `.venv/bin/mutmut show <name>` to see one mutant's change.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

MUTANTS = Path("mutants")
SURVIVED = {0}
UNTESTED = {5, 33, None}
NOT_JUDGED = {2, 34, 35}  # interrupted, skipped, suspicious


def main() -> int:
    metas = sorted(MUTANTS.rglob("*.py.meta"))
    if not metas:
        print("no mutmut results under mutants/: run `make mutate`", file=sys.stderr)
        return 1
    totals: Counter[str] = Counter()
    survivors: list[str] = []
    untested: list[str] = []
    print(f"{'module':<32} {'mutants':>8} {'killed':>7} {'survived':>9} {'untested':>9} score")
    for meta in metas:
        module = str(meta.relative_to(MUTANTS)).removesuffix(".py.meta").replace("/", ".")
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        counts: Counter[str] = Counter()
        for name, code in sorted(codes.items()):
            if code in UNTESTED:
                counts["untested"] += 1
                untested.append(name)
            elif code in SURVIVED or code in NOT_JUDGED:
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
    for title, names in (("survivors", survivors), ("untested (no test reaches them)", untested)):
        print(f"\n{title} ({len(names)}):")
        for name in names:
            print(f"  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
