"""`extract_attention.py --estimate`: the output size and run time, before running.

Sizes are exact counts: every text stores L·H·r·n values (L, H stored layers and heads, r query
rows kept, n tokens). Bytes per stored value and seconds per unit of work come from a short
calibration: a few texts spread over the corpus's lengths go through the real pipeline (same
model, dtype, compression, rows) into a temporary file. Work is counted in forward-pass FLOPs,
per layer 24·T·d² (projections and feed-forward) + 4·T²·d (scores and weighted sum) for each
text at its batch's padded width T, so short and long texts are weighed by what they cost.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attnpipe.errors import AttnpipeError
from attnpipe.extract.batching import batches
from attnpipe.extract.inputs import TextInputs
from attnpipe.extract.loading import default_model_dir, load_model, resolve_device
from attnpipe.extract.runner import ExtractConfig, check_config, run_model, selections, torch_threads

CALIBRATION_TEXTS = 16  # texts run for the calibration, spread evenly over the sorted lengths


@dataclass(frozen=True)
class Estimate:
    num_texts: int
    num_tokens: int
    num_values: int  # attention values stored (0 with --metrics-only)
    raw_bytes: int  # values x bytes of the dtype, before compression
    file_bytes: float  # expected file size
    seconds: float  # expected run time, model loading included
    load_seconds: float
    calibration_texts: int

    def describe(self) -> str:
        return (
            f"estimate: {self.num_texts} text(s), {self.num_tokens} tokens, "
            f"{self.num_values:,} attention values ({self.raw_bytes / 1e6:,.1f} MB before compression)\n"
            f"  expected output size: {self.file_bytes / 1e6:,.1f} MB\n"
            f"  expected time: {self.seconds:,.1f} s (model loading {self.load_seconds:.1f} s; "
            f"calibrated on {self.calibration_texts} text(s))"
        )


def _flops(lengths: np.ndarray, num_layers: int, num_heads: int, width: int, config: ExtractConfig) -> float:
    """Forward FLOPs of the padded batches the run will make (every text costs its batch's width)."""
    padded = np.zeros(len(lengths))
    for batch in batches(lengths.tolist(), config, num_heads):
        padded[batch] = max(int(lengths[i]) for i in batch)
    return float(num_layers * (24 * padded * width**2 + 4 * padded**2 * width).sum())


def estimate(config: ExtractConfig) -> Estimate:
    """Count the values to store, calibrate bytes and seconds on a few texts, scale up."""
    with torch_threads(config.threads):
        return _estimate(config)


def _estimate(config: ExtractConfig) -> Estimate:
    storage = check_config(config)
    if config.input_kind != "texts" or config.explain is not None:
        raise AttnpipeError("--estimate calibrates the extraction of texts (one text model, token-budget "
                            f"batches); it does not model {'--explain' if config.explain else config.input_kind}")
    device = resolve_device(config.device)
    model_dir = config.model_dir if config.model_dir is not None else default_model_dir()
    start = time.perf_counter()
    model = load_model(model_dir, device, config.trust_remote_code, method=config.method, input_kind="text")
    load_seconds = time.perf_counter() - start
    chosen = selections(config, model)["self"]
    layers, heads = chosen.layers, chosen.heads
    inputs = TextInputs(list(config.texts), model, config.max_length)
    lengths = np.array(inputs.widths, dtype=np.int64)
    rows = lengths if storage.rows == "all" else np.minimum(lengths, 1)
    per_text = len(layers) * len(heads) * rows * lengths
    values = 0 if storage.metrics_only else int(per_text.sum())
    width = int(getattr(model.hf_model.config, "hidden_size", 0) or model.hf_model.config.n_embd)

    order = np.argsort(lengths, kind="stable")
    count = min(CALIBRATION_TEXTS, len(order))
    picks = sorted(set(order[np.linspace(0, len(order) - 1, count).round().astype(int)].tolist()))
    if config.output.suffix == ".json":
        picks = picks[:1]
    sample = tuple(config.texts[i] for i in picks)
    with tempfile.TemporaryDirectory() as tmp:
        sample_config = dataclasses.replace(config, texts=sample, output=Path(tmp) / f"sample{config.output.suffix}",
                                            progress=False, verify=False)
        start = time.perf_counter()
        run_model(sample_config, storage, model, TextInputs(list(sample), model, config.max_length), device)
        sample_seconds = time.perf_counter() - start
        sample_bytes = (Path(tmp) / f"sample{config.output.suffix}").stat().st_size
    sample_values = int(per_text[picks].sum())
    if values and sample_values:
        file_bytes = sample_bytes / sample_values * values
    else:  # metrics only: per-text bookkeeping dominates
        file_bytes = sample_bytes / len(picks) * len(lengths)
    work = (_flops(lengths, model.num_layers, model.num_heads, width, config)
            / max(_flops(lengths[picks], model.num_layers, model.num_heads, width, config), 1.0))
    return Estimate(
        num_texts=len(lengths), num_tokens=int(lengths.sum()), num_values=values,
        raw_bytes=values * np.dtype(storage.dtype).itemsize, file_bytes=float(file_bytes),
        seconds=load_seconds + sample_seconds * work, load_seconds=load_seconds,
        calibration_texts=len(picks),
    )
