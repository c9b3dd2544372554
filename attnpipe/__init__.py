"""attnpipe: extract, store, visualize and analyze the attention of transformer models.

The library behind the three scripts `extract_attention.py`, `visualize_attention.py` and
`analyze_attention.py` (installed as `attnpipe-extract`, `attnpipe-visualize`, `attnpipe-analyze`).
Dimension order everywhere is (layer, head, query, key): rows are queries, columns are keys, and
each row sums to 1 over the keys that query may see.

The Python API (attnpipe/api.py):

    import attnpipe
    corpus = attnpipe.open("results/demo/attention/demo/minilm.h5")   # .h5 or .json
    corpus["news-002"].attention(layer=5, head=3)                      # model indices
    corpus["news-002"].to_xarray()                                     # dims (layer, head, query, key)
    corpus.metrics()                                                   # pandas, long format
    attnpipe.extract(["The cat sat on the mat."])                      # in memory, no file

`attnpipe.extract` is also the extraction package (attnpipe/extract/); calling it runs
attnpipe.api.extract. The rest is imported on first use, so `import attnpipe` stays light.
"""

from attnpipe import extract  # a package that can be called: see attnpipe/extract/__init__.py
from attnpipe.version import __version__  # the one place it is written

_API = ("open", "Attention", "Text")


def __getattr__(name: str):
    if name in _API:
        from attnpipe import api

        return getattr(api, name)
    raise AttributeError(f"module 'attnpipe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["Attention", "Text", "__version__", "extract", "open"]
