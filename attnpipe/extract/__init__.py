"""Stage 1, extraction: a checkpoint and inputs -> our forward pass -> an attention file.

The runner (`runner`) drives every input kind through one loop; what feeds it lives beside it:
the corpus reader (`corpus`), the input adapters, loading (`loading`), batching, the guards
(`guards`), verification against transformers, gradients (`gradients`) and `estimate`.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    """`attnpipe.extract(texts, model=...)` is the in-memory API (attnpipe.api.extract), while
    `attnpipe.extract.runner`, `.corpus`, ... stay this package's modules."""

    def __call__(self, *args, **kwargs):
        from attnpipe.api import extract

        return extract(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
