"""Sizes of the library's files, classes and functions against issue 17's limits (docs/development.md, "Sizes").

Lines are counted as Python's ``ast`` spans them (a class or function from its ``def``/``class`` line to its last
line, docstring included); files by ``str.splitlines``. Exit status 1 when something is over a limit.

Example:
    $ python .ci/sizes.py                  # this checkout
    $ python .ci/sizes.py /tmp/old --top 3 # another tree (e.g. ``git archive <commit> memlong memlong_integrations``)
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

LIMITS = {"file": 450, "class": 300, "function": 80}  # the issue writes them "~450", "~300", "~80"
PACKAGES = ("memlong", "memlong_integrations")


def sizes(root: Path) -> list[tuple[str, str, int]]:
    """``(kind, name, lines)`` for every file, class and function (methods included) under the packages."""
    rows = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            source, rel = path.read_text(encoding="utf-8"), path.relative_to(root).as_posix()
            rows.append(("file", rel, len(source.splitlines())))
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    kind = "class" if isinstance(node, ast.ClassDef) else "function"
                    rows.append((kind, f"{rel}:{node.name}", node.end_lineno - node.lineno + 1))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parents[1]), help="checkout to measure")
    parser.add_argument("--top", type=int, default=3, help="largest items listed per kind")
    args = parser.parse_args(argv)
    rows = sizes(Path(args.root))
    over = 0
    print("| kind | limit | largest | over the limit |\n| --- | --- | --- | --- |")
    for kind, limit in LIMITS.items():
        ranked = sorted((r for r in rows if r[0] == kind), key=lambda r: -r[2])
        largest = ", ".join(f"`{name}` {n}" for _, name, n in ranked[: args.top])
        too_big = [f"`{name}` {n}" for _, name, n in ranked if n > limit]
        over += len(too_big)
        print(f"| {kind} ({len(ranked)}) | {limit} | {largest} | {', '.join(too_big) or 'none'} |")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
