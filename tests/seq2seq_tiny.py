"""Tiny random encoder-decoder models (T5, BART, Marian) saved like a user's checkpoint.

Each variant gets a word-level tokenizer with its family's special tokens and layout
(T5 and Marian: `text </s>`; BART: `<s> text </s>`). Initialisers are raised well above the
defaults so that attention is far from uniform: with near-uniform rows a wrong scale, bias or
mask could still pass the parity test.
"""

from __future__ import annotations

from pathlib import Path

WORDS = "the a cat dog sat on mat and ran fast slow red blue big small it was is , . ! ?".split()
VOCAB = 120


def tiny_seq2seq_config(variant: str):
    """Encoder and decoder of different depths (2 and 3 layers), padded ids in range."""
    import transformers as T

    if variant in ("t5", "t5-gated", "mt5"):
        # 8 buckets up to distance 16: texts of ~12 tokens reach the log-spaced buckets too.
        # initializer_factor scales every T5 init (q/k by (d_model·d_kv)^-1/2, bias by d_model^-1/2).
        config_class = T.MT5Config if variant == "mt5" else T.T5Config
        return config_class(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=3,
            num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
            feed_forward_proj="relu" if variant == "t5" else "gated-gelu",  # mT5's default is gated
            initializer_factor=1.5, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )
    if variant == "bart":
        # Different head counts in encoder and decoder, and scale_embedding on (BART's default is off).
        return T.BartConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
            decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=29, max_position_embeddings=64,
            init_std=0.25, scale_embedding=True, pad_token_id=1, bos_token_id=0, eos_token_id=2,
            decoder_start_token_id=2, forced_eos_token_id=2,
        )
    if variant == "marian":
        return T.MarianConfig(
            vocab_size=VOCAB, decoder_vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=3,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37,
            max_position_embeddings=64, init_std=0.25, scale_embedding=True,
            pad_token_id=VOCAB - 1, eos_token_id=0, decoder_start_token_id=VOCAB - 1,
            forced_eos_token_id=0, share_encoder_decoder_embeddings=True,
        )
    raise KeyError(variant)


SPECIALS = {
    # family -> (special tokens and their ids, the template that wraps one text)
    "t5": ({"<pad>": 0, "</s>": 1, "<unk>": 2}, "$A </s>"),
    "bart": ({"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}, "<s> $A </s>"),
    "marian": ({"</s>": 0, "<unk>": 1, "<pad>": VOCAB - 1}, "$A </s>"),
}


def save_tiny_seq2seq(variant: str, folder: Path, seed: int = 0, lm_head: bool = False) -> Path:
    """Build a random-initialised model and a word-level tokenizer; save both to `folder`.

    With `lm_head` the ...ForConditionalGeneration model is saved (base weights + LM head); BART's
    and Marian's final_logits_bias is then drawn at random too, so a head that forgets it shows.
    """
    import torch
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    torch.manual_seed(seed)
    config = tiny_seq2seq_config(variant)
    if lm_head:
        model = T.AutoModelForSeq2SeqLM.from_config(config)
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.normal_()
        model.save_pretrained(folder)
    else:
        T.AutoModel.from_config(config).save_pretrained(folder)

    specials, template = SPECIALS[{"mt5": "t5"}.get(variant, variant.split("-")[0])]
    vocab = dict(specials)
    free = (i for i in range(VOCAB) if i not in specials.values())
    for word in WORDS:
        vocab[word] = next(free)
    vocab.update({f"w{i}": i for i in free})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    used = [t for t in ("<s>", "</s>") if t in template]
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in used],
    )
    extra = {"bos_token": "<s>", "mask_token": "<mask>"} if variant == "bart" else {}
    T.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
        model_max_length=60, **extra,
    ).save_pretrained(folder)
    return folder
