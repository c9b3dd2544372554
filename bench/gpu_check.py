#!/usr/bin/env python3
"""GPU check for corpus-scale extraction (issue 22): attnpipe vs transformers eager on one GPU.

MiniLM (the packaged all-MiniLM-L6-v2) and a random GPT-2-small-sized model (12 layers, 12 heads,
768 wide), each on the same texts: attnpipe to HDF5 schema version 3 in float16 and uint8
(`--device cuda`, in this process, after one warm-up run) against transformers' eager forward
with attentions, cropped to real tokens and copied to the host (what storing needs), on the same
GPU. Rounds interleaved; medians and ratios printed, plus the parity of the stored attention
with transformers' (float16 storage: within 1e-3). Prepared for a machine with a CUDA GPU; it
refuses to run without one.

    python bench/gpu_check.py                 # 512 demo texts, 3 rounds (a few minutes on one GPU)
    python bench/gpu_check.py --texts 64 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def hf_crop(model, tokenizer, texts: list[str], batch_size: int, max_length: int, device) -> None:
    import torch

    from attnpipe.extract.batching import length_sorted_batches

    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    with torch.inference_mode():
        for batch in length_sorted_batches(lengths, batch_size):
            enc = tokenizer([texts[i] for i in batch], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt").to(device)
            attentions = torch.stack(model(**enc, output_attentions=True).attentions, dim=1)  # (B, L, H, T, T)
            for row, i in enumerate(batch):
                n = lengths[i]
                attentions[row, :, :, :n, :n].to(torch.float16).cpu()
    torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=512, help="demo texts per run (cycled; default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--max-length", type=int, default=128, help="truncate to N tokens (default 128)")
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    import transformers
    from bench_extract import corpus_of, save_gpt2_small

    from attnpipe import store
    from attnpipe.extract import corpus
    from attnpipe.extract.loading import default_model_dir
    from attnpipe.extract.runner import ExtractConfig, extract

    if not torch.cuda.is_available():
        print("error: no CUDA GPU here; this check runs on a GPU machine", file=sys.stderr)
        return 2
    transformers.utils.logging.set_verbosity_error()
    device = torch.device("cuda")
    texts = list(corpus_of(list(corpus.read_texts_file(ROOT / "data" / "demo_corpus.jsonl")), args.texts))
    print(f"{torch.cuda.get_device_name(0)}; {len(texts)} demo texts, max length {args.max_length}; "
          f"medians of {args.repeats} interleaved round(s); ratio = HF time / attnpipe time")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gpt2 = save_gpt2_small(tmp / "gpt2", positions=args.max_length, layers=12)
        gpt2_texts = [t.__class__(t.id, " ".join(f"w{(i * 7 + k) % 1000}" for k in range(len(t.text.split()))))
                      for i, t in enumerate(texts)]
        for name, folder, items in (("MiniLM", default_model_dir(), texts), ("GPT-2-small random", gpt2, gpt2_texts)):
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
            eager = transformers.AutoModel.from_pretrained(folder, attn_implementation="eager").eval().to(device)

            def ours(dtype: str, folder=folder, items=items) -> float:
                start = time.perf_counter()
                extract(ExtractConfig(texts=tuple(items), output=tmp / f"{dtype}.h5", model_dir=folder,
                                      device="cuda", dtype=dtype, max_length=args.max_length, progress=False,
                                      schema_version=3))
                return time.perf_counter() - start

            def hf(eager=eager, tokenizer=tokenizer, items=items) -> float:
                start = time.perf_counter()
                hf_crop(eager, tokenizer, [t.text for t in items], 32, args.max_length, device)
                return time.perf_counter() - start

            runs = {"float16": lambda: ours("float16"), "uint8": lambda: ours("uint8"), "hf": hf}
            for run in runs.values():  # warm-up: CUDA context, kernels, caches
                run()
            times = {key: [] for key in runs}
            for _ in range(args.repeats):
                for key, run in runs.items():
                    times[key].append(run())
            print(f"\n{name}:")
            for key in runs:
                print(f"  {key:8s} median {statistics.median(times[key]):7.2f} s")
            for dtype in ("float16", "uint8"):
                ratio = statistics.median(h / o for o, h in zip(times[dtype], times["hf"], strict=True))
                print(f"  attnpipe {dtype} vs HF eager + crop: {ratio:.2f}")
            with store.open_attention(tmp / "float16.h5") as f, torch.inference_mode():
                worst = 0.0
                for i in range(min(8, len(f))):
                    item = f[i]
                    enc = tokenizer([item.text], truncation=True, max_length=args.max_length,
                                    return_tensors="pt").to(device)
                    ref = torch.stack(eager(**enc, output_attentions=True).attentions)[:, 0].float().cpu().numpy()
                    worst = max(worst, float(np.abs(ref - item.attention).max()))
            print(f"  stored float16 vs HF eager, 8 texts: max |diff| {worst:.2e} (float16 rounding: <= 1e-3)")
            del eager
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
