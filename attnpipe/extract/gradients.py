"""Gradients of a target through our own forward pass: ∂target/∂A per head, head importance,
head ablation and gradient × input, for every family (attnpipe/models: the family interface).

The family forward runs with autograd on, a gate of 1 on every head of every kind (`head_gates`,
Michel et al. 2019: a multiplier on each head's context `probs @ v` before the heads are merged,
where transformers' removed `head_mask` acted), and each layer's attention probabilities keep
their gradient. One scalar is explained per input (the `--explain`):

    predicted | <class index>   logit of a classification head, the checkpoint's own modules applied
                                 to our final hidden state: text encoders and causal LMs
                                 (AutoModelForSequenceClassification: pooler/classifier, or the score
                                 on the last position); ViT (ViTForImageClassification: the classifier
                                 on the final-norm [CLS]); `predicted` = the argmax class
    next-token                   causal LMs: logit of the most likely next token after the text
                                 (the checkpoint's LM head on our last position); encoder-decoders:
                                 the same at the last decoder position, i.e. the token after the
                                 given target prefix (the ...ForConditionalGeneration head: T5
                                 rescales the decoder output by d_model**-0.5 when its embeddings
                                 are tied, BART/Marian add final_logits_bias)
    similarity:<other text>      text models: cosine similarity of the mean-pooled final hidden
                                 states of the text and of <other text> (sentence embeddings, e.g.
                                 all-MiniLM-L6-v2); encoder-decoders: of the mean-pooled *encoder*
                                 states of the two sources; the other text's embedding is a constant
    output-norm                  any family, and the torch encoder's target (it has no head and no
                                 text): ‖mean over positions of the final hidden state‖₂ (the
                                 decoder's for encoder-decoders)

Per input this gives, per attention kind ("self"; encoder-decoders also "decoder" and "cross"):
    attention        {kind: (L, H, Q, K)}  probabilities at gates = 1
    attention_grad   {kind: (L, H, Q, K)}  ∂target/∂A[l, h, q, k]
    head_gate_grad   {kind: (L, H)}        ∂target/∂gate[l, h] at gates = 1; importance = |·|
    head_ablation    {kind: (L, H)}        target with gate[l, h] = 0 minus target (with --ablate; the
                                           class / token explained stays the one chosen at gates = 1)
and once:
    token_grad_input (n,)                  Σ_e x[t, e] · ∂target/∂x[t, e] on what is differentiated:
                                           the word embeddings x of the family's WORD_EMBEDDINGS table
                                           (before positions and the embedding norm; encoder-decoders:
                                           the source tokens); where WORD_EMBEDDINGS is None, what the
                                           first layer receives: ViT's [CLS] + patch + position
                                           embeddings (n = 1 + patches), the torch encoder's given
                                           inputs_embeds

Inputs run one at a time (no padding enters a gradient): `batch` is the family's batch dict
(attnpipe.models) of one unpadded input.

Example::

    from attnpipe.extract.gradients import parse_target, build_objective, text_gradients
    objective = build_objective(model, parse_target("predicted"))
    result = text_gradients(model, objective, {"input_ids": ids, "attention_mask": ones})  # (1, n)
    result.attention_grad["self"].shape                      # (L, H, n, n)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from attnpipe.errors import AttnpipeError
from attnpipe.models import CAUSAL_MODEL_TYPES, is_seq2seq, supported_model_types
from attnpipe.models.parts import Output

TARGETS = "predicted, a class index (0, 1, ...), next-token, similarity:TEXT, output-norm"


@dataclass(frozen=True)
class Target:
    kind: str  # "class", "predicted", "next-token", "similarity" or "output-norm"
    spec: str  # as the user wrote it (recorded in the file)
    class_index: int | None = None
    other_text: str | None = None


def parse_target(spec: str) -> Target:
    """`predicted`, a class index, `next-token`, `similarity:<text>` or `output-norm` -> Target."""
    spec = spec.strip()
    if spec in ("predicted", "next-token", "output-norm"):
        return Target(spec, spec)
    if spec.startswith("similarity:"):
        other = spec[len("similarity:"):]
        if not other.strip():
            raise AttnpipeError("--explain similarity:TEXT needs a text after 'similarity:'")
        return Target("similarity", spec, other_text=other)
    try:
        index = int(spec)
    except ValueError as err:
        raise AttnpipeError(f"--explain {spec!r} is not one of: {TARGETS}") from err
    if index < 0:
        raise AttnpipeError(f"--explain class index must be >= 0, got {index}")
    return Target("class", spec, class_index=index)


@dataclass(frozen=True)
class Objective:
    """A scalar to explain: `value(hidden, label)` on one of our Output's states (B, n, E) -> (B,).

    `reads` names the Output field given to `value` and `choose`: "hidden" (the final hidden
    state; the decoder's for encoder-decoders) or "encoder_hidden". `choose(hidden)` picks the
    label (class or token id, -1 when there is none) once, at gates = 1; ablations explain the
    same label.
    """

    target: Target
    choose: Callable[[torch.Tensor], int]
    value: Callable[[torch.Tensor, int], torch.Tensor]
    reads: Literal["hidden", "encoder_hidden"] = "hidden"

    def states(self, out: Output) -> torch.Tensor:
        return getattr(out, self.reads)


def _kind_of(model) -> str:
    """The model type for messages: "bert", "vit", ...; a --torch-model's family: "torch_encoder"."""
    return getattr(model, "model_type", None) or model.family.__name__.rsplit(".", 1)[-1]


def _dtype(model) -> torch.dtype:
    return next(model.hf_model.parameters()).dtype


def _checkpoint_dir(model, what: str):
    if getattr(model, "model_dir", None) is None or getattr(model, "hf_model", None) is None:
        raise AttnpipeError(f"--explain {what} needs a transformers checkpoint with that head; "
                            "a --torch-model has none: use --explain output-norm")
    return model.model_dir


def _architectures(model) -> list[str]:
    return list(getattr(model.hf_model.config, "architectures", None) or [])


def _classification_head(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """The checkpoint's classification head as a function of our final hidden state -> (B, C)."""
    import transformers

    family = model.family
    model_dir = _checkpoint_dir(model, "predicted / a class index")
    architectures = _architectures(model)
    if family.INPUT_KIND == "image":
        if not any(name.endswith("ForImageClassification") for name in architectures):
            raise AttnpipeError(
                f"--explain predicted / a class index needs an image-classification head, but {model_dir} is a "
                f"{', '.join(architectures) or _kind_of(model)} checkpoint (config.json 'architectures'); "
                "use --explain output-norm")
        clf = transformers.AutoModelForImageClassification.from_pretrained(
            model_dir, dtype=_dtype(model)).to(model.device).eval()
        return lambda h: clf.classifier(h[:, 0])  # ViTForImageClassification: the final-norm [CLS]
    if family.INPUT_KIND != "text":
        raise AttnpipeError(
            f"--explain predicted / a class index is not supported for {_kind_of(model)} models; "
            "use next-token, similarity:TEXT or output-norm")
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise AttnpipeError(
            f"--explain predicted / a class index needs a sequence-classification head, but "
            f"{model_dir} is a {', '.join(architectures) or model.model_type} checkpoint "
            "(config.json 'architectures'); use --explain similarity:TEXT for an embedding model"
            + (" or next-token for a causal LM" if family.CAUSAL else "")
        )
    clf = transformers.AutoModelForSequenceClassification.from_pretrained(
        model_dir, dtype=_dtype(model), trust_remote_code=model.trust_remote_code,
    ).to(model.device).eval()
    kind = model.model_type
    # Each head is the model's own modules, in the order its forward() applies them (eval: no dropout).
    if kind == "bert":
        return lambda h: clf.classifier(clf.dropout(clf.bert.pooler(h)))  # tanh pooler on [CLS]
    if kind in ("roberta", "xlm-roberta", "electra"):
        return lambda h: clf.classifier(h)  # their ClassificationHead reads position 0 itself
    if kind == "distilbert":
        return lambda h: clf.classifier(torch.relu(clf.pre_classifier(h[:, 0])))
    if kind == "albert":
        return lambda h: clf.classifier(clf.albert.pooler_activation(clf.albert.pooler(h[:, 0])))
    if family.CAUSAL:
        return lambda h: clf.score(h[:, -1])  # one unpadded text: its last token is the last position
    raise AttnpipeError(f"--explain with a classification head is not supported for model type {kind!r}")


def _lm_head(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """The checkpoint's LM head on our last (decoder) position -> (B, vocab) logits."""
    import transformers

    family = model.family
    if not (family.CAUSAL or family.INPUT_KIND == "pairs"):
        seq2seq = [t for t in supported_model_types() if is_seq2seq(t)]
        raise AttnpipeError(
            f"--explain next-token needs a causal language model ({', '.join(sorted(CAUSAL_MODEL_TYPES))}) "
            f"or an encoder-decoder ({', '.join(seq2seq)}); {getattr(model, 'model_dir', None) or 'this model'} "
            f"is a {_kind_of(model)} model"
        )
    model_dir = _checkpoint_dir(model, "next-token")
    auto = transformers.AutoModelForCausalLM if family.CAUSAL else transformers.AutoModelForSeq2SeqLM
    lm, info = auto.from_pretrained(
        model_dir, dtype=_dtype(model), trust_remote_code=model.trust_remote_code, output_loading_info=True,
    )
    missing = sorted(key for key in info["missing_keys"] if "lm_head" in key)
    if missing:  # a base-model folder of an untied LM: transformers would use a random head
        raise AttnpipeError(
            f"--explain next-token needs the LM head's weights, but {model_dir} has none "
            f"({', '.join(missing)} missing): save the ...For{'CausalLM' if family.CAUSAL else 'ConditionalGeneration'}"
            " model, not the base model"
        )
    lm = lm.to(model.device).eval()
    head = lm.get_output_embeddings()
    config = lm.config
    # T5ForConditionalGeneration scales the decoder output by d_model**-0.5 before its tied head
    # (T5Config.scale_decoder_outputs; other configs have no such field).
    scale = lm.model_dim**-0.5 if getattr(config, "scale_decoder_outputs", False) else 1.0
    bias = getattr(lm, "final_logits_bias", None)  # BART / Marian: (1, vocab), added to the logits
    if bias is None:
        return lambda h: head(h[:, -1] * scale)  # (B, vocab): logits for the token after the (decoder) input
    return lambda h: head(h[:, -1] * scale) + bias


def _embedding(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.mean(dim=1)  # (B, E): mean over the real tokens (one unpadded input)


def as_batch(model, inputs) -> dict[str, torch.Tensor]:
    """A family batch of one unpadded input: a dict as given, or (1, n) token ids -> a text batch.

    Encoder-decoders without a decoder input get the decoder start token alone.
    """
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs, "attention_mask": torch.ones_like(inputs)}
    batch = dict(inputs)
    if "decoder" in model.family.KINDS and "decoder_input_ids" not in batch:
        config = model.hf_model.config
        start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.pad_token_id
        ids = batch["input_ids"]
        batch["decoder_input_ids"] = torch.full((ids.shape[0], 1), start or 0, dtype=ids.dtype, device=ids.device)
        batch["decoder_attention_mask"] = torch.ones_like(batch["decoder_input_ids"])
    return batch


def build_objective(model, target: Target, encode: Callable[[str], object] | None = None) -> Objective:
    """The scalar to explain for a loaded model (attnpipe.extract.loading.LoadedModel, or any object
    with `family` and `weights`, plus `model_dir`, `hf_model`, `device`, `trust_remote_code` and
    `model_type` for the targets that read a checkpoint's head). `encode(text)` gives the other
    text of a similarity target as (1, n) token ids or a batch dict."""
    family = model.family
    if target.kind in ("class", "predicted"):
        head = _classification_head(model)

        def choose(hidden):
            logits = head(hidden)
            if target.kind == "predicted":
                return int(logits[0].argmax())
            if target.class_index >= logits.shape[-1]:
                raise AttnpipeError(
                    f"--explain {target.class_index} is out of range: the classifier has "
                    f"{logits.shape[-1]} classes (0 to {logits.shape[-1] - 1})"
                )
            return target.class_index

        return Objective(target, choose, lambda hidden, label: head(hidden)[:, label])
    if target.kind == "next-token":
        head = _lm_head(model)
        return Objective(target, lambda hidden: int(head(hidden)[0].argmax()),
                         lambda hidden, label: head(hidden)[:, label])
    if target.kind == "similarity":
        if family.INPUT_KIND not in ("text", "pairs"):
            raise AttnpipeError(f"--explain similarity:TEXT needs a text model; {_kind_of(model)} inputs are "
                                f"{family.INPUT_KIND}: use --explain output-norm")
        if encode is None:
            raise ValueError("a similarity target needs `encode` (text -> input ids)")
        reads = "encoder_hidden" if family.INPUT_KIND == "pairs" else "hidden"
        with torch.no_grad():
            other = _embedding(getattr(run(model, encode(target.other_text)), reads))  # constant (1, E)
        return Objective(target, lambda hidden: -1,
                         lambda hidden, label: torch.cosine_similarity(_embedding(hidden), other), reads)
    if target.kind == "output-norm":
        return Objective(target, lambda hidden: -1, lambda hidden, label: _embedding(hidden).norm(dim=-1))
    raise ValueError(f"unknown target kind {target.kind!r}")


def run(model, inputs, head_gates: Mapping[str, torch.Tensor] | None = None, weights=None) -> Output:
    """Our forward pass on one unpadded input (a batch dict, or (1, n) token ids): every layer kept."""
    return model.family.forward(weights or model.weights, as_batch(model, inputs), head_gates=head_gates)


def check_explainable(model) -> None:
    """Refuse a family that cannot be explained, before any work (--method hf has no gates)."""
    if model.family.WORD_EMBEDDINGS is None and model.family.INPUT_KIND == "text":
        raise AttnpipeError("--explain needs attnpipe's own forward pass (head gates, word embeddings); "
                            "--method hf runs transformers' own: drop --method hf")


def _own_rows(weights, field: str, ids: torch.Tensor):
    """(weights, ids, rows): the n rows of table `field` that ids (1, n) use, copied into n new
    vocabulary rows (ids vocab..vocab+n-1) that are autograd leaves, so a token repeated in the
    text still gets one gradient per position."""
    table = getattr(weights, field)  # (vocab, E)
    rows = table[ids[0]].detach().clone().requires_grad_(True)  # (n, E)
    extended = torch.cat([table.detach(), rows], dim=0)  # (vocab + n, E)
    own = table.shape[0] + torch.arange(ids.shape[1], device=ids.device)[None]  # (1, n)
    return dataclasses.replace(weights, **{field: extended}), own, rows


def differentiable_input(model, batch: dict[str, torch.Tensor]):
    """(weights, batch, leaf): the input rewritten so that `leaf` (n, E) is what gradient × input
    differentiates (see the module docstring): own rows of the WORD_EMBEDDINGS table for token
    ids, otherwise the first layer's input, given as `inputs_embeds`.

    Encoder-decoders get own rows of their DECODER_WORD_EMBEDDINGS table too (not reported):
    nothing of the source reaches the decoder's first self-attention, which must still be on the
    autograd path.
    """
    family, weights = model.family, model.weights
    field = family.WORD_EMBEDDINGS
    if field is not None:
        weights, own, leaf = _own_rows(weights, field, batch["input_ids"])
        batch = {**batch, "input_ids": own}
        decoder_field = getattr(family, "DECODER_WORD_EMBEDDINGS", None)
        if decoder_field is not None:
            weights, own, _ = _own_rows(weights, decoder_field, batch["decoder_input_ids"])
            batch["decoder_input_ids"] = own
        return weights, batch, leaf
    if "inputs_embeds" in batch:  # the torch encoder: the embeddings are the input
        x = batch["inputs_embeds"]
    else:  # ViT: [CLS] + patch embeddings + positions, what its first layer receives
        x = family.embed(weights, batch["pixel_values"])  # (1, n, E)
    leaf = x[0].detach().clone().requires_grad_(True)  # (n, E)
    rest = {key: value for key, value in batch.items() if key != "pixel_values"}
    return weights, {**rest, "inputs_embeds": leaf[None]}, leaf


def gate_shapes(weights, kinds: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """(L, H) of each kind's gates: the encoder's (or only) stack for "self", the decoder's otherwise."""
    return {kind: (weights.num_layers, weights.num_heads) if kind == "self"
            else (weights.decoder_num_layers, weights.decoder_num_heads) for kind in kinds}


@dataclass(frozen=True)
class TextGradients:
    """One input's gradients, per attention kind (see the module docstring)."""

    attention: dict[str, np.ndarray]  # kind -> (L, H, Q, K) probabilities at gates = 1
    attention_grad: dict[str, np.ndarray]  # kind -> (L, H, Q, K) ∂target/∂A
    head_gate_grad: dict[str, np.ndarray]  # kind -> (L, H) ∂target/∂gate
    token_grad_input: np.ndarray  # (n,) over the differentiated input's positions
    target_value: float
    target_label: int
    head_ablation: dict[str, np.ndarray] | None = None  # kind -> (L, H)


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def text_gradients(model, objective: Objective, batch, ablate: bool = False) -> TextGradients:
    """Gradients of the objective for one input (a batch dict of one, or (1, n) ids; no padding)."""
    batch = as_batch(model, batch)
    weights, own_batch, leaf = differentiable_input(model, batch)
    kinds = model.family.KINDS
    gates = {kind: torch.ones(*shape, dtype=leaf.dtype, device=leaf.device, requires_grad=True)
             for kind, shape in gate_shapes(model.weights, kinds).items()}  # kind -> (L, H)
    with torch.enable_grad():
        out = model.family.forward(weights, own_batch, head_gates=gates)
        for layers in out.attentions.values():
            for probs in layers.values():
                probs.retain_grad()
        states = objective.states(out)
        label = objective.choose(states.detach())
        value = objective.value(states, label)[0]
        value.backward()
    attention, attention_grad = {}, {}
    for kind in kinds:
        layers = sorted(out.attentions[kind])
        attention[kind] = _numpy(torch.cat([out.attentions[kind][l] for l in layers]))  # (L, H, Q, K)
        grads = [out.attentions[kind][l].grad for l in layers]
        attention_grad[kind] = _numpy(torch.cat([torch.zeros_like(out.attentions[kind][l]) if g is None else g
                                                 for l, g in zip(layers, grads)]))  # unused layer: 0
    grad_input = (leaf.grad * leaf.detach()).sum(-1)  # (n,)
    ablation = None
    if ablate:
        ablation = head_ablation(model, objective, batch, label, float(value.detach()))
    return TextGradients(
        attention=attention,
        attention_grad=attention_grad,
        head_gate_grad={kind: _numpy(g.grad if g.grad is not None else torch.zeros_like(g))
                        for kind, g in gates.items()},
        token_grad_input=_numpy(grad_input),
        target_value=float(value.detach()),
        target_label=label,
        head_ablation=ablation,
    )


ABLATION_BATCH = 32  # ablated copies of an input per forward pass (each with its own gates)


def head_ablation(model, objective: Objective, batch, label: int, full: float) -> dict[str, np.ndarray]:
    """kind -> (L, H): the target with one head's gate at 0, minus the target with every gate at 1.

    Copies of the input run as a batch, copy r with gates (L, B, H) of one kind zeroing head r only.
    """
    batch = as_batch(model, batch)
    dtype, device = _compute_dtype(model, batch), batch[next(iter(batch))].device
    result = {}
    with torch.no_grad():
        for kind, (num_layers, num_heads) in gate_shapes(model.weights, model.family.KINDS).items():
            values = []
            for first in range(0, num_layers * num_heads, ABLATION_BATCH):
                heads = torch.arange(first, min(first + ABLATION_BATCH, num_layers * num_heads))
                gates = torch.ones(num_layers, len(heads), num_heads, dtype=dtype, device=device)
                gates[heads // num_heads, torch.arange(len(heads)), heads % num_heads] = 0.0  # (L, B, H)
                copies = {key: value.expand(len(heads), *value.shape[1:]) for key, value in batch.items()}
                out = run(model, copies, {kind: gates})
                values.append(objective.value(objective.states(out), label).double().cpu())
            result[kind] = (torch.cat(values).numpy() - full).reshape(num_layers, num_heads)
    return result


def _compute_dtype(model, batch: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype the forward computes in: the word-embedding table's, or the (float) input's."""
    field = model.family.WORD_EMBEDDINGS
    if field is not None:
        return getattr(model.weights, field).dtype
    return next(value.dtype for value in batch.values() if value.is_floating_point())
