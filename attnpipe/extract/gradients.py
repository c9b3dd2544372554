"""Gradients of a target through our own forward pass: ∂target/∂A per head, head importance,
head ablation and gradient × input.

The family forward runs with autograd on, a gate of 1 on every head (`head_gates`, Michel et
al. 2019: a multiplier on each head's context `probs @ v` before the heads are merged, where
transformers' removed `head_mask` acted), and each layer's attention probabilities keep their
gradient. One scalar is explained per text (the `--explain`):

    predicted | <class index>   logit of a sequence-classification head (the checkpoint's own
                                 pooler/classifier modules from AutoModelForSequenceClassification,
                                 applied to our final hidden state); `predicted` = the argmax class
    next-token                   causal LMs: logit of the most likely next token after the text
                                 (the checkpoint's LM head on our last position)
    similarity:<other text>      any model: cosine similarity of the mean-pooled final hidden
                                 states of the text and of <other text> (sentence embeddings, e.g.
                                 all-MiniLM-L6-v2); the other text's embedding is a constant

Per text this gives (all float32 when stored):
    attention_grad   (L, H, n, n)  ∂target/∂A[l, h, q, k]
    head_gate_grad   (L, H)        ∂target/∂gate[l, h] at gates = 1; importance = |·|
    token_grad_input (n,)          Σ_e x[t, e] · ∂target/∂x[t, e] on the word embeddings x
                                   (before position embeddings and the embedding norm)
    head_ablation    (L, H)        target with gate[l, h] = 0 minus target (with --ablate; the
                                   class / token explained stays the one chosen at gates = 1)

Texts run one at a time (no padding enters a gradient).

Example::

    from attnpipe.extract.gradients import parse_target, build_objective, text_gradients
    objective = build_objective(model, parse_target("predicted"))
    result = text_gradients(model, objective, input_ids)    # input_ids: (1, n)
    result.attention_grad.shape                              # (L, H, n, n)
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from attnpipe.errors import AttnpipeError

# Where each family keeps its word-embedding matrix (gradient × input needs it).
_WORD_EMBEDDING_FIELD = {"bert": "word", "gpt2": "wte", "llama": "embed"}
CAUSAL_FAMILIES = ("gpt2", "llama")


@dataclass(frozen=True)
class Target:
    kind: str  # "class", "predicted", "next-token" or "similarity"
    spec: str  # as the user wrote it (recorded in the file)
    class_index: int | None = None
    other_text: str | None = None


def parse_target(spec: str) -> Target:
    """`predicted`, a class index, `next-token` or `similarity:<text>` -> Target."""
    spec = spec.strip()
    if spec == "predicted":
        return Target("predicted", spec)
    if spec == "next-token":
        return Target("next-token", spec)
    if spec.startswith("similarity:"):
        other = spec[len("similarity:"):]
        if not other.strip():
            raise AttnpipeError("--explain similarity:TEXT needs a text after 'similarity:'")
        return Target("similarity", spec, other_text=other)
    try:
        index = int(spec)
    except ValueError as err:
        raise AttnpipeError(
            f"--explain {spec!r} is not one of: predicted, a class index (0, 1, ...), next-token, "
            "similarity:TEXT"
        ) from err
    if index < 0:
        raise AttnpipeError(f"--explain class index must be >= 0, got {index}")
    return Target("class", spec, class_index=index)


@dataclass(frozen=True)
class Objective:
    """A scalar to explain: `value(hidden, label)` on our final hidden states (B, n, E) -> (B,).

    `choose(hidden)` picks the label (class or token id, -1 when there is none) once, at gates =
    1; ablations explain the same label.
    """

    target: Target
    choose: Callable[[torch.Tensor], int]
    value: Callable[[torch.Tensor, int], torch.Tensor]


def _sequence_head(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """The checkpoint's classification head as a function of our final hidden state -> (1, C)."""
    import transformers

    config = model.hf_model.config
    architectures = getattr(config, "architectures", None) or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise AttnpipeError(
            f"--explain predicted / a class index needs a sequence-classification head, but "
            f"{model.model_dir} is a {', '.join(architectures) or model.model_type} checkpoint "
            "(config.json 'architectures'); use --explain similarity:TEXT for an embedding model"
            + (" or next-token for a causal LM" if model.family.__name__.rsplit('.', 1)[-1] in CAUSAL_FAMILIES else "")
        )
    clf = transformers.AutoModelForSequenceClassification.from_pretrained(
        model.model_dir, dtype=next(model.hf_model.parameters()).dtype,
        trust_remote_code=model.trust_remote_code,
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
    if kind in ("gpt2", "llama", "mistral", "qwen2"):
        return lambda h: clf.score(h[:, -1])  # one unpadded text: its last token is the last position
    raise AttnpipeError(f"--explain with a classification head is not supported for model type {kind!r}")


def _lm_head(model) -> Callable[[torch.Tensor], torch.Tensor]:
    import transformers

    if model.family.__name__.rsplit(".", 1)[-1] not in CAUSAL_FAMILIES:
        raise AttnpipeError(
            f"--explain next-token needs a causal language model (gpt2, llama, mistral, qwen2); "
            f"{model.model_dir} is a {model.model_type} model"
        )
    lm, info = transformers.AutoModelForCausalLM.from_pretrained(
        model.model_dir, dtype=next(model.hf_model.parameters()).dtype,
        trust_remote_code=model.trust_remote_code, output_loading_info=True,
    )
    missing = sorted(key for key in info["missing_keys"] if "lm_head" in key)
    if missing:  # a base-model folder of an untied LM: transformers would use a random head
        raise AttnpipeError(
            f"--explain next-token needs the LM head's weights, but {model.model_dir} has none "
            f"({', '.join(missing)} missing): save the ...ForCausalLM model, not the base model"
        )
    lm = lm.to(model.device).eval()
    head = lm.get_output_embeddings()
    return lambda h: head(h[:, -1])  # (1, vocab): logits for the token after the text


def _embedding(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.mean(dim=1)  # (1, E): mean over the real tokens (one unpadded text)


def build_objective(model, target: Target, encode: Callable[[str], torch.Tensor] | None = None) -> Objective:
    """The scalar to explain for a loaded model (attnpipe.extract.loading.LoadedModel)."""
    if target.kind in ("class", "predicted"):
        head = _sequence_head(model)

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
        if encode is None:
            raise ValueError("a similarity target needs `encode` (text -> input ids)")
        with torch.no_grad():
            other = _embedding(run(model, encode(target.other_text)).hidden)  # constant (1, E)
        return Objective(target, lambda hidden: -1,
                         lambda hidden, label: torch.cosine_similarity(_embedding(hidden), other))
    raise ValueError(f"unknown target kind {target.kind!r}")


def run(model, input_ids: torch.Tensor, head_gates: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None, weights=None):
    """Our forward pass on one unpadded text (1, n): every layer kept."""
    attention_mask = torch.ones_like(input_ids)
    if token_type_ids is None and getattr(model.weights, "token_type", None) is not None:
        token_type_ids = torch.zeros_like(input_ids)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None:
        batch["token_type_ids"] = token_type_ids
    out = model.family.forward(weights or model.weights, batch,
                               head_gates=None if head_gates is None else {"self": head_gates})
    return dataclasses.replace(out, attentions=out.attentions["self"])


def _word_embeddings(model) -> tuple[str, torch.Tensor]:
    family = model.family.__name__.rsplit(".", 1)[-1]
    field = _WORD_EMBEDDING_FIELD.get(family)
    if field is None:
        raise AttnpipeError(
            f"--explain is not supported for {model.model_type} models yet; it works for "
            "bert-like encoders, gpt2 and the llama family"
        )
    return field, getattr(model.weights, field)  # (vocab, E)


def _with_own_embeddings(model, input_ids: torch.Tensor):
    """Weights whose word embeddings of this text's positions are leaves we can differentiate.

    The n rows the text uses are copied into n new vocabulary rows (ids vocab..vocab+n-1), so a
    token repeated in the text still gets one gradient per position. Returns (weights, ids, rows).
    """
    field, table = _word_embeddings(model)  # (vocab, E)
    rows = table[input_ids[0]].detach().clone().requires_grad_(True)  # (n, E)
    extended = torch.cat([table.detach(), rows], dim=0)  # (vocab + n, E)
    ids = table.shape[0] + torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, n)
    return dataclasses.replace(model.weights, **{field: extended}), ids, rows


@dataclass(frozen=True)
class TextGradients:
    attention: np.ndarray  # (L, H, n, n) probabilities at gates = 1
    attention_grad: np.ndarray  # (L, H, n, n)
    head_gate_grad: np.ndarray  # (L, H)
    token_grad_input: np.ndarray  # (n,)
    target_value: float
    target_label: int
    head_ablation: np.ndarray | None = None  # (L, H)


def text_gradients(model, objective: Objective, input_ids: torch.Tensor,
                   token_type_ids: torch.Tensor | None = None, ablate: bool = False) -> TextGradients:
    """Gradients of the objective for one text (input_ids (1, n), no padding)."""
    weights, ids, rows = _with_own_embeddings(model, input_ids)
    dtype = rows.dtype
    gates = torch.ones(model.num_layers, model.num_heads, dtype=dtype, device=input_ids.device,
                       requires_grad=True)  # (L, H)
    with torch.enable_grad():
        out = run(model, ids, gates, token_type_ids, weights)
        for probs in out.attentions.values():
            probs.retain_grad()
        label = objective.choose(out.hidden.detach())
        value = objective.value(out.hidden, label)[0]
        value.backward()
    layers = sorted(out.attentions)
    attention = torch.cat([out.attentions[l] for l in layers])  # (L, H, n, n)
    attention_grad = torch.cat([out.attentions[l].grad for l in layers])  # (L, H, n, n)
    grad_input = (rows.grad * rows.detach()).sum(-1)  # (n,)
    ablation = None
    if ablate:
        ablation = head_ablation(model, objective, input_ids, label, float(value.detach()), token_type_ids)
    return TextGradients(
        attention=attention.detach().cpu().numpy(),
        attention_grad=attention_grad.detach().cpu().numpy(),
        head_gate_grad=gates.grad.detach().cpu().numpy(),
        token_grad_input=grad_input.detach().cpu().numpy(),
        target_value=float(value.detach()),
        target_label=label,
        head_ablation=ablation,
    )


ABLATION_BATCH = 32  # ablated copies of a text per forward pass (each with its own gates)


def head_ablation(model, objective: Objective, input_ids: torch.Tensor, label: int, full: float,
                  token_type_ids: torch.Tensor | None = None) -> np.ndarray:
    """(L, H): the target with one head's gate at 0, minus the target with every gate at 1.

    Copies of the text run as a batch, copy r with gates (L, B, H) zeroing head r only.
    """
    num_layers, num_heads = model.num_layers, model.num_heads
    dtype = _word_embeddings(model)[1].dtype
    values = []
    with torch.no_grad():
        for first in range(0, num_layers * num_heads, ABLATION_BATCH):
            heads = torch.arange(first, min(first + ABLATION_BATCH, num_layers * num_heads))
            gates = torch.ones(num_layers, len(heads), num_heads, dtype=dtype, device=input_ids.device)
            gates[heads // num_heads, torch.arange(len(heads)), heads % num_heads] = 0.0  # (L, B, H)
            ids = input_ids.expand(len(heads), -1)
            types = None if token_type_ids is None else token_type_ids.expand(len(heads), -1)
            out = run(model, ids, gates, types)
            values.append(objective.value(out.hidden, label).double().cpu())
    return (torch.cat(values).numpy() - full).reshape(num_layers, num_heads)


def extract_with_gradients(config, target: Target, ablate: bool = False):
    """The extraction stage with gradients (extract_attention.py --explain): one text at a time,
    attention and its gradients written together. `config` is an attnpipe.extract.runner.ExtractConfig;
    returns its ExtractResult."""
    from tqdm import tqdm

    from attnpipe.extract import runner as X
    from attnpipe import store
    from attnpipe.extract.loading import default_model_dir, load_model, resolve_device

    store.check_output_path(config.output)
    if not config.texts:
        raise AttnpipeError("no texts given: use --text or --texts-file")
    if config.output.suffix == ".json" and len(config.texts) > 1:
        raise AttnpipeError(
            f"a .json output holds one text, got {len(config.texts)}: write .h5 for several texts"
        )
    device = resolve_device(config.device)
    model_dir = config.model_dir if config.model_dir is not None else default_model_dir()
    model = load_model(model_dir, device, config.trust_remote_code)
    _word_embeddings(model)  # families without head gates / embedding map: a clear error first
    layers = X.parse_indices(config.layers, model.num_layers, "--layer", "layers")
    heads = X.parse_indices(config.heads, model.num_heads, "--heads", "heads")
    max_length = X._max_length(model, config.max_length)
    texts = list(config.texts)
    encoded = X._encode(model.tokenizer, [t.text for t in texts], max_length)

    def encode_other(text: str) -> torch.Tensor:
        ids = model.tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        return torch.tensor([ids], device=device)

    objective = build_objective(model, target, encode_other)
    use_types = encoded.token_type_ids is not None and model.weights.token_type is not None
    parity = hidden_parity = 0.0
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(store.open_writer(config.output, len(texts), config.dtype))
        bar = stack.enter_context(tqdm(total=len(texts), unit="text", file=sys.stderr,
                                       disable=None if config.progress is None else not config.progress))
        for i, text in enumerate(texts):
            input_ids = torch.tensor([encoded.input_ids[i]], device=device)  # (1, n)
            types = torch.tensor([encoded.token_type_ids[i]], device=device) if use_types else None
            result = text_gradients(model, objective, input_ids, types, ablate)
            n = input_ids.shape[1]
            if config.verify:
                batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
                if types is not None:
                    batch["token_type_ids"] = types
                with torch.no_grad():
                    ours = run(model, input_ids, None, types)
                    check = X._reference_diffs(model, batch, [n], ours.attentions, ours.hidden)
                parity, hidden_parity = max(parity, check.attention), max(hidden_parity, check.hidden)
                if check.attention > config.verify_tol:
                    raise AttnpipeError(
                        f"--verify failed: text {text.id!r} layer {check.where[1]} head {check.where[2]} "
                        f"differs from transformers eager by {check.attention:.3g} (tolerance {config.verify_tol:g})"
                    )
            select = np.ix_(list(layers), list(heads))
            item = X.text_item(
                text, encoded, i, model.tokenizer,
                attention=np.ascontiguousarray(result.attention[select]),  # (L', H', n, n)
                attention_grad=np.ascontiguousarray(result.attention_grad[select]),
                head_gate_grad=result.head_gate_grad,
                token_grad_input=result.token_grad_input,
                head_ablation=result.head_ablation,
                gradient_target_value=result.target_value,
                gradient_target_label=result.target_label,
            )
            writer.write(i, item)
            bar.update(1)
        provenance = X.run_provenance(
            dtype=config.dtype, verify=config.verify, parity=parity, hidden_parity=hidden_parity,
            model=str(model_dir), model_type=model.model_type, weights_sha256=model.weights_sha256,
            weight_files=model.weight_files, num_layers=model.num_layers, num_heads=model.num_heads,
            layers=layers, heads=heads, max_length=max_length, trust_remote_code=config.trust_remote_code,
            gradient_target=target.spec,
        )
        writer.finish(provenance)
    lengths = [len(ids) for ids in encoded.input_ids]
    return X.ExtractResult(
        output=config.output, num_texts=len(texts), num_tokens=sum(lengths), layers=layers, heads=heads,
        truncated_ids=tuple(t.id for t, full, n in zip(texts, encoded.untruncated_lengths, lengths) if full > n),
        max_length=max_length,
        parity_max_abs_diff=parity if config.verify else None,
        parity_hidden_max_abs_diff=hidden_parity if config.verify else None,
    )
