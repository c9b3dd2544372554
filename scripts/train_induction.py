#!/usr/bin/env python3
"""Train a small GPT-2 on repeated random token sequences, saving checkpoints: an induction run.

The task of Olsson et al. 2022's small models, shrunk to a CPU: each training sequence is
BOS + prefix + A + A (A random, 10-40 tokens; prefix 0-10; attnpipe.extract.probes draws them),
and the loss counts the repeated A only, where the model can copy from context. A 2-layer,
4-head, 128-wide transformers GPT2LMHeadModel (learned positions, no dropout), AdamW, seeded.

Saves OUT_DIR/checkpoint-N/ (safetensors + tokenizer + trainer_state.json, like an HF Trainer run)
at step 0 and every --save-every steps, and evaluates each on the probe corpus: the mean loss on the
first A and on the repeated A of every probe text, and their difference, the in-context loss
(OUT_DIR/in_context_loss.csv: step, loss_first, loss_repeat, in_context_loss). The folder appears
complete or not at all.

    python scripts/train_induction.py --tokenizer data/probes/tokenizer \
        --probe-corpus data/probes/induction.jsonl --steps 1500 --save-every 250 --out-dir models/run
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's attnpipe (not pip-installed)

from attnpipe.errors import AttnpipeError, run_cli  # noqa: E402
from attnpipe.extract.probes import ProbeSpec, draw_sequence, usable_vocab  # noqa: E402

IGNORE = -100  # cross_entropy's ignore_index: positions whose loss does not count


def batch(rng: np.random.Generator, vocab: np.ndarray, spec: ProbeSpec, size: int, bos: int, pad: int):
    """(input_ids, attention_mask, labels), each (size, T): labels only on the repeated A."""
    rows = [draw_sequence(rng, vocab, spec) for _ in range(size)]
    width = 1 + max(len(ids) for ids, _, _ in rows)
    input_ids = torch.full((size, width), pad, dtype=torch.long)
    labels = torch.full((size, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((size, width), dtype=torch.long)
    for r, (ids, prefix, length) in enumerate(rows):
        seq = torch.as_tensor(np.concatenate([[bos], ids]))
        input_ids[r, : len(seq)] = seq
        mask[r, : len(seq)] = 1
        repeat = 1 + prefix + length  # first position of the second A
        labels[r, repeat: len(seq)] = seq[repeat:]
    return input_ids, mask, labels


@torch.no_grad()
def probe_losses(model, tokenizer, probes: list[dict]) -> dict[str, float]:
    """Mean token loss on the first A and on the repeated A of each probe text, averaged over texts."""
    model.eval()
    first, repeat = [], []
    for record in probes:
        ids = torch.tensor([tokenizer(record["text"])["input_ids"]])  # (1, T), BOS first
        logits = model(input_ids=ids).logits[0, :-1]  # (T-1, V): position t predicts token t+1
        losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")  # (T-1,)
        start = 1 + record["prefix"]  # the first A's first token, as a predicted position
        split = start + record["length"]
        first.append(losses[start - 1: split - 1].mean().item())
        repeat.append(losses[split - 1:].mean().item())
    model.train()
    loss_first, loss_repeat = float(np.mean(first)), float(np.mean(repeat))
    return {"loss_first": loss_first, "loss_repeat": loss_repeat, "in_context_loss": loss_repeat - loss_first}


def train(tokenizer_dir: Path, probe_corpus: Path, out: Path, steps: int, save_every: int, seed: int,
          lr: float, batch_size: int, layers: int, heads: int, width: int) -> list[dict]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    probes = [json.loads(line) for line in probe_corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not probes or any(not {"text", "prefix", "length"} <= set(p) for p in probes):
        raise AttnpipeError(f"{probe_corpus} is not a probe corpus (scripts/make_probe_corpus.py): every "
                            "line needs text, prefix and length")
    spec = ProbeSpec()  # the training distribution: A 10-40 tokens, prefix 0-10
    # learned positions for the longest sequence, BOS included: training's or a probe text's
    longest = max(1 + spec.max_prefix + 2 * spec.max_length,
                  max(len(tokenizer(p["text"])["input_ids"]) for p in probes))
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer), n_positions=longest, n_embd=width, n_layer=layers, n_head=heads,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # no dropout: a deterministic, small run
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = transformers.GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    vocab = usable_vocab(tokenizer)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    log, started = [], time.perf_counter()

    def save(step: int) -> None:
        row = {"step": step, **probe_losses(model, tokenizer, probes)}
        folder = tmp / f"checkpoint-{step}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, **row}, indent=1))
        log.append(row)
        print(f"step {step}: loss first A {row['loss_first']:.3f}, repeated A {row['loss_repeat']:.3f}, "
              f"in-context {row['in_context_loss']:+.3f} ({time.perf_counter() - started:.0f} s)", flush=True)

    model.train()
    save(0)
    for step in range(1, steps + 1):
        input_ids, mask, labels = batch(rng, vocab, spec, batch_size, tokenizer.bos_token_id, tokenizer.pad_token_id)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % save_every == 0 or step == steps:
            save(step)
    with open(tmp / "in_context_loss.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(log[0]))
        writer.writeheader()
        writer.writerows(log)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)  # the run appears complete or not at all
    return log


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--tokenizer", type=Path, required=True, metavar="DIR",
                    help="tokenizer folder (scripts/make_probe_corpus.py --new-tokenizer writes one)")
    ap.add_argument("--probe-corpus", type=Path, required=True, metavar="JSONL",
                    help="probe corpus whose in-context loss is measured at every checkpoint")
    ap.add_argument("--out-dir", type=Path, required=True, metavar="DIR", help="the run folder (replaced)")
    ap.add_argument("--steps", type=int, default=1500, help="optimizer steps (default: 1500)")
    ap.add_argument("--save-every", type=int, default=250, metavar="N",
                    help="save a checkpoint every N steps, and at step 0 and the last (default: 250)")
    ap.add_argument("--seed", type=int, default=0, help="seed of weights and training data (default: 0)")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    ap.add_argument("--batch-size", type=int, default=32, help="sequences per step (default: 32)")
    ap.add_argument("--layers", type=int, default=2, help="transformer blocks (default: 2)")
    ap.add_argument("--heads", type=int, default=4, help="attention heads per block (default: 4)")
    ap.add_argument("--width", type=int, default=128, help="hidden size (default: 128)")
    args = ap.parse_args(argv)
    for flag, value in (("--steps", args.steps), ("--save-every", args.save_every), ("--batch-size", args.batch_size)):
        if value < 1:
            raise AttnpipeError(f"{flag} must be at least 1, got {value}")
    if args.width % args.heads:
        raise AttnpipeError(f"--width {args.width} is not a multiple of --heads {args.heads}")
    train(args.tokenizer, args.probe_corpus, args.out_dir, args.steps, args.save_every, args.seed,
          args.lr, args.batch_size, args.layers, args.heads, args.width)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
