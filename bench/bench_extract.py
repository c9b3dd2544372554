#!/usr/bin/env python3
"""Extraction speed, storage and memory, side by side in one run on one corpus: ratios, not absolute times.

    (a) attnpipe end to end: our pass, all layers and heads, HDF5 float16, file closed on disk
    (b) transformers eager, output_attentions=True, length-sorted batches, nothing stored
    (c) transformers SDPA without attention: the cost of just running the model
    (d) seed 001's approach: one text at a time, padded to 256, eager with attentions
    (e) attnpipe --metrics-only: per-head metrics stored instead of the matrices

Each is run --repeats times in turn (a, b, c, d, e, a, b, ...) and the medians of the times and
of the per-round ratios are reported, so that load on a shared machine hits all alike. Then:
bytes per stored value for float32 / float16 / uint8 (and uint8's largest error), the latency
of reading one (text, layer, head) matrix from a ~1 GB file, peak RSS of whole runs over 500
and 5,000 texts (subprocesses, VmHWM), analysis throughput (attention values per second
for the standard metric set read from disk), and the peak RSS of one 4,096-token text through
a GPT-2-small-sized random model.

    python bench/bench_extract.py                       # demo corpus, packaged MiniLM
    python bench/bench_extract.py --texts-file my.txt --limit 512 --repeats 5
    python bench/bench_extract.py --smoke               # small sizes: proves the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from attnpipe import store
from attnpipe.extract import corpus  # noqa: E402
from attnpipe.extract.corpus import Text  # noqa: E402
from attnpipe.extract.batching import length_sorted_batches  # noqa: E402
from attnpipe.extract.runner import ExtractConfig, extract  # noqa: E402
from attnpipe.extract.loading import default_model_dir  # noqa: E402
from attnpipe.analyze.metrics import METRICS  # noqa: E402


def hf_forward(model, tokenizer, texts: list[str], batch_size: int, max_length: int, attentions: bool) -> None:
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    with torch.inference_mode():
        for batch in length_sorted_batches(lengths, batch_size):
            enc = tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
            out = model(**enc, output_attentions=attentions)
            if attentions:
                assert out.attentions, "eager model returned no attentions"


def seed_001(model, tokenizer, texts: list[str]) -> None:
    with torch.inference_mode():
        for text in texts:
            enc = tokenizer([text], padding="max_length", truncation=True, max_length=256, return_tensors="pt")
            model(**enc, output_attentions=True)


def corpus_of(texts: list[Text], count: int) -> tuple[Text, ...]:
    """`count` texts cycling through the given ones, each with its own id."""
    return tuple(Text(f"{texts[i % len(texts)].id}~{i}", texts[i % len(texts)].text) for i in range(count))


def attention_values(path: Path) -> int:
    """Attention values stored in a file of either layout (version 3, the default, or 2)."""
    return packed_values(path)


# ----------------------------------------------------------------------------- child processes


def peak_rss_mb() -> float:
    """This process's peak resident set in MB: VmHWM, the high-water mark of its own address space.

    Not getrusage's ru_maxrss: Linux carries that across fork + exec, so a child started by this
    (big) benchmark process would report the parent's resident set, whatever the child did.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # other systems: kB on Linux, bytes on macOS


def child_rss(args) -> int:
    """Extract args.count texts (cycled from the corpus) to HDF5 float16; print peak RSS in MB."""
    texts = corpus_of(corpus.read_texts_file(args.texts_file), args.count)
    with tempfile.TemporaryDirectory() as tmp:
        extract(ExtractConfig(texts=texts, output=Path(tmp) / "rss.h5", model_dir=args.model_dir,
                              max_length=args.max_length, dtype="float16", progress=False))
    print(json.dumps({"rss_mb": peak_rss_mb()}))
    return 0


