"""BERT-like encoders: BERT (MiniLM is one), RoBERTa / XLM-RoBERTa, ELECTRA, DistilBERT, ALBERT.

All of them are post-norm encoders with the same layer:

    a = LayerNorm(x + W_o · attention(x))          attention sub-layer
    y = LayerNorm(a + W_2 · act(W_1 · a))          feed-forward sub-layer

They differ only in their embeddings and in where the weights live, so this file holds one
weight map per model type (`_map_*`) and a single forward pass (`forward`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from attnpipe.models.activations import activation

from attnpipe.attention import attention_probs, head_context, merge_heads, padding_mask, split_heads
from attnpipe.models.parts import (
    LayerNorm, Linear, OnLayer, Output, Packing, empty_attentions, hand_over, last_layer, layer_gates,
    layer_norm, linear,
)

MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "albert")
INPUT_KIND = "text"
CAUSAL = False
KINDS = ("self",)
WORD_EMBEDDINGS = "word"  # Weights.word: (vocab, E), before token types, positions and the embedding norm


@dataclass(frozen=True)
class Layer:
    query: Linear
    key: Linear
    value: Linear
    out: Linear
    attn_norm: LayerNorm
    ff_in: Linear
    ff_out: Linear
    ff_norm: LayerNorm
    act: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Weights:
    word: torch.Tensor  # (vocab, E)
    position: torch.Tensor  # (max_positions, E)
    token_type: torch.Tensor | None  # (types, E); DistilBERT has none
    emb_norm: LayerNorm
    emb_project: Linear | None  # E -> hidden, when the embedding size differs (ELECTRA, ALBERT)
    layers: tuple[Layer, ...]  # ALBERT repeats the same Layer objects: its layers share weights
    num_heads: int
    position_pad_id: int | None  # RoBERTa counts positions from pad_token_id + 1

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def _embeddings(emb, project=None, position_pad_id=None, **kw) -> dict:
    token_type = getattr(emb, "token_type_embeddings", None)
    return dict(
        word=emb.word_embeddings.weight.detach(),
        position=emb.position_embeddings.weight.detach(),
        token_type=None if token_type is None else token_type.weight.detach(),
        emb_norm=layer_norm(emb.LayerNorm),
        emb_project=None if project is None else linear(project),
        position_pad_id=position_pad_id,
        **kw,
    )


def _bert_layer(layer, act) -> Layer:
    att = layer.attention
    return Layer(
        query=linear(att.self.query),
        key=linear(att.self.key),
        value=linear(att.self.value),
        out=linear(att.output.dense),
        attn_norm=layer_norm(att.output.LayerNorm),
        ff_in=linear(layer.intermediate.dense),
        ff_out=linear(layer.output.dense),
        ff_norm=layer_norm(layer.output.LayerNorm),
        act=act,
    )


def _map_bert(model) -> Weights:
    """BERT, RoBERTa, XLM-RoBERTa and ELECTRA share module names."""
    config = model.config
    act = activation(config.hidden_act)
    # RoBERTa-style models number positions from pad_token_id + 1 (create_position_ids_from_input_ids).
    pad_id = config.pad_token_id if config.model_type in ("roberta", "xlm-roberta") else None
    return Weights(
        **_embeddings(
            model.embeddings,
            project=getattr(model, "embeddings_project", None),  # ELECTRA with embedding_size != hidden
            position_pad_id=pad_id,
        ),
        layers=tuple(_bert_layer(layer, act) for layer in model.encoder.layer),
        num_heads=config.num_attention_heads,
    )


def _map_distilbert(model) -> Weights:
    config = model.config
    act = activation(config.activation)
    layers = tuple(
        Layer(
            query=linear(layer.attention.q_lin),
            key=linear(layer.attention.k_lin),
            value=linear(layer.attention.v_lin),
            out=linear(layer.attention.out_lin),
            attn_norm=layer_norm(layer.sa_layer_norm),
            ff_in=linear(layer.ffn.lin1),
            ff_out=linear(layer.ffn.lin2),
            ff_norm=layer_norm(layer.output_layer_norm),
            act=act,
        )
        for layer in model.transformer.layer
    )
    return Weights(**_embeddings(model.embeddings), layers=layers, num_heads=config.n_heads)


def _map_albert(model) -> Weights:
    config = model.config
    act = activation(config.hidden_act)
    groups = [
        [
            Layer(
                query=linear(inner.attention.query),
                key=linear(inner.attention.key),
                value=linear(inner.attention.value),
                out=linear(inner.attention.dense),
                attn_norm=layer_norm(inner.attention.LayerNorm),
                ff_in=linear(inner.ffn),
                ff_out=linear(inner.ffn_output),
                ff_norm=layer_norm(inner.full_layer_layer_norm),
                act=act,
            )
            for inner in group.albert_layers
        ]
        for group in model.encoder.albert_layer_groups
    ]
    # ALBERT shares weights: layer i runs group i // (layers per group), each of its inner layers
    # once (AlbertTransformer.forward). With the default single group every layer is the same one.
    per_group = config.num_hidden_layers // config.num_hidden_groups
    layers = tuple(
        inner for i in range(config.num_hidden_layers) for inner in groups[i // per_group]
    )
    return Weights(
        **_embeddings(model.embeddings, project=model.encoder.embedding_hidden_mapping_in),
        layers=layers,
        num_heads=config.num_attention_heads,
    )


_MAPS = {
    "bert": _map_bert,
    "roberta": _map_bert,
    "xlm-roberta": _map_bert,
    "electra": _map_bert,
    "distilbert": _map_distilbert,
    "albert": _map_albert,
}


def load_weights(model) -> Weights:
    """Read the weights of a transformers encoder (base model, no task head) into `Weights`."""
    return _MAPS[model.config.model_type](model)


# ----------------------------------------------------------------------------- straight from a state dict
# The direct loader (attnpipe.extract.loading) reads config.json and the weights file itself and
# never imports transformers' modeling code. What transformers' AutoModel would build for the
# config is written out below; tests/test_direct_loading.py checks it against
# AutoModel.from_config(config).state_dict() for every fixture config, so a drift is caught.

DIRECT_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert")  # ALBERT: transformers' loader
POOLER = "pooler."  # after every attention: a checkpoint may lack it (loading.AFTER_ATTENTION)
# Buffers old checkpoints saved and transformers drops on loading (BertEmbeddings' position_ids is
# non-persistent since transformers 4.31): never parameters, never read.
IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids")
_DISTILBERT_EPS = 1e-12  # DistilBERT's LayerNorms hard-code eps=1e-12 (modeling_distilbert.py)

# Config entries that change which modules transformers builds: the direct loader only takes the
# values it describes (a missing entry: transformers' default, named here), else transformers loads.
_PLAIN = {"is_decoder": False, "add_cross_attention": False, "position_embedding_type": "absolute"}
_BERT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_act")
_DISTILBERT_FIELDS = ("dim", "n_layers", "n_heads", "hidden_dim", "vocab_size", "max_position_embeddings",
                      "activation")


def _fields(config: Mapping, names: tuple[str, ...]) -> bool:
    return all(isinstance(config.get(name), (int, float, str)) and not isinstance(config.get(name), bool)
               for name in names)


def expected_parameters(config: Mapping) -> dict[str, tuple[int, ...]] | None:
    """Name -> shape of every parameter transformers' AutoModel makes for `config` (config.json as
    a dict), pooler included; None when the config asks for something not described here."""
    model_type = config.get("model_type")
    if model_type == "distilbert":
        if not _fields(config, _DISTILBERT_FIELDS) or config.get("sinusoidal_pos_embds", False):
            return None
        dim, hidden = config["dim"], config["hidden_dim"]
        shapes = {"embeddings.word_embeddings.weight": (config["vocab_size"], dim),
                  "embeddings.position_embeddings.weight": (config["max_position_embeddings"], dim),
                  "embeddings.LayerNorm.weight": (dim,), "embeddings.LayerNorm.bias": (dim,)}
        for i in range(config["n_layers"]):
            p = f"transformer.layer.{i}."
            for name in ("q_lin", "k_lin", "v_lin", "out_lin"):
                shapes |= {f"{p}attention.{name}.weight": (dim, dim), f"{p}attention.{name}.bias": (dim,)}
            for name in ("sa_layer_norm", "output_layer_norm"):
                shapes |= {f"{p}{name}.weight": (dim,), f"{p}{name}.bias": (dim,)}
            shapes |= {f"{p}ffn.lin1.weight": (hidden, dim), f"{p}ffn.lin1.bias": (hidden,),
                       f"{p}ffn.lin2.weight": (dim, hidden), f"{p}ffn.lin2.bias": (dim,)}
        return shapes
    if model_type not in ("bert", "roberta", "xlm-roberta", "electra") or not _fields(config, _BERT_FIELDS):
        return None
    if any(config.get(key, default) != default for key, default in _PLAIN.items()):
        return None
    if model_type in ("roberta", "xlm-roberta") and not isinstance(config.get("pad_token_id"), int):
        return None
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    width = hidden
    if model_type == "electra":
        if not isinstance(config.get("embedding_size"), int):
            return None
        width = config["embedding_size"]
    shapes = {"embeddings.word_embeddings.weight": (config["vocab_size"], width),
              "embeddings.position_embeddings.weight": (config["max_position_embeddings"], width),
              "embeddings.token_type_embeddings.weight": (config["type_vocab_size"], width),
              "embeddings.LayerNorm.weight": (width,), "embeddings.LayerNorm.bias": (width,)}
    if width != hidden:  # ELECTRA projects its smaller embeddings up to the hidden size
        shapes |= {"embeddings_project.weight": (hidden, width), "embeddings_project.bias": (hidden,)}
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes |= {f"{p}{name}.weight": (hidden, hidden), f"{p}{name}.bias": (hidden,)}
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes |= {f"{p}{name}.weight": (hidden,), f"{p}{name}.bias": (hidden,)}
        shapes |= {f"{p}intermediate.dense.weight": (inner, hidden), f"{p}intermediate.dense.bias": (inner,),
                   f"{p}output.dense.weight": (hidden, inner), f"{p}output.dense.bias": (hidden,)}
    if model_type != "electra":  # ElectraModel has no pooler
        shapes |= {"pooler.dense.weight": (hidden, hidden), "pooler.dense.bias": (hidden,)}
    return shapes


def weights_from_state(config: Mapping, state: Mapping[str, torch.Tensor]) -> Weights:
    """`Weights` from a state dict that holds every parameter of expected_parameters(config)
    (the pooler aside), already in the compute dtype and on the device; the same tensors
    load_weights reads from the transformers model."""
    def lin(name: str) -> Linear:
        return Linear(state[f"{name}.weight"], state[f"{name}.bias"])

    def norm(name: str, eps: float) -> LayerNorm:
        return LayerNorm(state[f"{name}.weight"], state[f"{name}.bias"], eps)

    if config["model_type"] == "distilbert":
        act, eps = activation(config["activation"]), _DISTILBERT_EPS
        layers = tuple(
            Layer(query=lin(f"{p}attention.q_lin"), key=lin(f"{p}attention.k_lin"), value=lin(f"{p}attention.v_lin"),
                  out=lin(f"{p}attention.out_lin"), attn_norm=norm(f"{p}sa_layer_norm", eps),
                  ff_in=lin(f"{p}ffn.lin1"), ff_out=lin(f"{p}ffn.lin2"), ff_norm=norm(f"{p}output_layer_norm", eps),
                  act=act)
            for p in (f"transformer.layer.{i}." for i in range(config["n_layers"]))
        )
        return Weights(word=state["embeddings.word_embeddings.weight"],
                       position=state["embeddings.position_embeddings.weight"], token_type=None,
                       emb_norm=norm("embeddings.LayerNorm", eps), emb_project=None, layers=layers,
                       num_heads=config["n_heads"], position_pad_id=None)
    act, eps = activation(config["hidden_act"]), float(config["layer_norm_eps"])
    layers = tuple(
        Layer(query=lin(f"{p}attention.self.query"), key=lin(f"{p}attention.self.key"),
              value=lin(f"{p}attention.self.value"), out=lin(f"{p}attention.output.dense"),
              attn_norm=norm(f"{p}attention.output.LayerNorm", eps), ff_in=lin(f"{p}intermediate.dense"),
              ff_out=lin(f"{p}output.dense"), ff_norm=norm(f"{p}output.LayerNorm", eps), act=act)
        for p in (f"encoder.layer.{i}." for i in range(config["num_hidden_layers"]))
    )
    # RoBERTa-style models number positions from pad_token_id + 1 (as _map_bert).
    pad_id = config["pad_token_id"] if config["model_type"] in ("roberta", "xlm-roberta") else None
    return Weights(word=state["embeddings.word_embeddings.weight"],
                   position=state["embeddings.position_embeddings.weight"],
                   token_type=state["embeddings.token_type_embeddings.weight"],
                   emb_norm=norm("embeddings.LayerNorm", eps),
                   emb_project=lin("embeddings_project") if "embeddings_project.weight" in state else None,
                   layers=layers, num_heads=config["num_attention_heads"], position_pad_id=pad_id)


def _position_ids(weights: Weights, input_ids: torch.Tensor) -> torch.Tensor:
    if weights.position_pad_id is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    # RoBERTa: real tokens get pad_id + 1, pad_id + 2, ...; padding keeps pad_id.
    real = (input_ids != weights.position_pad_id).long()
    return torch.cumsum(real, dim=1) * real + weights.position_pad_id


def embed(
    weights: Weights, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None
) -> torch.Tensor:
    """Token (+ token type) + position embeddings, normalised and projected: (B, T, hidden).

    Summed in transformers' order (word + type, then position): float addition is not
    associative, and the same order keeps our rounding identical to the reference.
    """
    x = F.embedding(input_ids, weights.word)
    if weights.token_type is not None:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = x + F.embedding(token_type_ids, weights.token_type)
    x = x + F.embedding(_position_ids(weights, input_ids), weights.position)
    x = weights.emb_norm(x)
    if weights.emb_project is not None:
        x = weights.emb_project(x)
    return x


def forward(
    weights: Weights,
    batch: Mapping[str, torch.Tensor],  # input_ids (B, T), attention_mask (B, T) [, token_type_ids (B, T)]
    *,
    keep_layers: Mapping[str, frozenset[int]] | None = None,
    head_gates: Mapping[str, torch.Tensor] | None = None,  # "self": (L, H) or (L, B, H) multipliers
    on_layer: OnLayer | None = None,
    hidden: bool = True,  # False: the attention only (the pass may stop after the last kept layer)
) -> Output:
    """Run the encoder; return the final hidden state and the attention of the kept layers.

    The token-wise parts run on the real tokens only (parts.Packing); attention sees (B, T).
    """
    attention_mask = batch["attention_mask"]  # (B, T), 1 = real token, 0 = padding
    packing = Packing.of(attention_mask)
    x = packing.pack(embed(weights, batch["input_ids"], batch.get("token_type_ids")))  # (N, hidden), real tokens
    mask = padding_mask(attention_mask, x.dtype)  # (B, 1, 1, K)
    attentions = empty_attentions(KINDS)
    last = last_layer(keep_layers, "self", weights.num_layers, hidden)
    for index, layer in enumerate(weights.layers[: last + 1]):
        q = split_heads(packing.unpack(layer.query(x)), weights.num_heads)  # (B, H, Q, D)
        k = split_heads(packing.unpack(layer.key(x)), weights.num_heads)  # (B, H, K, D)
        probs = attention_probs(q, k, 1.0 / math.sqrt(q.shape[-1]), mask)  # (B, H, Q, K)
        hand_over("self", index, probs, keep_layers, attentions, on_layer)
        if index == last and not hidden:  # the rest of the pass feeds only the hidden state
            return Output(hidden=None, attentions=attentions)
        v = split_heads(packing.unpack(layer.value(x)), weights.num_heads)  # (B, H, K, D)
        context = head_context(probs, v, layer_gates(head_gates, "self", index))  # (B, H, Q, D)
        context = packing.pack(merge_heads(context))  # (N, H·D)
        del probs  # free this layer's (B, H, T, T) before the next one is computed
        x = layer.attn_norm(x + layer.out(context))
        x = layer.ff_norm(x + layer.ff_out(layer.act(layer.ff_in(x))))
    return Output(hidden=packing.unpack(x), attentions=attentions)
