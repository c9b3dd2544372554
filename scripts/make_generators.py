#!/usr/bin/env python3
"""Train two tiny generating models on a toy language, for the README's generation figures.

No translation model or GPT can be downloaded here, and random tiny models generate noise; these
two learn in a minute on CPU what makes the figures readable:

* `translator/`: a MarianMT model (2 + 2 layers) that translates a toy English into a toy French
  word by word, with French's adjective-after-noun order ("the red cat sleeps" -> "le chat rouge
  dort"), so its cross-attention should be near-diagonal with one crossing per adjective;
* `lm/`: a GPT-2 (2 layers) trained on the toy English, which continues a prompt.

Each folder is a transformers checkpoint with its word-level tokenizer, loaded like any user's.

Example:
    python scripts/make_generators.py --out-dir results/generators
    python extract_attention.py --model_dir results/generators/translator --input "the red cat sleeps on the mat" \\
        --output_file results/translation.json --verify
    python visualize_attention.py --input_file results/translation.json --mode seq2seq --output-dir results/plots
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

DETERMINERS = {"the": "le", "a": "un"}
NOUNS = {"cat": "chat", "dog": "chien", "bird": "oiseau", "mat": "tapis", "tree": "arbre", "house": "maison"}
ADJECTIVES = {"red": "rouge", "big": "grand", "small": "petit", "blue": "bleu", "old": "vieux"}
VERBS = {"sleeps": "dort", "sits": "est", "runs": "court", "waits": "attend"}
PREPOSITIONS = {"on": "sur", "under": "sous", "near": "près"}
SPECIALS = ["</s>", "<unk>"]  # Marian: eos 0, unk 1; <pad> is the last id


def noun_phrase(rng: random.Random) -> tuple[list[str], list[str]]:
    det, noun = rng.choice(list(DETERMINERS)), rng.choice(list(NOUNS))
    if rng.random() < 0.5:
        adj = rng.choice(list(ADJECTIVES))
        return [det, adj, noun], [DETERMINERS[det], NOUNS[noun], ADJECTIVES[adj]]  # adjective after the noun
    return [det, noun], [DETERMINERS[det], NOUNS[noun]]


def sentence(rng: random.Random) -> tuple[str, str]:
    en, fr = noun_phrase(rng)
    verb = rng.choice(list(VERBS))
    en, fr = en + [verb], fr + [VERBS[verb]]
    if rng.random() < 0.7:
        prep = rng.choice(list(PREPOSITIONS))
        en2, fr2 = noun_phrase(rng)
        en, fr = en + [prep] + en2, fr + [PREPOSITIONS[prep]] + fr2
    return " ".join(en), " ".join(fr)


def tokenizer(vocab: dict[str, int], template: str | None):
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if template is not None:
        tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("</s>", vocab["</s>"])])
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                     model_max_length=32)


def train(model, batches, steps: int, lr: float) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        loss = model(**batches(step)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0:
            print(f"  step {step}: loss {float(loss):.3f}", file=sys.stderr, flush=True)
    model.eval()
    return float(loss)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, required=True, help="folder for translator/ and lm/")
    ap.add_argument("--steps", type=int, default=2000, help="optimiser steps of the translator (default: 2000)")
    ap.add_argument("--lm-steps", type=int, default=2000, help="optimiser steps of the LM (default: 2000)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = ap.parse_args(argv)

    import transformers as T

    T.utils.logging.set_verbosity_error()
    T.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)  # models this small: more threads only wait on each other (10x slower on a busy machine)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    words = sorted({w for table in (DETERMINERS, NOUNS, ADJECTIVES, VERBS, PREPOSITIONS) for pair in table.items()
                    for w in pair})
    vocab = {token: i for i, token in enumerate(SPECIALS + words)}
    vocab["<pad>"] = len(vocab)
    pad = vocab["<pad>"]
    pairs = [sentence(rng) for _ in range(4000)]

    # The translator: source "... </s>", labels "... </s>", decoder start = pad (Marian's convention).
    tok = tokenizer(vocab, "$A </s>")
    config = T.MarianConfig(vocab_size=len(vocab), decoder_vocab_size=len(vocab), d_model=64, encoder_layers=2,
                            decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                            encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=32,
                            pad_token_id=pad, eos_token_id=0, decoder_start_token_id=pad, forced_eos_token_id=0,
                            dropout=0.0, share_encoder_decoder_embeddings=True)
    translator = T.MarianMTModel(config)

    def pair_batch(step: int) -> dict:
        chunk = [pairs[(step * 32 + i) % len(pairs)] for i in range(32)]
        enc = tok([en for en, _ in chunk], padding=True, return_tensors="pt")
        labels = tok([fr for _, fr in chunk], padding=True, return_tensors="pt")["input_ids"]
        return dict(**enc, labels=labels.masked_fill(labels == pad, -100))

    loss = train(translator, pair_batch, args.steps, 1e-3)
    folder = args.out_dir / "translator"
    translator.save_pretrained(folder)
    tok.save_pretrained(folder)
    print(f"translator: final loss {loss:.3f} -> {folder}", file=sys.stderr)

    # The LM: English sentences, each ended by </s> (added here; prompts get none).
    lm_tok = tokenizer(vocab, None)
    lm = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=len(vocab), n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=pad, resid_pdrop=0.0,
                                        embd_pdrop=0.0, attn_pdrop=0.0))

    def text_batch(step: int) -> dict:
        chunk = [pairs[(step * 32 + i) % len(pairs)][0] + " </s>" for i in range(32)]
        enc = lm_tok(chunk, padding=True, return_tensors="pt")
        return dict(**enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100))

    loss = train(lm, text_batch, args.lm_steps, 1e-3)
    folder = args.out_dir / "lm"
    lm.save_pretrained(folder)
    lm_tok.save_pretrained(folder)
    print(f"lm: final loss {loss:.3f} -> {folder}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
