#!/usr/bin/env python3
"""Join per-corpus report.md files into one, rewriting relative links to stay valid."""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--checkpoints", nargs="+", required=True, help="checkpoint order")
    ap.add_argument("--output-file", type=Path, required=True)
    args = ap.parse_args(argv)
    out_dir = args.output_file.parent
    parts = ["# attnpipe workflow report\n",
             "Checkpoints, in comparison order: " + ", ".join(f"`{c}`" for c in args.checkpoints) + "\n"]
    for rep in args.reports:
        rel = os.path.relpath(rep.parent, out_dir)
        text = rep.read_text(encoding="utf-8")
        text = re.sub(r"\]\((?!https?:|/|#)([^)]+)\)", lambda m: f"]({rel}/{m.group(1)})", text)
        text = re.sub(r"^(#+) ", r"#\1 ", text, flags=re.M)  # one level down under this heading
        parts.append(text)
    args.output_file.write_text("\n".join(parts), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