def save_gpt2_small(folder: Path, positions: int, layers: int) -> Path:
    """A random GPT-2-small-sized model (768 wide, 12 heads) with a word-level tokenizer."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    config = T.GPT2Config(n_positions=positions, n_embd=768, n_layer=layers, n_head=12, vocab_size=50257)
    T.AutoModel.from_config(config).save_pretrained(folder)
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i + 1 for i in range(1000)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    T.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                              unk_token="<|endoftext|>", model_max_length=positions).save_pretrained(folder)
    return folder


def child_long(args) -> int:
    """One args.tokens-token text through a random GPT-2-small to HDF5; print peak RSS in MB."""
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_gpt2_small(Path(tmp) / "gpt2", args.tokens, args.layers)
        text = " ".join(f"w{i % 1000}" for i in range(args.tokens))
        start = time.perf_counter()
        extract(ExtractConfig(texts=(Text("long", text),), output=Path(tmp) / "long.h5", model_dir=model_dir,
                              dtype=args.long_dtype, compression=args.long_compression, progress=False))
        seconds = time.perf_counter() - start
        size = (Path(tmp) / "long.h5").stat().st_size
    print(json.dumps({"rss_mb": peak_rss_mb(),
                      "seconds": seconds, "file_mb": size / 1e6}))
    return 0


def run_child(*flags: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *flags, *CHILD_FLAGS], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child {flags} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


CHILD_FLAGS: list[str] = []  # the parent's --threads, passed on


# ----------------------------------------------------------------------------- parts of the main run


def big_file(source: Path, target: Path, megabytes: float) -> int:
    """Copy the source file's texts until the file holds ~megabytes: version 2, compressed chunks
    as they are; version 3 (the default), through its writer (values re-encoded, not re-rounded)."""
    with store.open_attention(source) as src:
        meta, storage, count = src.meta, src.storage, len(src)
        if storage.schema_version == 3:
            items = [src[i] for i in range(count)]
    if storage.schema_version == 3:
        copies = max(1, int(megabytes * 1e6 / source.stat().st_size))
        total = copies * count
        with store.h5_writer(target, total, storage.dtype, storage) as writer:
            for index in range(total):
                item = items[index % count]
                writer.write(index, store.TextAttention(**{**item.__dict__, "id": f"{item.id}~{index}"}))
            writer.finish(meta)
        return total
    with store.open_attention(source) as src:
        chunks = []  # per source text: (item, [(offset, bytes)])
        for i in range(count):
            item = src[i]
            dataset = src._h5[f"texts/{i:08d}/attention"]
            raw = [(c.chunk_offset, dataset.id.read_direct_chunk(c.chunk_offset)[1])
                   for c in (dataset.id.get_chunk_info(k) for k in range(dataset.id.get_num_chunks()))]
            chunks.append((item, raw))
    per_copy = sum(len(data) for _, raw in chunks for _, data in raw)
    copies = max(1, int(megabytes * 1e6 / per_copy))
    total = copies * count
    with store.H5Writer(target, total, storage.dtype, storage) as writer:
        for index in range(total):
            item, raw = chunks[index % count]
            item = store.TextAttention(**{**item.__dict__, "id": f"{item.id}~{index}"})
            writer.begin(index, item, len(meta.layers), len(meta.heads))
            dataset = writer._attention[index]
            for offset, data in raw:
                dataset.id.write_direct_chunk(offset, data)
            writer.end(index)
        writer.finish(meta)
    return total


def read_latency(path: Path, reads: int) -> tuple[float, float, float]:
    """Median and 95th percentile ms of reading one random (text, layer, head) matrix; open ms."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    with store.open_attention(path) as f:
        opened = (time.perf_counter() - start) * 1e3
        picks = [(int(rng.integers(len(f))), int(rng.integers(len(f.meta.layers))),
                  int(rng.integers(len(f.meta.heads)))) for _ in range(reads)]
        times = []
        for text, layer, head in picks:
            start = time.perf_counter()
            f.head(text, layer, head)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), float(np.percentile(times, 95)), opened


def analysis_throughput(path: Path, repeats: int) -> tuple[float, float, float, float]:
    """Attention values per second from disk: reading alone, numpy corpus_metrics, the torch port in
    one process, and the torch port with one worker process per core (analyze_attention.py metrics).
    Medians of `repeats` interleaved rounds (the first round also pays one-off imports and caches)."""
    from attnpipe.analyze import fast_metrics
    from attnpipe.analyze import metric_reference as R

    values = attention_values(path)
    runs = {
        "read": lambda f: [None for _ in f],
        "numpy": R.corpus_metrics,
        "torch": lambda f: fast_metrics.corpus_metrics(f, workers=1),
        "parallel": fast_metrics.corpus_metrics,
    }
    rates: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            start = time.perf_counter()
            with store.open_attention(path) as f:
                run(f)
            rates[key].append(values / (time.perf_counter() - start))
    return tuple(statistics.median(rates[key]) for key in runs)


def entropy_profile(path: Path) -> tuple[float, float, float]:
    """Order-0 entropy in bytes per value: uint8 values, float16 high byte, float16 low byte.

    A bound for any coder that sees values independently: what gzip can hope for, roughly.
    """
    counts8, hi, lo = np.zeros(256), np.zeros(256), np.zeros(256)
    with store.open_attention(path) as f:
        for item in f:
            p = item.attention.ravel()
            counts8 += np.bincount(store.to_storage(p, "uint8"), minlength=256)
            pair = p.astype(np.float16).view(np.uint8).reshape(-1, 2)
            lo += np.bincount(pair[:, 0], minlength=256)
            hi += np.bincount(pair[:, 1], minlength=256)

    def bits(counts: np.ndarray) -> float:
        q = counts[counts > 0] / counts.sum()
        return float(-(q * np.log2(q)).sum()) / 8

    return bits(counts8), bits(hi), bits(lo)


# ----------------------------------------------------------------------------- corpus scale (--scale)
# Issue 22: schema version 3 (packed) against version 2 and HF eager, at corpus scale, with a small
# model where storage, not the matrix products, sets the pace.

SMALL_BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
WORDS = ("the a of and to in is was it for on with as at by from this that they we you he she "
         "cat dog house city river music water light paper table story voice road field night").split()


def save_small_bert(folder: Path) -> Path:
    """A random 2-layer, 4-head, 64-wide BERT with MiniLM's (real WordPiece) tokenizer."""
    import shutil

    import transformers as T

    torch.manual_seed(0)
    T.BertModel(T.BertConfig(vocab_size=30522, max_position_embeddings=512, **SMALL_BERT)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (default_model_dir() / name).exists():
            shutil.copy(default_model_dir() / name, folder / name)
    return folder


def short_texts(count: int, words: int | None = None, seed: int = 0) -> list[Text]:
    """`count` short texts: sentences of the demo corpus cycled (words=None), or `words` random
    common words each (all texts the same length: a write rate that does not drift with length)."""
    if words is None:
        sentences = [part.strip() for t in corpus.read_texts_file(ROOT / "data" / "demo_corpus.jsonl")
                     for part in t.text.replace("? ", ". ").replace("! ", ". ").split(". ") if len(part.split()) > 2]
        return [Text(f"s{i}", sentences[i % len(sentences)]) for i in range(count)]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(WORDS), (count, words))
    return [Text(f"w{i}", " ".join(WORDS[k] for k in row)) for i, row in enumerate(picks.tolist())]


