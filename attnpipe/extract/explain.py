"""--explain inside the runner's loop: one input at a time, gradients beside the attention.

The gradients themselves are attnpipe.extract.gradients' (∂target/∂A per head and kind,
head-gate gradients, gradient × input, head ablation); this adapter hands the runner, per
one-input batch, the attention of every kind at gates = 1 (as a family Output, so the same
guards, sink and writer apply) and the gradient fields to store beside it.

Stored (attnpipe.store, schema versions 3 and 2 alike), every kind's: the "self" kind's gradients (the
encoder's, for encoder-decoders) as the text's attention_grad / head_gate_grad / head_ablation,
and for encoder-decoders the "decoder" and "cross" kinds' as the target's
decoder_* / cross_* fields (TargetAttention). Attention gradients are restricted to the stored
layers and heads of their kind, like the attention; gate gradients and ablations cover every head.
With --attribution ig (attnpipe.extract.attribution) each stored layer's integrated-gradients
attribution, its completeness gap and F(A) − F(0) are stored the same way, per kind.
"""

from __future__ import annotations

import numpy as np
import torch

from attnpipe.extract import attribution, gradients
from attnpipe.extract.inputs import SPLIT_SPECIAL_TOKENS, Batch
from attnpipe.models.parts import Output


class Explainer:
    def __init__(self, model, spec: str, ablate: bool, inputs, selections,
                 attribution: tuple[int, str] | None = None):
        gradients.check_explainable(model)  # --method hf: a clear error before any work
        self.model = model
        self.selections = selections  # kind -> the stored layers and heads (sinks.Selection)
        self.target = gradients.parse_target(spec)
        self.ablate = ablate
        self.attribution = attribution  # (steps, method) of --attribution ig, or None
        limit = getattr(inputs, "max_length", None)
        tokenizer = getattr(model, "tokenizer", None)
        device = getattr(model, "device", torch.device("cpu"))

        def encode_other(text: str) -> torch.Tensor:
            ids = tokenizer(text, truncation=True, max_length=limit,
                            split_special_tokens=SPLIT_SPECIAL_TOKENS)["input_ids"]
            return torch.tensor([ids], device=device)

        self.objective = gradients.build_objective(model, self.target, encode_other if tokenizer else None)

    def __call__(self, batch: Batch) -> tuple[Output, list[dict]]:
        """(attention at gates = 1 of the one input, as an Output; its gradient fields).

        The fields are TextAttention's; for encoder-decoders "target" holds TargetAttention's
        gradient fields, which the sink adds to the pair's target."""
        result = gradients.text_gradients(self.model, self.objective, batch.tensors, self.ablate)
        attentions = {kind: {layer: torch.from_numpy(values[layer])[None] for layer in range(values.shape[0])}
                      for kind, values in result.attention.items()}  # kind -> layer -> (1, H, Q, K)
        ablation = result.head_ablation or {}

        def stored_grad(kind: str) -> np.ndarray:  # (L', H', Q, K): the stored layers and heads
            selection = self.selections[kind]
            return np.ascontiguousarray(result.attention_grad[kind][np.ix_(selection.layers, selection.heads)])

        extras = {
            "attention_grad": stored_grad("self"),  # (L', H', n, n)
            "head_gate_grad": result.head_gate_grad["self"],
            "token_grad_input": result.token_grad_input,
            "head_ablation": ablation.get("self"),
            "gradient_target_value": result.target_value,
            "gradient_target_label": result.target_label,
        }
        attributed = {}
        if self.attribution is not None:
            attributed = self._attribution(batch, result.target_label)
            extras.update(attributed.pop("self"))
        if "cross" in result.attention_grad:  # encoder-decoders: the decoder side's kinds
            extras["target"] = {
                f"{kind}_{name}": value for kind in ("decoder", "cross") for name, value in (
                    ("attention_grad", stored_grad(kind)), ("head_gate_grad", result.head_gate_grad[kind]),
                    ("head_ablation", ablation.get(kind)))}
            for kind, fields in attributed.items():
                extras["target"].update({f"{kind}_{name}": value for name, value in fields.items()})
        return Output(hidden=None, attentions=attentions), [extras]

    def _attribution(self, batch: Batch, label: int) -> dict[str, dict[str, np.ndarray]]:
        """kind -> the stored fields of --attribution ig: attention_attribution (L', H', Q, K) on
        the stored layers and heads (every head of a layer is scaled; the stored ones are kept),
        attribution_gap and attribution_delta (L',)."""
        steps, method = self.attribution
        layers = {kind: list(selection.layers) for kind, selection in self.selections.items()}
        result = attribution.attention_attribution(self.model, self.objective, batch.tensors, label, layers,
                                                   steps, method)
        return {kind: {
            "attention_attribution": np.ascontiguousarray(result.attribution[kind][:, list(selection.heads)]),
            "attribution_gap": result.gap[kind], "attribution_delta": result.delta[kind]}
            for kind, selection in self.selections.items()}

    def plain(self, batch: Batch) -> Output:
        """The same input through the family forward without gradients (for --verify)."""
        return self.model.family.forward(self.model.weights, batch.tensors)
