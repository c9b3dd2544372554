"""analyze_attention.py: tables written, errors as one line, on files built with the store's writer
(and one file extracted from a tiny saved model, run as a user types it)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

import analyze_attention
from attnpipe.analyze import metrics as M
from attnpipe import store
from attnpipe.errors import run_cli
from conftest import run_script

PROVENANCE = store.Provenance(
    model="/m", model_type="bert", weights_sha256="ab", weight_files=("model.safetensors",),
    num_layers=6, num_heads=12, layers=(3, 4), heads=(1, 5, 7), dtype="float32",
    compute_dtype="float32", method="manual", max_length=512, trust_remote_code=False,
)


def item(rng, text_id: str, n: int) -> store.TextAttention:
    logits = rng.normal(size=(2, 3, n, n)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    tokens = ("[CLS]", *(["cat", ",", "sat", "."] * n)[: n - 2], "[SEP]") if n > 1 else ("[CLS]",)
    return store.TextAttention(
        id=text_id, text=" ".join(tokens), tokens=tokens, token_ids=np.arange(n),
        special_tokens_mask=np.array([t.startswith("[") for t in tokens]), offsets=np.zeros((n, 2), int),
        word_ids=np.full(n, -1), truncated=False, num_tokens_untruncated=n, attention=probs.astype(np.float32),
    )


def write_corpus(path: Path, lengths=(5, 8, 3, 6)) -> list[store.TextAttention]:
    rng = np.random.default_rng(0)
    items = [item(rng, f"text-{i}", n) for i, n in enumerate(lengths)]
    with store.H5Writer(path, num_texts=len(items), dtype="float32") as writer:
        for index, it in enumerate(items):
            writer.write(index, it)
        writer.finish(PROVENANCE)
    return items


def one_line_error(capsys, argv, *needles) -> str:
    capsys.readouterr()  # drop what earlier calls printed
    assert run_cli(analyze_attention.main, argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def test_metrics_writes_long_and_aggregate_tables(tmp_path):
    items = write_corpus(tmp_path / "a.h5")
    out = tmp_path / "out" / "m"
    assert analyze_attention.main(["metrics", str(tmp_path / "a.h5"), "--output-dir", str(out)]) == 0
    long = pd.read_parquet(out / "metrics.parquet")
    assert list(long.columns) == list(M.LONG_COLUMNS)
    assert len(long) == 4 * 2 * 3 * len(M.METRICS)
    assert sorted(long.layer.unique()) == [3, 4] and sorted(long["head"].unique()) == [1, 5, 7]
    csv = pd.read_csv(out / "metrics.csv", keep_default_na=True)
    np.testing.assert_allclose(csv.value.to_numpy(), long.value.to_numpy(), rtol=1e-12, equal_nan=True)
    # a value in the table is the library's value for that text, layer, head
    direct = M.head_metrics(items[1].attention, items[1].tokens, items[1].special_tokens_mask)
    got = long[(long.text_id == "text-1") & (long.layer == 4) & (long["head"] == 5) & (long.metric == "entropy")]
    assert got.value.item() == pytest.approx(direct["entropy"][1, 1])
    agg = pd.read_parquet(out / "aggregate.parquet")
    assert len(agg) == 2 * 3 * len(M.METRICS)
    assert set(agg.columns) >= {"layer", "head", "metric", "n_texts", "mean", "std", "ci_low", "ci_high", "label"}
    assert set(agg[agg.metric == "local_share"].label) <= {"local", "global"}
    sidecar = json.loads((out / "metrics.columns.json").read_text())
    assert set(sidecar["tables"]["metrics"]) == set(long.columns)
    assert set(sidecar["tables"]["aggregate"]) == set(agg.columns)
    assert sidecar["source"]["weights_sha256"] == "ab"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_metrics_subset_and_unknown_name(tmp_path, capsys):
    write_corpus(tmp_path / "a.h5")
    out = tmp_path / "out"
    assert analyze_attention.main(["metrics", str(tmp_path / "a.h5"), "--output-dir", str(out),
                                   "--metrics", "self, entropy"]) == 0
    assert set(pd.read_parquet(out / "metrics.parquet").metric) == {"self", "entropy"}
    one_line_error(capsys, ["metrics", str(tmp_path / "a.h5"), "--output-dir", str(tmp_path / "o2"),
                            "--metrics", "entropy,attention_to_cats"], "attention_to_cats", "entropy")
    assert not (tmp_path / "o2" / "metrics.parquet").exists()


def test_empty_corpus_and_foreign_files_are_one_line_errors(tmp_path, capsys):
    with store.H5Writer(tmp_path / "empty.h5", num_texts=0, dtype="float32") as writer:
        writer.finish(PROVENANCE)
    one_line_error(capsys, ["metrics", str(tmp_path / "empty.h5"), "--output-dir", str(tmp_path / "o")],
                   "holds no texts")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = [1]
    one_line_error(capsys, ["summary", str(foreign)], "not an attnpipe attention file")
    (tmp_path / "notes.txt").write_text("hello")
    one_line_error(capsys, ["summary", str(tmp_path / "notes.txt")], "unknown attention file type")
    one_line_error(capsys, ["summary", str(tmp_path / "missing.h5")], "not found")
    write_corpus(tmp_path / "a.h5")
    (tmp_path / "afile").write_text("")
    one_line_error(capsys, ["metrics", str(tmp_path / "a.h5"), "--output-dir", str(tmp_path / "afile")],
                   "not a folder")


def test_summary_prints_seed_000_lines(tmp_path, capsys):
    write_corpus(tmp_path / "a.h5")
    assert analyze_attention.main(["summary", str(tmp_path / "a.h5")]) == 0
    out = capsys.readouterr().out
    assert "Layers with attention: 2" in out
    for label in ("Avg entropy", "Avg max attention", "Diagonal strength"):
        assert out.count(f"- {label}: ") == 2
    assert "layer 3:" in out and "layer 4:" in out


def test_rollout_subcommand(tmp_path, capsys):
    items = write_corpus(tmp_path / "a.h5")
    out = tmp_path / "r"
    assert analyze_attention.main(["rollout", str(tmp_path / "a.h5"), "--output-dir", str(out),
                                   "--query", "all", "--head-fusion", "max"]) == 0
    table = pd.read_parquet(out / "rollout.parquet")
    assert len(table) == sum(it.num_tokens ** 2 for it in items)
    from attnpipe.analyze.rollout import rollout

    first = table[table.text_id == "text-0"].pivot(index="query", columns="key", values="value").to_numpy()
    np.testing.assert_allclose(first, rollout(items[0].attention, "max"))
    assert analyze_attention.main(["rollout", str(tmp_path / "a.h5"), "--output-dir", str(out),
                                   "--start-layer", "4"]) == 0
    assert len(pd.read_parquet(out / "rollout.parquet")) == sum(it.num_tokens for it in items)  # cls rows
    one_line_error(capsys, ["rollout", str(tmp_path / "a.h5"), "--output-dir", str(out), "--start-layer", "0"],
                   "not stored")


@pytest.mark.slow  # four subprocesses, one of them loading torch: 20-50 s
def test_extracted_file_end_to_end(tiny_model_dir, tmp_path):
    """As a user types it: extract from a tiny saved BERT, then metrics and summary."""
    h5 = tmp_path / "tiny.h5"
    texts = tmp_path / "texts.txt"
    texts.write_text("the cat sat on the mat .\nit was red , and it ran fast !\n")
    proc = run_script("extract_attention.py", "--model_dir", tiny_model_dir("bert"), "--texts-file", texts,
                      "--output_file", h5, "--quiet")
    assert proc.returncode == 0, proc.stderr
    proc = run_script("analyze_attention.py", "metrics", h5, "--output-dir", tmp_path / "m")
    assert proc.returncode == 0, proc.stderr
    long = pd.read_parquet(tmp_path / "m" / "metrics.parquet")
    assert len(long) == 2 * 2 * 4 * len(M.METRICS)  # 2 texts, 2 layers, 4 heads
    punct = long[long.metric == "punctuation"].value
    assert (punct > 0).all()  # every text has punctuation keys
    proc = run_script("analyze_attention.py", "summary", h5)
    assert proc.returncode == 0 and "Avg entropy" in proc.stdout
    proc = run_script("analyze_attention.py", "metrics", h5, "--output-dir", tmp_path / "x", "--metrics", "nope")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr


def test_flow_subcommand(tmp_path, capsys):
    items = write_corpus(tmp_path / "a.h5")
    out = tmp_path / "f"
    assert analyze_attention.main(["flow", str(tmp_path / "a.h5"), "--output-dir", str(out),
                                   "--max-texts", "2", "--query", "last"]) == 0
    table = pd.read_parquet(out / "flow.parquet")
    assert list(table.text_id.unique()) == ["text-0", "text-1"]
    assert len(table) == items[0].num_tokens + items[1].num_tokens
    np.testing.assert_allclose(table.groupby("text_id").value.sum(), 1.0)
    from attnpipe.analyze.flow import attention_flow

    first = table[table.text_id == "text-0"].value.to_numpy()
    np.testing.assert_allclose(first, attention_flow(items[0].attention, query="last")[0])
    one_line_error(capsys, ["flow", str(tmp_path / "a.h5"), "--output-dir", str(out), "--max-texts", "0"],
                   "--max-texts")


def test_clusters_and_compare_subcommands(tmp_path, capsys):
    import dataclasses

    items = write_corpus(tmp_path / "a.h5")
    out = tmp_path / "c"
    assert analyze_attention.main(["clusters", str(tmp_path / "a.h5"), "--output-dir", str(out),
                                   "--clusters", "3"]) == 0
    clusters = pd.read_parquet(out / "clusters.parquet")
    assert len(clusters) == 6 and set(clusters.cluster) == {1, 2, 3}
    assert len(pd.read_parquet(out / "head_distances.parquet")) == 36
    assert (out / "clusters.png").stat().st_size > 0
    one_line_error(capsys, ["clusters", str(tmp_path / "a.h5"), "--output-dir", str(out), "--clusters", "9"],
                   "out of range")

    changed = [dataclasses.replace(it, attention=it.attention[:, ::-1].copy()) for it in items]
    with store.H5Writer(tmp_path / "b.h5", num_texts=len(changed), dtype="float32") as writer:
        for index, it in enumerate(changed):
            writer.write(index, it)
        writer.finish(PROVENANCE)
    assert analyze_attention.main(["compare", str(tmp_path / "a.h5"), str(tmp_path / "b.h5"),
                                   "--output-dir", str(out), "--metrics", "entropy"]) == 0
    distances = pd.read_parquet(out / "checkpoint_distances.parquet")
    assert len(distances) == 6 and (distances[distances["head"] != 5].js_to_previous > 0).all()
    assert np.allclose(distances[distances["head"] == 5].js_to_previous, 0, atol=1e-6)  # middle head unmoved
    assert set(pd.read_parquet(out / "checkpoint_metrics.parquet").checkpoint) == {0, 1}
    assert (out / "checkpoints.png").stat().st_size > 0

    other = [dataclasses.replace(items[0], id="other"), *items[1:]]
    with store.H5Writer(tmp_path / "c.h5", num_texts=len(other), dtype="float32") as writer:
        for index, it in enumerate(other):
            writer.write(index, it)
        writer.finish(PROVENANCE)
    one_line_error(capsys, ["compare", str(tmp_path / "a.h5"), str(tmp_path / "c.h5"), "--output-dir", str(out)],
                   "different texts")
    one_line_error(capsys, ["compare", str(tmp_path / "a.h5"), "--output-dir", str(out)], "at least two")


def test_report_for_one_file_and_for_checkpoints(tmp_path):
    import dataclasses

    items = write_corpus(tmp_path / "a.h5")
    out = tmp_path / "rep"
    assert analyze_attention.main(["report", str(tmp_path / "a.h5"), "--output-dir", str(out)]) == 0
    text = (out / "report.md").read_text()
    for section in ("## Per layer", "## Most focused heads", "## Positional heads", "## Special-token heads",
                    "## Head clusters", "entropy_by_layer.png"):
        assert section in text
    assert "## Changes across checkpoints" not in text
    assert (out / "entropy_by_layer.png").stat().st_size > 0
    changed = [dataclasses.replace(it, attention=it.attention[::-1].copy()) for it in items]
    with store.H5Writer(tmp_path / "b.h5", num_texts=len(changed), dtype="float32") as writer:
        for index, it in enumerate(changed):
            writer.write(index, it)
        writer.finish(PROVENANCE)
    assert analyze_attention.main(["report", str(tmp_path / "a.h5"), str(tmp_path / "b.h5"),
                                   "--output-dir", str(out), "--clusters", "2"]) == 0
    text = (out / "report.md").read_text()
    assert "## Changes across checkpoints" in text and (out / "checkpoints.png").exists()
    assert text.count("- cluster ") == 2


def test_specialization_subcommand(tmp_path, capsys):
    write_corpus(tmp_path / "a.h5")
    out = tmp_path / "s"
    assert analyze_attention.main(["specialization", str(tmp_path / "a.h5"), "--output-dir", str(out),
                                   "--layer", "4"]) == 0
    table = pd.read_parquet(out / "specialization.parquet")
    assert list(table["layer"]) == [4, 4, 4] and list(table["head"]) == [1, 5, 7]
    assert table["consistency"].between(0, 1).all() and (table["n_texts"] == 4).all()
    assert (out / "head_specialization.png").stat().st_size > 0
    one_line_error(capsys, ["specialization", str(tmp_path / "a.h5"), "--output-dir", str(out), "--layer", "0"],
                   "--layer 0 is not stored", "3, 4")


def test_each_subcommand_is_one_library_function_with_the_flags_as_arguments(tmp_path, capsys):
    """analyze_attention.py is argparse over attnpipe.analyze.commands: the same call from Python
    writes the same tables, and every subcommand's argparse dests are that function's parameters."""
    import inspect

    from attnpipe.analyze import commands

    write_corpus(tmp_path / "a.h5")
    outcome = commands.run_rollout(tmp_path / "a.h5", output_dir=tmp_path / "py", query="all")
    assert outcome.stdout == "" and outcome.stderr.startswith("wrote rollout of 4 text(s): ")
    assert analyze_attention.main(["rollout", str(tmp_path / "a.h5"), "--output-dir", str(tmp_path / "cli"),
                                   "--query", "all"]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "py" / "rollout.parquet"),
                                  pd.read_parquet(tmp_path / "cli" / "rollout.parquet"))
    summary = commands.run_summary(tmp_path / "a.h5")
    assert analyze_attention.main(["summary", str(tmp_path / "a.h5")]) == 0
    assert capsys.readouterr().out == summary.stdout + "\n"
    subparsers = next(a for a in analyze_attention.build_parser()._actions if a.dest == "command")
    assert set(subparsers.choices) == set(commands.COMMANDS)
    for name, parser in subparsers.choices.items():
        actions = {a.dest: a for a in parser._actions if a.dest != "help"}
        parameters = inspect.signature(commands.COMMANDS[name]).parameters
        assert set(actions) == set(parameters), name
        for dest, parameter in parameters.items():  # a Python caller gets the CLI's defaults
            if parameter.default is not inspect.Parameter.empty:
                assert parameter.default == actions[dest].default, (name, dest)