def write_jsonl(texts: list[Text], path: Path) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for t in texts:
            handle.write(json.dumps({"id": t.id, "text": t.text}) + "\n")
    return path


def hf_eager_crop(model, tokenizer, texts: list[str], batch_size: int, max_length: int) -> None:
    """HF eager with attentions, length-sorted batches, each text's layers cropped to its real tokens."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    with torch.inference_mode():
        for batch in length_sorted_batches(lengths, batch_size):
            enc = tokenizer([texts[i] for i in batch], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            attentions = torch.stack(model(**enc, output_attentions=True).attentions, dim=1)  # (B, L, H, T, T)
            for row, i in enumerate(batch):
                n = lengths[i]
                attentions[row, :, :, :n, :n].contiguous().numpy()


def process_seconds(*args: str, env: dict | None = None) -> tuple[float, int]:
    """Wall time of a whole extract_attention.py process (start-up included) and its exit status.

    The process may write and then read attnpipe's compiled bytecode (__pycache__), as on a user's
    machine, even where the environment sets PYTHONDONTWRITEBYTECODE (this project's machines do:
    every process then compiled attnpipe's modules again, ~0.11 s of its start-up)."""
    start = time.perf_counter()
    base = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    proc = subprocess.run([sys.executable, str(ROOT / "extract_attention.py"), *args, "-q"], capture_output=True,
                          text=True, env={**base, **(env or {})}, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode not in (0, -9):
        raise RuntimeError(f"extract_attention.py {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return seconds, proc.returncode


def first_batch_seconds(model_dir: Path, texts_file: Path, out: Path, *flags: str, loader: str | None = None) -> float:
    """Process start to the first batch's forward pass done: the run kills itself there
    (attnpipe/faults.py, ATTNPIPE_FAULT_AT=batch:1), so the wall time is exactly that. `loader`
    "transformers" forces that loader (ATTNPIPE_LOADER), as before the direct one."""
    env = {"ATTNPIPE_FAULT_AT": "batch:1"} | ({"ATTNPIPE_LOADER": loader} if loader else {})
    seconds, code = process_seconds("--model_dir", str(model_dir), "--texts-file", str(texts_file),
                                    "--output_file", str(out), *flags, env=env)
    assert code == -9, "the run did not reach its first batch"
    return seconds


def child_scale(args) -> int:
    """Extract args.count equal-length texts to a version-3 float16 file in this process, timing when
    each text's attention is complete (a batch's texts at once: end_batch; texts begun one by one:
    end); print the write rates of the first and last 10 % of texts, peak RSS and the file."""
    from attnpipe.store import packed

    ends: list[float] = []  # one timestamp per completed text
    rss_tenth: list[float] = []

    def completed(count: int) -> None:
        before = len(ends)
        ends.extend([time.perf_counter()] * count)
        if before < max(1, args.count // 10) <= len(ends):
            rss_tenth.append(peak_rss_mb())

    original_end, original_batch = packed.PackedWriter.end, packed.PackedWriter.end_batch

    def timed_end(self, index):
        streamed = index in self._streaming
        original_end(self, index)
        if streamed:
            completed(1)

    def timed_end_batch(self, first):
        batch = self._batches.get(first)
        original_batch(self, first)
        if batch is not None and batch.starts is not None:
            completed(len(batch.indices))

    packed.PackedWriter.end, packed.PackedWriter.end_batch = timed_end, timed_end_batch
    texts = tuple(short_texts(args.count, words=12))
    start = time.perf_counter()
    extract(ExtractConfig(texts=texts, output=args.scale_output, model_dir=args.model_dir, dtype="float16",
                          progress=False, schema_version=3))
    seconds = time.perf_counter() - start
    tenth = max(2, len(ends) // 10)

    def rate(a: int, b: int) -> float:  # texts/s from the a-th completed text to the b-th
        return (b - a) / (ends[b] - ends[a]) if ends[b] > ends[a] else float("nan")

    first = rate(0, tenth - 1)  # from the first text written: loading is not writing
    last = rate(len(ends) - tenth - 1, len(ends) - 1)
    # texts/s of each tenth (the first from its first text on): the trend over the run
    cuts = [0, *(len(ends) * k // 10 - 1 for k in range(1, 11))]
    deciles = [rate(a, b) for a, b in zip(cuts, cuts[1:])]
    print(json.dumps({"rss_mb": peak_rss_mb(), "seconds": seconds, "first_rate": first, "last_rate": last,
                      "rss_tenth_mb": rss_tenth[0] if rss_tenth else float("nan"), "decile_rates": deciles,
                      "write_seconds": ends[-1] - ends[0]}))
    return 0


def child_metrics(args) -> int:
    """corpus_metrics (what analyze_attention.py metrics computes) over args.scale_output in one
    process, in this fresh process; print its seconds."""
    from attnpipe.analyze import fast_metrics

    start = time.perf_counter()
    with store.open_attention(args.scale_output) as f:
        fast_metrics.corpus_metrics(f, workers=1)
    print(json.dumps({"seconds": time.perf_counter() - start}))
    return 0


def metrics_rounds(path: Path, values: int, repeats: int) -> None:
    """Metrics over the whole file (corpus_metrics, one process), each round in a fresh child: what
    an analyze_attention.py metrics process pays, its allocations from a new address space."""
    seconds = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--child", "metrics", "--scale-output", str(path)],
                             capture_output=True, text=True, check=False)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        seconds.append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
    median = statistics.median(seconds)
    print(f"  metrics (analyze_attention.py metrics' corpus_metrics) over the whole file, 1 process, median of "
          f"{repeats} fresh process(es): {values / median / 1e6:.2f} M values/s, {median:.1f} s "
          f"({', '.join(f'{t:.1f}' for t in seconds)}; load average {os.getloadavg()[0]:.1f}; target >= 50)")


def packed_values(path: Path) -> int:
    """Attention values stored in a file of either layout."""
    with h5py_file(path) as f:
        if int(f.attrs["schema_version"]) == 3:
            return len(f["attention/values"])
        return sum(int(np.prod(f[f"texts/{name}/attention"].shape)) for name in f["texts"])


def h5py_file(path: Path):
    import h5py

    return h5py.File(path, "r")


def whole_process_models(tmp: Path, model_dir, short_count: int, minilm_count: int) -> SimpleNamespace:
    """What --scale and --startup both compare: the small BERT and MiniLM, their corpora as JSONL files
    (for our whole process) and as strings, and both models in transformers loaded once (for HF)."""
    import transformers

    small = save_small_bert(tmp / "small-bert")
    minilm = model_dir or default_model_dir()
    texts = short_texts(short_count)
    mini_texts = list(corpus_of(list(corpus.read_texts_file(ROOT / "data" / "demo_corpus.jsonl")), minilm_count))
    models = {name: (transformers.AutoTokenizer.from_pretrained(folder),
                     transformers.AutoModel.from_pretrained(folder, attn_implementation="eager").eval())
              for name, folder in (("small", small), ("minilm", minilm))}
    return SimpleNamespace(small=small, minilm=minilm, texts=texts, mini_texts=mini_texts, models=models,
                           texts_file=write_jsonl(texts, tmp / "short.jsonl"), strings=[t.text for t in texts],
                           mini_file=write_jsonl(mini_texts, tmp / "minilm.jsonl"),
                           mini_strings=[t.text for t in mini_texts])


def hf_run(models: dict, name: str, strings: list[str], threads: int, batch_size: int = 32):
    """HF eager forward + crop to real tokens of `strings`, in this process, on `threads` torch threads,
    in length-sorted batches of `batch_size` (32: the issue's baseline)."""
    def run():
        default = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            hf_eager_crop(models[name][1], models[name][0], strings, batch_size, 128)
        finally:
            torch.set_num_threads(default)
    return run


def interleaved(runs: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of every run, round by round; a run returning a float (a child's own figure) gives that."""
    times: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(repeats):
        for key, (_, run) in runs.items():
            start = time.perf_counter()
            seconds = run()
            times[key].append(seconds if isinstance(seconds, float) else time.perf_counter() - start)
    return times


def scale_main(args) -> int:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    load = os.getloadavg()[0]
    print(f"corpus scale: {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, load average "
          f"{load:.1f} at start; ratios are medians over {args.repeats} interleaved round(s)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        w = whole_process_models(tmp, args.model_dir, args.scale_texts, args.minilm_texts)
        small, minilm, texts, mini_texts = w.small, w.minilm, w.texts, w.mini_texts
        texts_file, strings, mini_file, mini_strings = w.texts_file, w.strings, w.mini_file, w.mini_strings
        default_threads = torch.get_num_threads()

        def hf(name, strings_, threads):
            return hf_run(w.models, name, strings_, threads)

        def ours(folder, file, version, *flags):
            return lambda: process_seconds("--model_dir", str(folder), "--texts-file", str(file), "--output_file",
                                           str(tmp / f"v{version}.h5"), "--schema-version", str(version), *flags)[0]

        runs = {
            "hf-small": ("small BERT: HF eager + crop, in process", hf("small", strings, default_threads)),
            "v3-small": ("small BERT: attnpipe v3, whole process", ours(small, texts_file, 3)),
            "v2-small": ("small BERT: attnpipe v2, whole process", ours(small, texts_file, 2)),
            "hf-mini": ("MiniLM: HF eager + crop, in process", hf("minilm", mini_strings, default_threads)),
            "v3-mini": ("MiniLM: attnpipe v3, whole process", ours(minilm, mini_file, 3)),
            "hf-mini-1": ("MiniLM, 1 thread: HF eager + crop", hf("minilm", mini_strings, 1)),
            "v3-mini-1": ("MiniLM, 1 thread: attnpipe v3, whole process", ours(minilm, mini_file, 3, "--threads", "1")),
            "v2-mini-1": ("MiniLM, 1 thread: attnpipe v2, whole process", ours(minilm, mini_file, 2, "--threads", "1")),
        }
        times = interleaved(runs, args.repeats)
        print(f"\nend to end ({len(texts):,} short texts for the small BERT, {len(mini_texts)} demo texts for "
              "MiniLM; attnpipe: float32 gzip HDF5, the whole process; HF: after loading)")
        for key, (label, _) in runs.items():
            print(f"  {label:48s} median {statistics.median(times[key]):8.2f} s")

        def ratio(ours_key: str, hf_key: str) -> float:
            return statistics.median(h / o for o, h in zip(times[ours_key], times[hf_key], strict=True))

        print(f"  small BERT v3 / HF eager+crop:  {ratio('v3-small', 'hf-small'):5.2f}  (v2: "
              f"{ratio('v2-small', 'hf-small'):5.2f}; target >= 0.9)")
        print(f"  MiniLM default threads v3 / HF: {ratio('v3-mini', 'hf-mini'):5.2f}  (target >= 1.0)")
        print(f"  MiniLM 1 thread v3 / HF:        {ratio('v3-mini-1', 'hf-mini-1'):5.2f}  (v2: "
              f"{ratio('v2-mini-1', 'hf-mini-1'):5.2f}; target >= 1.14)")

        firsts = [first_batch_seconds(minilm, mini_file, tmp / "first.h5") for _ in range(args.repeats)]
        print(f"\nstart-up: process start to the first batch's forward pass, MiniLM: median "
              f"{statistics.median(firsts):.2f} s ({', '.join(f'{s:.2f}' for s in firsts)}; aim <= 1.5 s)")

        for dtype in ("float16", "uint8"):
            sizes = {}
            for version in (2, 3):
                path = tmp / f"bytes-v{version}.h5"
                process_seconds("--model_dir", str(minilm), "--texts-file", str(mini_file), "--output_file",
                                str(path), "--schema-version", str(version), "--dtype", dtype)
                sizes[version] = path.stat().st_size / packed_values(path)
            print(f"  bytes per value, MiniLM {dtype}: v2 {sizes[2]:.3f}, v3 {sizes[3]:.3f} (whole file)")

        big = tmp / "scale.h5"
        rows = []
        for count in args.scale_counts:
            out = subprocess.run([sys.executable, __file__, "--child", "scale", "--count", str(count), "--model_dir",
                                  str(small), "--scale-output", str(big), *CHILD_FLAGS],
                                 capture_output=True, text=True, check=False)
            if out.returncode:
                raise RuntimeError(out.stderr[-2000:])
            rows.append((count, json.loads(out.stdout.strip().splitlines()[-1])))
        print("\nscale: equal-length 12-word texts, small BERT, version 3 float16, in one process each")
        for count, row in rows:
            print(f"  {count:9,d} texts: {row['seconds']:7.1f} s, write rate first 10 % {row['first_rate']:7.0f} "
                  f"texts/s, last 10 % {row['last_rate']:7.0f} (ratio {row['last_rate'] / row['first_rate']:.2f}), "
                  f"peak RSS {row['rss_mb']:.0f} MB")
        values = packed_values(big)
        median_ms, p95_ms, open_ms = read_latency(big, 1000)
        print(f"  largest file: {rows[-1][0]:,} texts, {values:,} values, "
              f"{big.stat().st_size / values:.3f} bytes/value")
        print(f"  open {open_ms:.1f} ms (target <= 100); one matrix median {median_ms:.3f} ms, p95 {p95_ms:.3f} ms "
              "(targets <= 1, <= 5)")
        metrics_rounds(big, values, 1)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


def scale_run_main(args) -> int:
    """--scale-run N: N equal-length short texts through the small BERT into one version-3 float16
    file (a child process), then that file read back here: write rates (first and last 10 %, and
    each tenth), open time, one-matrix random access, metrics throughput, peak RSS at N/10 and N."""
    count = args.scale_run
    print(f"scale run: {count:,} texts, small BERT ({SMALL_BERT['num_hidden_layers']} layers, "
          f"{SMALL_BERT['num_attention_heads']} heads, {SMALL_BERT['hidden_size']} wide), version 3 float16; "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} "
          "at start", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small = save_small_bert(tmp / "small-bert")
        big = tmp / "scale.h5"
        out = subprocess.run([sys.executable, __file__, "--child", "scale", "--count", str(count), "--model_dir",
                              str(small), "--scale-output", str(big), *CHILD_FLAGS],
                             capture_output=True, text=True, check=False)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        row = json.loads(out.stdout.strip().splitlines()[-1])
        values = packed_values(big)
        print(f"  written in {row['seconds']:.1f} s ({row['write_seconds']:.1f} s from the first text to the last, "
              f"{count / row['seconds']:.0f} texts/s whole run); load average {os.getloadavg()[0]:.1f}")
        print(f"  write rate first 10 % {row['first_rate']:.0f} texts/s, last 10 % {row['last_rate']:.0f} "
              f"(last / first {row['last_rate'] / row['first_rate']:.2f}; target within 10 %)")
        print("  each tenth, texts/s: " + ", ".join(f"{r:.0f}" for r in row["decile_rates"]))
        print(f"  peak RSS at {count // 10:,} texts {row['rss_tenth_mb']:.0f} MB, at {count:,} texts "
              f"{row['rss_mb']:.0f} MB (ratio {row['rss_mb'] / row['rss_tenth_mb']:.3f}; target flat)")
        print(f"  file {big.stat().st_size / 1e9:.2f} GB, {values:,} values, {big.stat().st_size / values:.3f} "
              "bytes/value")
        median_ms, p95_ms, open_ms = read_latency(big, args.scale_reads)
        print(f"  open {open_ms:.1f} ms (target <= 100); one matrix over {args.scale_reads:,} random (text, layer, "
              f"head): median {median_ms:.3f} ms, p95 {p95_ms:.3f} ms (targets <= 1, <= 5; the first read also "
              "loads the index)", flush=True)
        metrics_rounds(big, values, args.metrics_repeats)
# ----------------------------------------------------------------------------- start-up and whole process (--startup)
# Issue 22: the whole extract_attention.py process from the shell (start-up included) against HF's
# eager forward + crop in one process, and the time from process start to the first batch with the
# transformers loader (ATTNPIPE_LOADER=transformers, the "before") and the direct loader (the default).


def startup_main(args) -> int:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    print(f"start-up and whole process: {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, load "
          f"average {os.getloadavg()[0]:.1f} at start; medians over {args.repeats} interleaved round(s)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        w = whole_process_models(tmp, args.model_dir, args.whole_texts, args.whole_minilm)
        small, minilm, texts, mini_texts, texts_file, mini_file = (w.small, w.minilm, w.texts, w.mini_texts,
                                                                   w.texts_file, w.mini_file)
        default_threads = torch.get_num_threads()

        def hf(name, strings, threads, batch_size=32):
            return hf_run(w.models, name, strings, threads, batch_size)

        def ours(folder, file, *flags):
            return lambda: process_seconds("--model_dir", str(folder), "--texts-file", str(file), "--output_file",
                                           str(tmp / "ours.h5"), "--schema-version", "3", *flags)[0]

        runs = {
            "hf-small": ("small BERT: HF eager + crop, in process", hf("small", [t.text for t in texts],
                                                                        default_threads)),
            "small": ("small BERT: attnpipe v3, whole process", ours(small, texts_file)),
            "hf-small-128": ("small BERT: HF eager + crop, batches of 128", hf("small", [t.text for t in texts],
                                                                               default_threads, 128)),
            "hf-mini": ("MiniLM: HF eager + crop, in process", hf("minilm", [t.text for t in mini_texts],
                                                                  default_threads)),
            "mini": ("MiniLM: attnpipe v3, whole process", ours(minilm, mini_file)),
            "hf-mini-1": ("MiniLM, 1 thread: HF eager + crop", hf("minilm", [t.text for t in mini_texts], 1)),
            "mini-1": ("MiniLM, 1 thread: attnpipe v3, whole process", ours(minilm, mini_file, "--threads", "1")),
            "first-before": ("MiniLM first batch, transformers loader", lambda: first_batch_seconds(
                minilm, mini_file, tmp / "first.h5", loader="transformers")),
            "first-after": ("MiniLM first batch, direct loader", lambda: first_batch_seconds(
                minilm, mini_file, tmp / "first.h5", loader="direct")),
        }
        times = interleaved(runs, args.repeats)
    print(f"\n{len(texts):,} short texts for the small BERT, {len(mini_texts)} demo texts for MiniLM; attnpipe: "
          "the whole process from the shell (float32 gzip HDF5, --schema-version 3, its bytecode cached as "
          "on a user's machine); HF: after loading")
    for key, (label, _) in runs.items():
        print(f"  {label:48s} median {statistics.median(times[key]):8.2f} s   "
              f"({', '.join(f'{t:.2f}' for t in times[key])})")

    def ratio(ours_key: str, other_key: str) -> float:
        return statistics.median(h / o for o, h in zip(times[ours_key], times[other_key], strict=True))

    print(f"  small BERT, HF / whole process:         {ratio('small', 'hf-small'):5.2f}  (target >= 0.9)")
    print(f"  small BERT, HF in our batches of 128 / whole: {ratio('small', 'hf-small-128'):5.2f}  (HF's own "
          f"batches of 32 / of 128: {ratio('hf-small-128', 'hf-small'):.2f})")
    print(f"  MiniLM default threads, HF / whole:     {ratio('mini', 'hf-mini'):5.2f}  (start-up included; the >= 1.0 target is "
          "in process: the default mode's (a)/(b))")
    print(f"  MiniLM 1 thread, HF / whole:            {ratio('mini-1', 'hf-mini-1'):5.2f}  (start-up included; >= 1.14 in "
          "process: (a)/(b) with --threads 1)")
    print(f"  first batch, transformers / direct:     {ratio('first-after', 'first-before'):5.2f}  (median after "
          f"{statistics.median(times['first-after']):.2f} s; aim <= 1.5 s)")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts-file", type=Path, default=ROOT / "data" / "demo_corpus.jsonl",
                        help="corpus to run: .txt (one text per line), .jsonl, .csv (default: the demo corpus)")
    parser.add_argument("--model_dir", type=Path, default=None, help="model folder (default: packaged MiniLM)")
    parser.add_argument("--limit", type=int, default=256, help="use the first N texts (default: 256)")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per batch for (b) (default: 32)")
    parser.add_argument("--max-length", type=int, default=128, help="truncate to N tokens (default: 128)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of a-b-c-d-e; medians reported")
    parser.add_argument("--read-file-mb", type=float, default=1024, help="size of the file for read latency")
    parser.add_argument("--rss-counts", default="500,5000", help="corpus sizes for the peak-RSS runs")
    parser.add_argument("--rss-repeats", type=int, default=3, help="rounds of the peak-RSS runs (default: 3)")
    parser.add_argument("--long-tokens", type=int, default=4096, help="tokens of the long-input RSS check")
    parser.add_argument("--long-layers", type=int, default=12, help="layers of the long-input model")
    parser.add_argument("--long-dtype", default="uint8", choices=store.STORAGE_DTYPES,
                        help="storage dtype of the long-input check (default: uint8)")
    parser.add_argument("--long-compression", default="lzf", choices=store.COMPRESSIONS,
                        help="compression of the long-input check (default: lzf)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every run, ours and HF alike (default: torch's choice)")
    parser.add_argument("--skip", default="", metavar="A,B",
                        help="parts to leave out: speed, storage, read, rss, analysis, long")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, 1 round: proves the script runs (well under a minute)")
    parser.add_argument("--scale", action="store_true",
                        help="corpus scale (schema version 3): small BERT and MiniLM end to end against HF eager, "
                        "start-up, bytes per value, write rate / open / one-matrix / metrics on a big file")
    parser.add_argument("--scale-texts", type=int, default=20_000, help="--scale: short texts for the small BERT")
    parser.add_argument("--minilm-texts", type=int, default=512, help="--scale: demo texts for MiniLM")
    parser.add_argument("--scale-counts", type=lambda v: [int(x) for x in v.split(",")], default=[20_000, 200_000],
                        help="--scale: corpus sizes of the scale runs (the last one is read back)")
    parser.add_argument("--scale-run", type=int, default=None, metavar="N",
                        help="only the scale run: N short texts, small BERT, version 3; write rates, open, "
                        "one-matrix reads, metrics, peak RSS at N/10 and N")
    parser.add_argument("--scale-reads", type=int, default=2000, help="--scale-run: random one-matrix reads")
    parser.add_argument("--metrics-repeats", type=int, default=2,
                        help="--scale-run: rounds of the metrics over the file, each a fresh process")
    parser.add_argument("--startup", action="store_true",
                        help="start-up and whole process: extract_attention.py from the shell against HF eager + "
                        "crop in process (small BERT, MiniLM default threads and 1), first batch before/after")
    parser.add_argument("--whole-texts", type=int, default=20_000, help="--startup: short texts for the small BERT")
    parser.add_argument("--whole-minilm", type=int, default=512, help="--startup: demo texts for MiniLM")
    parser.add_argument("--scale-output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["rss", "long", "scale", "metrics"], help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child == "rss":
        return child_rss(args)
    if args.child == "long":
        return child_long(args)
    if args.child == "scale":
        return child_scale(args)
    if args.child == "metrics":
        return child_metrics(args)
    if args.scale_run:
        if args.threads:
            CHILD_FLAGS.extend(["--threads", str(args.threads)])
        return scale_run_main(args)
    if args.startup:
        if args.smoke:
            args.repeats, args.whole_texts, args.whole_minilm = 1, 200, 16
        return startup_main(args)
    if args.scale:
        if args.smoke:
            args.repeats, args.scale_texts, args.minilm_texts, args.scale_counts = 1, 200, 16, [200, 400]
        if args.threads:
            CHILD_FLAGS.extend(["--threads", str(args.threads)])
        return scale_main(args)
    if args.smoke:
        args.limit, args.repeats, args.read_file_mb, args.max_length = 4, 1, 2, 32
        args.rss_counts, args.rss_repeats, args.long_tokens, args.long_layers = "4,16", 1, 128, 2
    skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    if args.threads:
        CHILD_FLAGS.extend(["--threads", str(args.threads)])

    import transformers

    transformers.utils.logging.set_verbosity_error()
    model_dir = args.model_dir or default_model_dir()
    texts = list(corpus.read_texts_file(args.texts_file))
    texts = list(corpus_of(texts, args.limit)) if args.limit > len(texts) else texts[: args.limit]  # cycle
    strings = [t.text for t in texts]
    print(f"{len(texts)} texts from {args.texts_file.name}, max length {args.max_length}, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def ours(**kw):
            return lambda: extract(ExtractConfig(texts=tuple(texts), output=tmp / kw.pop("name", "a.h5"),
                                                 model_dir=model_dir, max_length=args.max_length,
                                                 progress=False, **kw))

        if "speed" not in skip:
            tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
            eager = transformers.AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
            sdpa = transformers.AutoModel.from_pretrained(model_dir, attn_implementation="sdpa").eval()
            runs = {
                "a": ("attnpipe -> HDF5 float16, file closed", ours(dtype="float16")),
                "b": ("HF eager + attentions, sorted", lambda: hf_forward(
                    eager, tokenizer, strings, args.batch_size, args.max_length, True)),
                "c": ("HF sdpa, no attentions", lambda: hf_forward(
                    sdpa, tokenizer, strings, args.batch_size, args.max_length, False)),
                "d": ("seed 001: one text, pad 256", lambda: seed_001(eager, tokenizer, strings)),
                "e": ("attnpipe --metrics-only", ours(metrics_only=True, name="e.h5")),
            }
            times: dict[str, list[float]] = {key: [] for key in runs}
            for _ in range(args.repeats):
                for key, (_, run) in runs.items():
                    start = time.perf_counter()
                    run()
                    times[key].append(time.perf_counter() - start)
            print(f"\nspeed: median of {args.repeats} interleaved round(s); ratio = other's time / this one's "
                  "(> 1: faster than the other), median over rounds")
            print(f"  {'run':44s} {'median s':>9s} {'min s':>8s} {'max s':>8s}")
            for key, (label, _) in runs.items():
                print(f"  ({key}) {label:40s} {statistics.median(times[key]):9.3f} "
                      f"{min(times[key]):8.3f} {max(times[key]):8.3f}")

            def ratio(x: str, y: str) -> float:
                return statistics.median(ty / tx for tx, ty in zip(times[x], times[y], strict=True))

            print(f"  (a)/(b) speed vs HF eager+attentions: {ratio('a', 'b'):5.2f}   (target >= 1.0)")
            print(f"  (a)/(c) speed vs HF sdpa:             {ratio('a', 'c'):5.2f}   (aim >= 0.9)")
            print(f"  (a)/(d) speed vs seed 001:            {ratio('a', 'd'):5.2f}   (target >= 4)")
            print(f"  (e)/(b) metrics-only vs HF eager:     {ratio('e', 'b'):5.2f}   (target >= 0.95)")
            del eager, sdpa

        if "storage" not in skip or "read" not in skip or "analysis" not in skip:
            sizes = {}
            for dtype in store.STORAGE_DTYPES:
                ours(dtype=dtype, name=f"{dtype}.h5")()
                sizes[dtype] = (tmp / f"{dtype}.h5").stat().st_size
            values = attention_values(tmp / "float32.h5")
            with store.open_attention(tmp / "float32.h5") as f32, store.open_attention(tmp / "uint8.h5") as u8, \
                    store.open_attention(tmp / "float16.h5") as f16:
                err8 = max(float(np.abs(f32[i].attention - u8[i].attention).max()) for i in range(len(f32)))
                err16 = max(float(np.abs(f32[i].attention - f16[i].attention).max()) for i in range(len(f32)))
            if "storage" not in skip:
                print(f"\nstorage: {values:,} attention values, whole file incl. tokens and metadata, "
                      "gzip + shuffle at the default level")
                for dtype, size in sizes.items():
                    print(f"  {dtype:8s} {size / values:6.3f} bytes/value  ({size / 1e6:7.2f} MB, gzip level "
                          f"{store.DEFAULT_GZIP_LEVELS[dtype]})")
                print(f"  float16 max abs error {err16:.2e}; uint8 max abs error {err8:.5f} (target <= 0.002)")
                e8, ehi, elo = entropy_profile(tmp / "float32.h5")
                print(f"  order-0 entropy (bytes/value): uint8 values {e8:.3f}; float16 high byte {ehi:.3f} + "
                      f"low byte {elo:.3f} = {ehi + elo:.3f}")
                print(f"  schema version {store.H5_SCHEMA_VERSION} (the default); targets: float16 <= 1.75 B/value, "
                      "uint8 <= 0.45 B/value")

        if "read" not in skip:
            count = big_file(tmp / "float16.h5", tmp / "big.h5", args.read_file_mb)
            median_ms, p95_ms, open_ms = read_latency(tmp / "big.h5", 1000)
            print(f"\nread: one (text, layer, head) matrix from a {(tmp / 'big.h5').stat().st_size / 1e9:.2f} GB "
                  f"float16 file of {count:,} texts (page cache warm: just written)")
            print(f"  median {median_ms:.3f} ms, p95 {p95_ms:.3f} ms over 1,000 random reads; opening the file "
                  f"{open_ms:.1f} ms  (targets: median <= 1 ms, p95 <= 5 ms, open <= 100 ms)")
            (tmp / "big.h5").unlink()

        if "analysis" not in skip:
            from attnpipe.analyze.fast_metrics import default_workers

            read_rate, numpy_rate, torch_rate, parallel_rate = analysis_throughput(tmp / "float16.h5", args.repeats)
            print(f"\nanalysis: the standard metric set ({len(METRICS)} "
                  f"metrics) read from the float16 file, median of {args.repeats} round(s)")
            print(f"  reading whole texts alone (gunzip, float16 -> float32): {read_rate / 1e6:7.1f} M values/s")
            print(f"  attnpipe.analyze.metric_reference.corpus_metrics (numpy float64): {numpy_rate / 1e6:7.1f} M values/s")
            print(f"  attnpipe.analyze.fast_metrics.corpus_metrics, 1 process:         {torch_rate / 1e6:7.1f} M values/s")
            print(f"  the same, up to {default_workers()} worker processes (analyze_attention.py metrics): "
                  f"{parallel_rate / 1e6:5.1f} M values/s   (target >= 50)")

    if "rss" not in skip:
        counts = [int(c) for c in args.rss_counts.split(",")]
        common = ["--texts-file", str(args.texts_file), "--max-length", str(args.max_length)]
        if args.model_dir:
            common += ["--model_dir", str(args.model_dir)]
        # One child per corpus size and round, rounds interleaved: a run's peak varies by tens of MB
        # with how glibc's heap happens to fragment, so one pair alone can land on either side.
        rss: dict[int, list[float]] = {count: [] for count in counts}
        for _ in range(args.rss_repeats):
            for count in counts:
                rss[count].append(run_child("--child", "rss", "--count", str(count), *common)["rss_mb"])
        print(f"\npeak RSS of a whole extraction (subprocess, VmHWM, float16 HDF5), {args.rss_repeats} round(s):")
        for count, mbs in rss.items():
            print(f"  {count:6d} texts: median {statistics.median(mbs):7.0f} MB   "
                  f"({', '.join(f'{mb:.0f}' for mb in mbs)})")
        if len(counts) == 2:
            ratios = [big / small for small, big in zip(rss[counts[0]], rss[counts[1]], strict=True)]
            print(f"  ratio, median over rounds {statistics.median(ratios):.3f}  "
                  f"({', '.join(f'{r:.3f}' for r in ratios)})  (target <= 1.1)")

    if "long" not in skip:
        result = run_child("--child", "long", "--tokens", str(args.long_tokens), "--layers", str(args.long_layers),
                           "--long-dtype", args.long_dtype, "--long-compression", args.long_compression)
        print(f"\nlong input: one {args.long_tokens}-token text, random GPT-2-small-sized model "
              f"({args.long_layers} layers, 12 heads, 768 wide), all layers and heads, {args.long_dtype} "
              f"{args.long_compression}")
        print(f"  peak RSS {result['rss_mb']:.0f} MB (target < 3000), {result['seconds']:.1f} s, "
              f"file {result['file_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
