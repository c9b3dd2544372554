"""--explain inside the runner's loop: one item at a time, gradients beside the attention.

The gradients themselves are attnpipe.extract.gradients' (∂target/∂A per head, head-gate
gradients, gradient × input, head ablation); this adapter hands the runner, per one-item batch,
the attention of every kind at gates = 1 (as a family Output, so the same guards, sink and
writer apply) and the gradient fields to store beside it.
"""

from __future__ import annotations

import numpy as np
import torch

from attnpipe.extract import gradients
from attnpipe.extract.inputs import Batch
from attnpipe.models.parts import Output


class Explainer:
    def __init__(self, model, spec: str, ablate: bool, inputs, selection):
        self.model = model
        self.selection = selection  # the stored layers and heads (sinks.Selection)
        self.target = gradients.parse_target(spec)
        self.ablate = ablate
        device = model.device
        limit = getattr(inputs, "max_length", None)

        def encode_other(text: str) -> torch.Tensor:
            ids = model.tokenizer(text, truncation=True, max_length=limit)["input_ids"]
            return torch.tensor([ids], device=device)

        self.objective = gradients.build_objective(model, self.target, encode_other)

    def __call__(self, batch: Batch) -> tuple[Output, list[dict]]:
        """(attention at gates = 1 of the one item, as an Output; its gradient fields)."""
        tensors = batch.tensors
        result = gradients.text_gradients(self.model, self.objective, tensors["input_ids"],
                                          tensors.get("token_type_ids"), self.ablate)
        attention = torch.from_numpy(result.attention)  # (L, H, n, n)
        out = Output(hidden=None, encoder_hidden=None,
                     attentions={"self": {layer: attention[layer][None] for layer in range(attention.shape[0])}})
        extras = {
            "attention_grad": result.attention_grad,
            "head_gate_grad": result.head_gate_grad,
            "token_grad_input": result.token_grad_input,
            "head_ablation": result.head_ablation,
            "gradient_target_value": result.target_value,
            "gradient_target_label": result.target_label,
        }
        return out, [select(extras, self.selection.layers, self.selection.heads)]

    def plain(self, batch: Batch) -> Output:
        """The same item through the family forward without gradients (for --verify)."""
        return self.model.family.forward(self.model.weights, batch.tensors)


def select(extras: dict, layers, heads) -> dict:
    """attention_grad restricted to the stored layers and heads (the rest stay whole)."""
    grad = extras["attention_grad"]
    return {**extras, "attention_grad": np.ascontiguousarray(grad[np.ix_(list(layers), list(heads))])}
