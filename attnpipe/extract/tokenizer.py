"""A folder's tokenizer.json through the `tokenizers` library, without importing transformers.

`DirectTokenizer` answers the calls attnpipe.extract.inputs makes of a transformers fast tokenizer
(`__call__` with truncation, special-token masks, offsets and split special tokens; word_ids,
convert_ids_to_tokens, pad_token_id, model_max_length, the vocabulary and special tokens) with the
same results: tests/test_direct_loading.py compares ids, offsets, special masks and word ids with
transformers.AutoTokenizer on the demo corpus, hostile strings and every fixture tokenizer.
`direct_tokenizer(folder)` gives one only for the tokenizer classes those tests cover; anything
else (no tokenizer.json, another class, added tokens, a BOS/EOS setting) returns None and the
loader uses transformers.AutoTokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

# tokenizer_config.json classes whose transformers tokenizer is the tokenizer.json as saved, and
# whether each returns token_type_ids (its class's model_input_names in transformers 5).
DIRECT_CLASSES = {"BertTokenizer": True, "BertTokenizerFast": True, "ElectraTokenizer": True,
                  "ElectraTokenizerFast": True, "DistilBertTokenizer": False, "DistilBertTokenizerFast": False,
                  "PreTrainedTokenizerFast": False, "TokenizersBackend": False}
# transformers' BertTokenizer applies these tokenizer_config.json settings (defaults as there) to
# its normalizer: the direct path takes a tokenizer.json only when its BertNormalizer agrees.
_BERT_NORMALIZER = {"do_lower_case": ("lowercase", True), "strip_accents": ("strip_accents", None),
                    "tokenize_chinese_chars": ("handle_chinese_chars", True)}
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
VERY_LARGE_INTEGER = int(1e30)  # transformers' model_max_length when the folder sets none
# Settings that change how transformers builds or drives the tokenizer: any of them, and the
# loader leaves the tokenizer to transformers.
_UNCOVERED = ("add_bos_token", "add_eos_token", "add_prefix_space", "additional_special_tokens",
              "extra_special_tokens", "auto_map", "split_special_tokens", "truncation_side", "padding_side",
              "model_input_names", "clean_up_tokenization_spaces_", "legacy")


class Encoding(dict):
    """What a transformers tokenizer call returns, for what inputs.encode reads of it."""

    def __init__(self, encodings, fields: dict):
        super().__init__(fields)
        self.encodings = encodings

    def word_ids(self, i: int) -> list[int | None]:
        return self.encodings[i].word_ids


class DirectTokenizer:
    is_fast = True

    def __init__(self, tokenizer, specials: dict[str, str], model_max_length: int, token_types: bool):
        self._tokenizer = tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.encode_special_tokens = True
        self._specials = specials
        self._tokens: list[str | None] | None = None
        self.model_max_length = model_max_length
        self._token_types = token_types
        pad = specials.get("pad_token")
        self.pad_token_id = None if pad is None else tokenizer.token_to_id(pad)

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys(self._specials.values()))

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def convert_ids_to_tokens(self, ids) -> list[str]:
        if self._tokens is None:  # every id's token once: a list lookup per token instead of a call
            self._tokens = [self._tokenizer.id_to_token(i) for i in range(self._tokenizer.get_vocab_size(True))]
        tokens, known = self._tokens, len(self._tokens)
        return [tokens[i] if 0 <= i < known else self._tokenizer.id_to_token(int(i)) for i in ids]

    def __call__(self, texts, *, truncation: bool = False, max_length: int | None = None,
                 return_special_tokens_mask: bool = False, return_offsets_mapping: bool = False,
                 split_special_tokens: bool = True) -> Encoding:
        if not split_special_tokens:
            raise ValueError("DirectTokenizer always splits special tokens typed in a text")
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        if truncation:  # transformers' defaults: longest_first, stride 0, cut on the right
            self._tokenizer.enable_truncation(max_length, stride=0, strategy="longest_first", direction="right")
        else:
            self._tokenizer.no_truncation()
        encodings = self._tokenizer.encode_batch(batch, add_special_tokens=True)
        fields = {"input_ids": [e.ids for e in encodings]}
        if self._token_types:
            fields["token_type_ids"] = [e.type_ids for e in encodings]
        fields["attention_mask"] = [e.attention_mask for e in encodings]
        if return_special_tokens_mask:
            fields["special_tokens_mask"] = [e.special_tokens_mask for e in encodings]
        if return_offsets_mapping:
            fields["offset_mapping"] = [e.offsets for e in encodings]
        if single:
            fields = {key: value[0] for key, value in fields.items()}
        return Encoding(encodings, fields)


def direct_tokenizer(model_dir: Path) -> DirectTokenizer | None:
    """The folder's tokenizer.json as a DirectTokenizer, or None when transformers must build it."""
    path, config_path = model_dir / "tokenizer.json", model_dir / "tokenizer_config.json"
    if not path.is_file() or not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(config, dict) or config.get("tokenizer_class") not in DIRECT_CLASSES:
        return None
    if any(key in config for key in _UNCOVERED) or (model_dir / "added_tokens.json").exists():
        return None
    token_types = DIRECT_CLASSES[config["tokenizer_class"]]
    if token_types:  # the BERT classes: the normalizer must be the one their settings make
        normalizer = saved.get("normalizer") or {}
        if normalizer.get("type") != "BertNormalizer" or any(
                normalizer.get(key) != config.get(name, default) for name, (key, default) in _BERT_NORMALIZER.items()):
            return None
    specials_map = model_dir / "special_tokens_map.json"
    specials = {}
    try:
        extra = json.loads(specials_map.read_text(encoding="utf-8")) if specials_map.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    for name in SPECIAL_NAMES:
        value = config.get(name, extra.get(name))
        if isinstance(value, dict):
            value = value.get("content")
        if value is not None and not isinstance(value, str):
            return None
        if value is not None:
            specials[name] = value
    added = saved.get("added_tokens") or []
    # Every added token must be one of the named special tokens, marked special: anything else
    # (a user-added word, a normalised added token) is transformers' to handle.
    if any(not t.get("special") or t.get("content") not in specials.values() for t in added):
        return None
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception:  # noqa: BLE001 - the tokenizers library raises plain Exception on a bad file
        return None
    if any(tokenizer.token_to_id(token) is None for token in specials.values()):
        return None
    limit = config.get("model_max_length")
    limit = limit if isinstance(limit, int) and not isinstance(limit, bool) else VERY_LARGE_INTEGER
    return DirectTokenizer(tokenizer, specials, limit, token_types)
