"""``kronc report``: a PNG of per-site formats and errors (and quality against size for several runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..report import REPORT, read_runs, require_matplotlib, write_report
from .args import EXIT_OK, UsageError

HELP = "write a PNG of per-site formats and errors (and quality against size for several runs)"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("dirs", nargs="+", metavar="DIR", help="folders written by 'kronc compress' or 'kronc demo'")
    p.add_argument("--out", "-o", type=Path, metavar="PNG", help="image to write (default: DIR/report.png)")


IMAGE_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg")
"""What ``--out`` may end in: the image formats matplotlib writes without extra packages."""


def run(args: argparse.Namespace) -> int:
    if args.out is not None and args.out.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"--out {args.out} does not end in an image suffix ({', '.join(IMAGE_SUFFIXES)})",
                         "e.g. --out report.png")
    require_matplotlib()
    for d in args.dirs:
        if not Path(d).exists():
            raise FileNotFoundError(f"{d} does not exist")
    runs, dense, title = read_runs(args.dirs)
    first = Path(args.dirs[0])
    out = args.out or ((first if first.is_dir() else first.parent) / REPORT)
    write_report(runs, out, dense=dense, title=title)
    quality = sum(r.measured.perplexity is not None for r in runs)
    print(f"wrote {out}: {len(runs)} run(s), {quality} with perplexity")
    return EXIT_OK
