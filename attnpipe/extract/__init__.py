"""Stage 1, extraction: a checkpoint and inputs -> our forward pass -> an attention file.

The runner (`runner`) drives every input kind through one loop; what feeds it lives beside it:
the corpus reader (`corpus`), the input adapters, loading (`loading`), batching, the guards
(`guards`), verification against transformers, gradients (`gradients`) and `estimate`.
"""
