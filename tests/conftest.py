"""Shared fixtures: tiny random models saved like a user's checkpoint, the packaged MiniLM,
and a helper that runs the scripts as a user types them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_config(model_type: str):
    """A 2-3 layer, 4-head config of each supported family.

    initializer_range is raised from 0.02 to 0.5 so that attention is far from uniform:
    with near-uniform rows a wrong mask or scale could still pass the parity test.
    """
    import transformers as T

    common = dict(vocab_size=120, max_position_embeddings=64, initializer_range=0.5)
    bert_like = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    configs = {
        "bert": lambda: T.BertConfig(**common, **bert_like),
        "roberta": lambda: T.RobertaConfig(**common, **bert_like, pad_token_id=1),
        "xlm-roberta": lambda: T.XLMRobertaConfig(**common, **bert_like, pad_token_id=1),
        "electra": lambda: T.ElectraConfig(**common, **bert_like, embedding_size=16),
        "distilbert": lambda: T.DistilBertConfig(**common, dim=32, n_layers=2, n_heads=4, hidden_dim=37),
        "albert": lambda: T.AlbertConfig(**common, **{**bert_like, "num_hidden_layers": 3}, embedding_size=16),
        "gpt2": lambda: T.GPT2Config(vocab_size=120, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     initializer_range=0.5),
        # GQA: 4 query heads share 2 key/value heads.
        "llama": lambda: T.LlamaConfig(**common, **bert_like, num_key_value_heads=2),
        # A sliding window shorter than the test texts, so the window mask is exercised.
        "mistral": lambda: T.MistralConfig(**common, **bert_like, num_key_value_heads=2, sliding_window=4),
        "qwen2": lambda: T.Qwen2Config(**common, **bert_like, num_key_value_heads=1,
                                       use_sliding_window=True, sliding_window=5, max_window_layers=1),
        # Not a native family: extracted only with --method hf (tests/test_vision_torch_cli.py).
        "deberta-v2": lambda: T.DebertaV2Config(**common, **bert_like),
    }
    return configs[model_type]()


def save_tiny_model(model_type: str, folder: Path, seed: int = 0) -> Path:
    """Build a random-initialised model with a small word-level tokenizer and save it to `folder`."""
    import torch
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    torch.manual_seed(seed)
    config = tiny_config(model_type)
    model = T.AutoModel.from_config(config)
    model.save_pretrained(folder)

    # A word-level vocabulary over the tiny id range, with the family's own special tokens.
    if model_type in ("roberta", "xlm-roberta"):
        specials = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
        cls, sep, pad, unk, mask = "<s>", "</s>", "<pad>", "<unk>", "<mask>"
    else:
        specials = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
        cls, sep, pad, unk, mask = "[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"
    words = "the a cat dog sat on mat and ran fast slow red blue big small it was is , . ! ?".split()
    vocab = {**specials, **{w: i + len(specials) for i, w in enumerate(words)}}
    vocab.update({f"w{i}": i for i in range(len(vocab), config.vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B {sep}",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])],
    )
    fast = T.PreTrainedTokenizerFast(
        tokenizer_object=tok, cls_token=cls, sep_token=sep, pad_token=pad, unk_token=unk,
        mask_token=mask, model_max_length=config.max_position_embeddings - 2,
    )
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: tiny_model_dir("roberta") -> folder of a saved tiny random RoBERTa (cached)."""
    cache: dict[str, Path] = {}

    def make(model_type: str) -> Path:
        if model_type not in cache:
            cache[model_type] = save_tiny_model(model_type, tmp_path_factory.mktemp(model_type))
        return cache[model_type]

    return make


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from attnpipe.extract.loading import default_model_dir

    return default_model_dir()


def run_script(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run one of the top-level scripts as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        capture_output=True, text=True, cwd=cwd or ROOT, timeout=600,
    )


def save_tiny_vit(folder: Path, seed: int = 0) -> Path:
    """A 2-layer, 4-head random ViT on 32x32 images (4x4 patches of 8 px) with its image processor.

    initializer_range is 0.2, not conftest's usual 0.5: at 0.5 the ViT's softmax rows saturate to
    near one-hot, where the last-bit rounding difference between the patch Conv2d (transformers)
    and our equivalent matmul is amplified to ~1e-5; at 0.2 rows are still far from uniform
    (largest weight ~0.9 over 17 tokens) and the comparison is at float32 rounding (~1e-6).
    """
    import torch
    import transformers as T

    torch.manual_seed(seed)
    config = T.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=37, initializer_range=0.2)
    T.ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    # Resizes the whole image to 32x32 (no crop) and normalises; PIL backend, no torchvision.
    T.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def write_test_images(folder: Path, sizes=((40, 60), (64, 64), (30, 20))) -> list[Path]:
    """Deterministic RGB images (height, width) with structure: a gradient plus noise."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(sizes):
        ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
        pixels = np.clip(0.6 * ramp + 0.4 * rng.random((h, w, 3)) * 255, 0, 255).astype("uint8")
        paths.append(folder / f"img{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    return save_tiny_vit(tmp_path_factory.mktemp("vit"))
