"""The writer thread (attnpipe.extract.background): overlapped and deferred calls, the byte budget,
errors, and the plan the runner picks; then whole extractions under each plan write the same file."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from attnpipe.errors import AttnpipeError
from attnpipe.extract import runner
from attnpipe.extract.background import HEAVY_LAYER_VALUES, BackgroundWriter, WriterPlan, is_heavy, writer_plan
from attnpipe.extract.loading import default_model_dir, load_model
from attnpipe.models.parts import layer_matrix_values
from attnpipe.extract.corpus import Text


class Log:
    def __init__(self):
        self.calls: list[int] = []
        self.thread: set[str] = set()

    def put(self, value: int) -> None:
        self.thread.add(threading.current_thread().name)
        self.calls.append(value)


def settle() -> None:
    time.sleep(0.05)  # long enough for a free writer thread to have run what it was given


def wait_for(condition, timeout: float = 10.0) -> bool:
    """Poll until condition() holds (a loaded machine may schedule the writer late)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_an_overlapped_writer_runs_calls_as_they_come_in_order():
    log = Log()
    writer = BackgroundWriter(log, 1 << 20)
    for i in range(5):
        writer.submit("put", i)
    assert wait_for(lambda: len(log.calls) == 5), "an overlapped writer did not run its calls"
    assert log.calls == [0, 1, 2, 3, 4] and log.thread == {"attnpipe-writer"}
    writer.close()


def test_a_deferred_writer_holds_calls_until_asked_then_holds_again():
    log = Log()
    writer = BackgroundWriter(log, 1 << 20, deferred=True)
    writer.submit("put", 1)
    writer.submit("put", 2)
    settle()
    assert log.calls == []
    writer.run_queued()  # returns once both have run
    assert log.calls == [1, 2]
    writer.submit("put", 3)
    settle()
    assert log.calls == [1, 2]
    writer.close()  # close runs what is left
    assert log.calls == [1, 2, 3]


def test_a_deferred_writer_runs_calls_when_the_queue_is_full():
    """A batch bigger than the budget must not wait for run_queued forever: the held writer
    makes room for each submit that waits."""
    log = Log()
    writer = BackgroundWriter(log, 100, deferred=True)
    done = threading.Event()

    def producer():
        for i in range(20):
            writer.submit("put", i, nbytes=60)  # two never fit at once
        done.set()

    threading.Thread(target=producer, daemon=True).start()
    assert done.wait(10), "a submit over the budget waited on a held writer"
    assert log.calls == list(range(19))  # the last one waits in the queue for run_queued
    writer.run_queued()
    assert log.calls == list(range(20))
    writer.close()


def test_an_error_in_the_writer_reaches_the_main_thread_once_and_drops_the_queue():
    log = Log()

    def fail():
        raise AttnpipeError("broken layer")

    for deferred in (False, True):
        writer = BackgroundWriter(log, 1 << 20, deferred=deferred)
        writer.submit(fail)
        writer.submit("put", 7)
        if deferred:
            with pytest.raises(AttnpipeError, match="broken layer"):
                writer.run_queued()
        else:
            assert wait_for(lambda writer=writer: writer._error is not None)
            with pytest.raises(AttnpipeError, match="broken layer"):
                writer.submit("put", 8)
        with pytest.raises(AttnpipeError, match="broken layer"):
            writer.close()
    assert log.calls == []


def test_abort_drops_a_deferred_queue():
    log = Log()
    writer = BackgroundWriter(log, 1 << 20, deferred=True)
    writer.submit("put", 1)
    writer.abort()
    assert log.calls == []


def test_the_plan_defers_only_when_torch_fills_the_cores_with_a_heavy_model():
    assert writer_plan(True, 2, 2, True) == WriterPlan(deferred=True, encode_threads=2)
    assert writer_plan(True, 8, 4, True) == WriterPlan(deferred=True, encode_threads=4)
    assert writer_plan(True, 2, 2, False) == WriterPlan(deferred=False, encode_threads=1)
    assert writer_plan(True, 1, 2, True) == WriterPlan(deferred=False, encode_threads=1)
    assert writer_plan(True, 4, 16, True) == WriterPlan(deferred=False, encode_threads=12)
    assert writer_plan(False, 16, 16, True) == WriterPlan(deferred=False, encode_threads=15)  # a GPU run
    assert writer_plan(False, 1, 1, True) == WriterPlan(deferred=False, encode_threads=1)


