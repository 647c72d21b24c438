"""Run benchmarks: `python -m tests.bench` (all) or `python -m tests.bench ingest placement`.

Each area is a module tests/bench/<area>.py with a ``main(argv) -> int``.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def areas() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_"))


def main(argv: list[str]) -> int:
    wanted = [a for a in argv if not a.startswith("-")] or areas()
    unknown = sorted(set(wanted) - set(areas()))
    if unknown:
        print(f"unknown benchmark area(s): {', '.join(unknown)}; known: {', '.join(areas())}", file=sys.stderr)
        return 2
    flags = [a for a in argv if a.startswith("-")]
    status = 0
    for area in wanted:
        print(f"== bench {area}", flush=True)
        status |= importlib.import_module(f"tests.bench.{area}").main(flags)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
