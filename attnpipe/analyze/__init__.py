"""Stage 2, analysis: pure functions on attention arrays -> long-format DataFrames.

Metrics, rollout, flow, head clustering, specialisation, checkpoint comparison, relevance,
faithfulness and the Markdown report. Only the faithfulness check re-runs a model.
`commands` is what analyze_attention.py does, one function per subcommand (files in, files out).
"""
