"""attnpipe: extract, store, visualize and analyze the attention of transformer models.

The library behind the three scripts `extract_attention.py`, `visualize_attention.py` and
`analyze_attention.py`. Dimension order everywhere is (layer, head, query, key): rows are
queries, columns are keys, and each row sums to 1 over the keys that query may see.
"""

__version__ = "0.1.0"
