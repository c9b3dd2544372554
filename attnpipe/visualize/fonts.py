"""Fonts for token labels: a fallback chain so CJK (and other scripts) draw as glyphs, not boxes.

Matplotlib draws each character with the first family of `font.family` that has it (per-glyph
fallback, matplotlib >= 3.6, in PNG, SVG and PDF). DejaVu Sans (matplotlib's own) covers Latin,
Greek, Cyrillic and many symbols; Noto Sans CJK (Debian's fonts-noto-cjk, installed by
`make fonts`, also run by `make test` and `make docs-images`) covers Chinese, Japanese and Korean.
Only installed families go into the chain, so matplotlib never warns "font family not found";
a character no installed font has is still drawn as a box, with matplotlib's one "Glyph missing"
warning.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib as mpl
from matplotlib import font_manager

# Tried in order; the first is the Latin face, the others fill what it lacks.
FALLBACK_CHAIN = ("DejaVu Sans", "Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans CJK KR",
                  "Noto Sans CJK TC", "Noto Sans", "Noto Sans Arabic", "Noto Sans Hebrew",
                  "Noto Sans Devanagari", "Noto Sans Thai", "Noto Sans Symbols", "Noto Sans Symbols2")
# Where Debian's fonts-noto-cjk puts the faces (matplotlib's font cache may predate the install).
CJK_FILES = ("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
             "/usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc")


def installed_families() -> set[str]:
    return {entry.name for entry in font_manager.fontManager.ttflist}


def fallback_chain() -> list[str]:
    """The families of FALLBACK_CHAIN matplotlib can use here, in order."""
    families = installed_families()
    if not any("CJK" in family for family in families):
        # A font cache built before fonts-noto-cjk was installed does not list it: add the files.
        for path in CJK_FILES:
            if Path(path).exists():
                font_manager.fontManager.addfont(path)
        families = installed_families()
    return [family for family in FALLBACK_CHAIN if family in families]


def use_fallback_fonts() -> list[str]:
    """Make the installed part of FALLBACK_CHAIN matplotlib's sans-serif font; returns it."""
    chain = fallback_chain()
    mpl.rcParams["font.family"] = chain
    return chain


def has_cjk() -> bool:
    return any("CJK" in family for family in fallback_chain())
