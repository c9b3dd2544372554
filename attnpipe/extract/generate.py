"""Generation before extraction: the model writes the text, then our pass shows how it attended.

Encoder-decoders (a --source without --target, or a pairs file without targets): transformers'
`generate` writes each target from its source; the pair then runs teacher-forced exactly like a
given target (attnpipe/extract/pairs.py), with the generated ids as the labels. Causal LMs
(`--generate N`): each text is continued by up to N tokens, and prompt + continuation is one
text of the ordinary text path (ContinuationInputs). Either way every stored matrix is computed
by attnpipe's own pass through the one runner, and --verify compares it with transformers eager
on the generated sequence, as for any other input.

Generation runs one input at a time, so what a text gets does not depend on what it is batched
with: greedy or beam search (deterministic), or sampling after `torch.manual_seed(seed)`, i.e.
each input's ids equal `model.generate(input_ids, max_new_tokens=N, num_beams=B, do_sample=S)`
on the checkpoint's ...ForCausalLM / ...ForConditionalGeneration (eager attention), called alone
after the same seed. The checkpoint's own generation_config.json (forced tokens, bad words, ...)
applies, as it does for `model.generate`, and is recorded in the file's `generation` provenance.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from attnpipe import store
from attnpipe.errors import AttnpipeError
from attnpipe.extract.batching import mask, pad
from attnpipe.extract.corpus import Text
from attnpipe.extract.inputs import Batch, encode, max_length

# The target length an encoder-decoder may generate when --max-new-tokens is not given: a
# sentence and more (transformers' own default, max_length 20, cuts ordinary sentences short).
DEFAULT_MAX_NEW_TOKENS = 64
GenerationKind = Literal["continuation", "target"]


@dataclass(frozen=True)
class GenerationSettings:
    """How the model generates: greedy (default), beam search (num_beams > 1) or sampling."""

    kind: GenerationKind  # continuation: causal LMs (--generate N); target: encoder-decoders
    max_new_tokens: int | None  # None (targets only): DEFAULT_MAX_NEW_TOKENS, at most the decoder's limit
    num_beams: int = 1
    do_sample: bool = False
    seed: int = 0  # with do_sample: torch.manual_seed(seed) before each input's generate

    def __post_init__(self) -> None:
        flag = "--generate" if self.kind == "continuation" else "--max-new-tokens"
        if self.max_new_tokens is None and self.kind == "continuation":
            raise AttnpipeError("--generate needs a number of tokens")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise AttnpipeError(f"{flag} must be at least 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise AttnpipeError(f"--num-beams must be at least 1, got {self.num_beams}")

    @property
    def strategy(self) -> str:
        return "sample" if self.do_sample else "beam" if self.num_beams > 1 else "greedy"

    def generate_kwargs(self) -> dict:
        """What `model.generate` is called with (over the checkpoint's generation_config)."""
        return dict(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=self.do_sample)

    def provenance(self, generation_config: dict) -> dict:
        return dict(kind=self.kind, strategy=self.strategy, max_new_tokens=self.max_new_tokens,
                    num_beams=self.num_beams, do_sample=self.do_sample,
                    seed=self.seed if self.do_sample else None, generation_config=generation_config)


class Generator:
    """The checkpoint's generation model (LM head included) beside the loaded base model."""

    def __init__(self, model, settings: GenerationSettings):
        import transformers

        family = model.family
        self.settings = settings
        self.device = model.device
        auto = transformers.AutoModelForCausalLM if family.CAUSAL else transformers.AutoModelForSeq2SeqLM
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # transformers' notes on generation defaults
                lm, info = auto.from_pretrained(
                    model.model_dir, dtype=torch.float32, attn_implementation="eager",
                    trust_remote_code=model.trust_remote_code, output_loading_info=True,
                    use_safetensors=any(name.endswith(".safetensors") for name in model.weight_files),
                )
        except (OSError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise AttnpipeError(f"could not load {model.model_dir}'s generation model: {first}") from err
        missing = sorted(key for key in info["missing_keys"] if "lm_head" in key)
        if missing:  # a base-model folder of an untied LM: transformers would generate with a random head
            raise AttnpipeError(
                f"generation needs the LM head's weights, but {model.model_dir} has none ({', '.join(missing)} "
                f"missing): save the ...For{'CausalLM' if family.CAUSAL else 'ConditionalGeneration'} model, "
                "not the base model"
            )
        self.lm = lm.to(self.device).eval()
        # transformers sizes T5's generation cache by the *encoder*'s depth (num_layers), which fails
        # when the decoder is deeper (num_decoder_layers): such a model gets a cache that grows with
        # the layers it is given. The same keys and values are cached, so the ids are the same.
        decoder_layers = getattr(lm.config, "num_decoder_layers", None)
        self.own_cache = decoder_layers is not None and decoder_layers != lm.config.num_layers
        config = self.lm.generation_config
        self.config = {k: v for k, v in config.to_diff_dict().items() if k != "transformers_version"}
        # A checkpoint without a pad token (GPT-2) pads with its end token, as generate itself does
        # (with a warning): set here so that nothing is printed. One input at a time never pads.
        self.pad_id = None
        if config.pad_token_id is None:
            eos = config.eos_token_id
            self.pad_id = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0

    def __call__(self, input_ids: list[int]) -> list[int]:
        """One input's ids -> the whole sequence generate returns (prompt + continuation for causal
        LMs; decoder start token + target for encoder-decoders)."""
        ids = torch.tensor([input_ids], dtype=torch.long, device=self.device)  # (1, n)
        extra = {} if self.pad_id is None else {"pad_token_id": self.pad_id}
        if self.own_cache:
            from transformers.cache_utils import DynamicCache, EncoderDecoderCache

            extra["past_key_values"] = EncoderDecoderCache(DynamicCache(), DynamicCache())
        if self.settings.do_sample:
            torch.manual_seed(self.settings.seed)  # each input alone: its sample does not depend on the others
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   **self.settings.generate_kwargs(), **extra)
        return out[0].tolist()

    def provenance(self) -> dict:
        return self.settings.provenance(self.config)


def generate_targets(model, sources: list[str], settings: GenerationSettings,
                     limit: int) -> tuple[list[list[int]], dict]:
    """Encoder-decoders: each source's generated target as label ids (the decoder start token
    that generate puts first is dropped: the labels are what the decoder predicts), and the
    generation provenance. `limit`: the run's max length, which the sources are truncated to."""
    if settings.max_new_tokens is None:
        settings = dataclasses.replace(settings, max_new_tokens=min(DEFAULT_MAX_NEW_TOKENS, limit))
    if settings.max_new_tokens > limit:
        raise AttnpipeError(f"--max-new-tokens {settings.max_new_tokens} is more than the decoder's "
                            f"{limit} positions")
    generator = Generator(model, settings)
    labels = []
    for source in sources:
        sequence = generator(encode(model.tokenizer, [source], limit).input_ids[0])
        labels.append(sequence[1:])  # sequence[0] is the decoder start token
    return labels, generator.provenance()


class ContinuationInputs:
    """Causal LMs with --generate N: each text (the prompt) continued by the model, then run as one
    text of prompt + continuation. Prompts are truncated to the model's limit minus N tokens."""

    label = "text"
    input_kind = "text"

    def __init__(self, texts: list[Text], model, requested_max_length: int | None, settings: GenerationSettings):
        if not model.family.CAUSAL:
            raise AttnpipeError(f"--generate continues texts with a causal language model; {model.model_dir} is "
                                f"a {model.model_type!r} model")
        self.texts = texts
        self.ids = [t.id for t in texts]
        self.tokenizer = model.tokenizer
        self.max_length = max_length(model, requested_max_length)
        prompt_limit = self.max_length - settings.max_new_tokens
        if prompt_limit < 1:
            raise AttnpipeError(f"--generate {settings.max_new_tokens} leaves no room for a prompt: the run "
                                f"takes at most {self.max_length} tokens (--max-length or the model's limit)")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        generator = Generator(model, settings)
        special = set(self.tokenizer.all_special_ids)
        self.items: list[store.TextAttention] = []
        for text in texts:
            encoded = encode(self.tokenizer, [text.text], prompt_limit)
            prompt = encoded.input_ids[0]
            if not prompt:
                raise AttnpipeError(f"text {text.id!r} has no tokens to continue")
            sequence = generator(prompt)
            if sequence[:len(prompt)] != prompt:
                raise AttnpipeError(f"generate changed the prompt of text {text.id!r}; cannot mark the continuation")
            continuation = sequence[len(prompt):]
            p, g = len(prompt), len(continuation)
            ids = prompt + continuation
            self.items.append(store.TextAttention(
                id=text.id,
                text=text.text,  # the prompt as given: the prompt tokens' offsets point into it
                tokens=tuple(self.tokenizer.convert_ids_to_tokens(ids)),
                token_ids=np.asarray(ids, dtype=np.int64),
                special_tokens_mask=np.asarray(
                    list(encoded.special_tokens_mask[0]) + [i in special for i in continuation], dtype=bool),
                offsets=np.concatenate([encoded.offsets[0], np.full((g, 2), -1, dtype=np.int64)]),  # not in `text`
                word_ids=np.concatenate([encoded.word_ids[0], np.full(g, -1, dtype=np.int64)]),
                truncated=encoded.untruncated_lengths[0] > p,
                num_tokens_untruncated=encoded.untruncated_lengths[0] + g,
                attention=None,
                generated=np.asarray([False] * p + [True] * g, dtype=bool),
                generated_text=self.tokenizer.decode(continuation, skip_special_tokens=True),
            ))
        self.widths = [item.num_tokens for item in self.items]
        self.generated_tokens = sum(int(item.generated.sum()) for item in self.items)
        self.generation = generator.provenance()

    def prepare(self, indices: list[int], device: torch.device) -> Batch:
        items = [self.items[i] for i in indices]
        lengths = [item.num_tokens for item in items]
        tensors = {"input_ids": pad([item.token_ids.tolist() for item in items], self.pad_id, device),
                   "attention_mask": mask(lengths, device)}
        return Batch(indices, tensors, items, {"self": (lengths, lengths)})