def test_heavy_counts_weight_matrices_and_attention_at_the_longest_input():
    minilm, small = 4 * 384 * 384 + 2 * 384 * 1536, 12 * 64 * 64  # the bench's small BERT: 64 wide
    assert is_heavy(minilm, 16) and is_heavy(minilm, 512)
    assert not is_heavy(small, 512)  # 49 k + 2 x 512 x 64
    assert is_heavy(small, 4096)  # long inputs: attention is the work
    assert not is_heavy(HEAVY_LAYER_VALUES - 1, 0) and is_heavy(HEAVY_LAYER_VALUES, 0)


def test_a_light_model_runs_on_one_torch_thread_unless_told(tiny_model_dir, tmp_path, monkeypatch):
    """The tiny test BERT is light: its run takes one torch thread (given back afterwards);
    --threads still decides; --method hf (whose layers are not measured) and a heavy model keep
    torch's default."""
    seen = []
    real = runner.run

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run", spy)
    before = torch.get_num_threads()
    texts = (Text("a", "the cat sat"),)
    for threads, method in ((None, "manual"), (2, "manual"), (None, "hf")):  # --method hf: layers not measured
        runner.extract(runner.ExtractConfig(texts=texts, output=tmp_path / "a.h5", model_dir=tiny_model_dir("bert"),
                                            progress=False, threads=threads, method=method))
    monkeypatch.setattr(runner, "run_is_heavy", lambda model, inputs: True)
    runner.extract(runner.ExtractConfig(texts=texts, output=tmp_path / "a.h5", model_dir=tiny_model_dir("bert"),
                                        progress=False))
    assert seen == [1, 2, before, before] and torch.get_num_threads() == before


def test_layer_matrix_values_counts_one_layers_weight_matrices(tiny_model_dir):
    """MiniLM (the packaged model: 384 wide, 1,536 inner) and the tiny test models of two families."""
    for folder, expected in ((default_model_dir(), 4 * 384 * 384 + 2 * 384 * 1536), (tiny_model_dir("bert"), None),
                             (tiny_model_dir("gpt2"), None)):
        model = load_model(folder, torch.device("cpu"))
        config = json.loads((Path(folder) / "config.json").read_text())
        width = config.get("hidden_size", config.get("n_embd"))
        inner = config.get("intermediate_size") or config.get("n_inner") or 4 * width
        assert layer_matrix_values(model.weights) == (expected or 4 * width * width + 2 * width * inner), folder
    assert layer_matrix_values(object()) is None  # --method hf: counted as heavy


TEXTS = tuple(Text(f"t{i}", " ".join(["the cat sat on the mat"] * (1 + i % 5))) for i in range(23))
PLANS = {"deferred": WriterPlan(True, 2), "overlapped": WriterPlan(False, 1), "overlapped-3": WriterPlan(False, 3)}


@pytest.mark.parametrize("options", [dict(dtype="float16"), dict(dtype="uint8", rows="cls"),
                                     dict(dtype="float32", compression="lzf"), dict(metrics_only=True)],
                         ids=["float16", "uint8-cls", "lzf", "metrics-only"])
def test_every_writer_plan_writes_the_same_bytes(tiny_model_dir, tmp_path, monkeypatch, options):
    """Deferred or overlapped, guards and conversion in either thread, chunks compressed by one
    thread or several: the same file, byte for byte (batches of 4 texts: several per run)."""
    files = {}
    for name, plan in PLANS.items():
        monkeypatch.setattr(runner, "writer_plan", lambda *args, plan=plan: plan)
        path = tmp_path / f"{name}.h5"
        runner.extract(runner.ExtractConfig(texts=TEXTS, output=path, model_dir=tiny_model_dir("bert"),
                                            progress=False, batch_size=4, **options))
        files[name] = path.read_bytes()
    assert files["deferred"] == files["overlapped"] == files["overlapped-3"]
