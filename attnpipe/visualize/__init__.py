"""Stage 2, visualization: attention files -> figures, frontend JSON and the offline HTML viewer.

Reads files only, never a model. Plot functions draw on an Axes they are given (`plots`);
`run` is what visualize_attention.py does, as a function.
"""
