"""`python -m tools demo | geo-build [--src DIR] [--out DIR]`: the developer tools.

A tool whose optional extra is missing says in one line which extra to install and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: Modules of the optional extras (pyproject.toml): a tool that needs one names its extra.
EXTRA_OF = {"anthropic": "demo", "openai": "demo", "mmdb_writer": "geo-build",
            "netaddr": "geo-build"}


def missing_extra(tool: str, exc: ModuleNotFoundError) -> int:
    """One line naming the extra to install (exit 2), for a module of an optional extra."""
    module = (exc.name or "").partition(".")[0]
    extra = EXTRA_OF.get(module)
    if extra is None:
        raise exc
    print(f"error: python -m tools {tool} needs the optional {extra!r} extra ({module} is not "
          f"installed): pip install -e '.[{extra}]' in the source checkout", file=sys.stderr)
    return 2


def demo() -> int:
    try:
        from tools.demo import run_demo
    except ModuleNotFoundError as exc:
        return missing_extra("demo", exc)
    return run_demo()


def geo_build(src: str, out: str) -> int:
    try:
        from tools.geo_build import build_all
    except ModuleNotFoundError as exc:
        return missing_extra("geo-build", exc)
    try:
        written = build_all(Path(src), Path(out))
    except ValueError as exc:  # a malformed source, named with its entry; nothing written
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p in written:
        print(f"wrote {p}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools", description=(__doc__ or "")
                                     .split("\n\n")[0])
    sub = parser.add_subparsers(dest="tool", required=True)
    sub.add_parser("demo", help="run the end-to-end demo (make demo)")
    gb = sub.add_parser("geo-build", help="build the demo GeoIP databases from their JSON "
                                          "sources (make geo)")
    gb.add_argument("--src", default="geo/demo/src", help="the JSON sources")
    gb.add_argument("--out", default="geo/demo", help="where the .mmdb files go")
    args = parser.parse_args(argv)
    if args.tool == "demo":
        return demo()
    return geo_build(args.src, args.out)


if __name__ == "__main__":
    sys.exit(main())
