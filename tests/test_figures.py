"""Figures as a paper prints them, read back from the SVG text: labelled grids at any length,
token windows, colour limits, titles with the text id, L{layer}.H{head} panels, CJK glyphs.

Files are tiny synthetic ones (2 layers x 3 heads); every check goes through the CLI in-process.
"""

from __future__ import annotations

import os
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

import visualize_attention
from attnpipe.errors import run_cli
from attnpipe.store import Provenance, TextAttention, write_json
from attnpipe.visualize import fonts, plots

N = 40
TOKENS = ("[CLS]",) + tuple(f"tok{i}" for i in range(1, N - 1)) + ("[SEP]",)


def attention_file(folder: Path, tokens=TOKENS, text_id="news-007", name="a.json") -> Path:
    n = len(tokens)
    rng = np.random.default_rng(0)
    attention = rng.random((2, 3, n, n), dtype=np.float32) ** 6
    attention /= attention.sum(-1, keepdims=True)
    special = np.array([t.startswith("[") for t in tokens])
    item = TextAttention(id=text_id, text=" ".join(tokens), tokens=tuple(tokens), token_ids=np.arange(n),
                         special_tokens_mask=special, offsets=np.zeros((n, 2), np.int64),
                         word_ids=np.arange(n), truncated=False, num_tokens_untruncated=n, attention=attention)
    meta = Provenance(model="ckpts/step-1200", model_type="bert", weights_sha256="", weight_files=(),
                      num_layers=2, num_heads=3, layers=(0, 1), heads=(0, 1, 2), dtype="float32",
                      compute_dtype="float32", method="manual", max_length=n, trust_remote_code=False)
    path = folder / name
    write_json(path, item, meta)
    return path


def draw(path: Path, out: Path, *args: str) -> None:
    assert run_cli(visualize_attention.main, ["--input_file", str(path), "--output_file", str(out), *args]) == 0


def svg_texts(path: Path) -> list[str]:
    root = ET.parse(path).getroot()
    return ["".join(el.itertext()) for el in root.iter() if el.tag.endswith("}text")]


def tick_texts(fig, axis: str) -> list[list[str]]:
    return [[t.get_text() for t in getattr(ax, f"get_{axis}ticklabels")()] for ax in fig.axes if ax.get_label() != "<colorbar>"]


@pytest.fixture(scope="module")
def forty(tmp_path_factory) -> Path:
    return attention_file(tmp_path_factory.mktemp("figures"))


def test_a_40_token_heads_figure_labels_its_outer_panels_and_names_heads(forty, tmp_path):
    out = tmp_path / "heads.svg"
    draw(forty, out, "--mode", "heads", "--layer", "1")
    texts = svg_texts(out)
    for token in TOKENS:  # every token is text on the figure: 40 fit at 6 pt, none thinned
        assert texts.count(token) >= 2, token  # at least one query and one key label
    # 3 heads in one row: each panel is the lowest of its column (key labels), the first alone
    # carries the query labels.
    assert texts.count("tok7") == 3 + 1
    assert [t for t in texts if t.startswith("L1.H")] == ["L1.H0", "L1.H1", "L1.H2"]
    title = next(t for t in texts if "every head" in t)
    assert "text news-007" in title and "ckpts/step-1200" in title and "layer 1" in title
    assert not any("labelled" in t for t in texts)  # nothing thinned, so nothing claims it


def test_long_grids_thin_labels_and_say_so_truthfully(tmp_path):
    tokens = tuple(f"w{i}" for i in range(150))
    path = attention_file(tmp_path, tokens)
    out = tmp_path / "heads.svg"
    draw(path, out, "--mode", "average", "--layer", "all")
    texts = svg_texts(out)
    note = next(t for t in texts if "labelled" in t)
    step = int(note.split("every ")[1].split()[0][:-2])
    labelled = [t for t in tokens if t in texts]
    assert labelled == list(tokens[::step])  # exactly every step-th token, as the note says
    assert "layer 0" in texts and "layer 1" in texts


def test_token_window_and_hidden_specials_for_every_mode(forty, tmp_path):
    for mode in ("plot", "heads", "layers", "average"):
        out = tmp_path / f"{mode}.svg"
        draw(forty, out, "--mode", mode, "--tokens-range=-12:", "--hide-special")
        texts = svg_texts(out)
        note = " ".join(texts)
        assert "tokens 28-39 of 40 shown (--tokens-range)" in note, mode
        assert "1 special token hidden" in note, mode
        if mode != "layers":  # the model view has no token labels
            assert "tok38" in texts and "tok27" not in texts and "[SEP]" not in texts, mode
    out = tmp_path / "window.svg"
    draw(forty, out, "--tokens-range", "10:20")
    assert [t for t in svg_texts(out) if t.startswith("tok") and " " not in t] == [f"tok{i}" for i in range(10, 20)] * 2


def test_title_font_size_and_colour_limits(forty, tmp_path):
    out = tmp_path / "t.svg"
    draw(forty, out, "--title", "Figure 3: induction head", "--font-size", "11", "--color-scale", "fixed",
         "--vmax", "0.5", "--head", "2")
    root = ET.parse(out).getroot()
    texts = svg_texts(out)
    assert "Figure 3: induction head" in texts
    label = next(el for el in root.iter() if el.tag.endswith("}text") and "".join(el.itertext()) == "tok3")
    assert "11px" in label.get("style", "") or "font-size: 11" in label.get("style", "")
    assert "0.5" in texts  # the colour bar ends at --vmax

    log_out = tmp_path / "log.svg"
    draw(forty, log_out, "--mode", "heads", "--log", "--vmin", "0.001")
    log_texts = svg_texts(log_out)
    assert {"0.001", "0.01", "0.1"} <= set(log_texts) and not [t for t in log_texts if "mathdefault" in t]

    view = plots.make_view(TOKENS)
    matrix = np.linspace(0, 0.2, N * N).reshape(N, N)
    figure = plots.Colors().norm(matrix)
    assert (figure.vmin, figure.vmax) == (0.0, pytest.approx(0.2))  # default: 0 to the largest shown
    assert plots.Colors(scale="fixed").norm(matrix).vmax == 1.0
    log = plots.Colors(log=True, vmin=1e-4).norm(matrix)
    assert type(log).__name__ == "LogNorm" and log.vmin == 1e-4
    fig = plots.heads_figure(np.stack([matrix, matrix * 3]), view, [0, 1], "t", layer=0,
                             style=plots.Style(colors=plots.Colors(scale="panel")))
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 2  # one colour bar per panel
    limits = [ax.images[0].norm.vmax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]
    assert limits == [pytest.approx(0.2), pytest.approx(0.6)]


@pytest.mark.parametrize("args, words", [
    (["--tokens-range", "30:10"], ["--tokens-range 30:10", "no token"]),
    (["--tokens-range", "5"], ["--tokens-range", "A:B"]),
    (["--max-tokens", "5", "--tokens-range", "0:5"], ["not both"]),
    (["--vmin", "0.5", "--vmax", "0.2"], ["--vmin 0.5", "below --vmax"]),
    (["--log", "--vmin", "0"], ["--log", "above 0"]),
    (["--font-size", "0"], ["--font-size"]),
])
def test_bad_figure_options_refuse_in_one_line(forty, tmp_path, capsys, args, words):
    out = tmp_path / "x.png"
    assert run_cli(visualize_attention.main, ["--input_file", str(forty), "--output_file", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and all(w in err for w in words), err
    assert not out.exists()


def test_cjk_tokens_draw_without_a_glyph_warning(tmp_path):
    if not fonts.has_cjk():
        message = "no CJK font: apt-get install fonts-noto-cjk (make fonts does this)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    tokens = ("[CLS]", "猫", "が", "好き", "です", "한국어", "中文", "[SEP]")
    path = attention_file(tmp_path, tokens, text_id="ja-001")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        draw(path, tmp_path / "cjk.png", "--mode", "heads")
        fig = plots.head_figure(np.eye(len(tokens)), plots.make_view(tokens), "猫")
        FigureCanvasAgg(fig).draw()
    assert not [w for w in caught if "Glyph" in str(w.message)], [str(w.message) for w in caught]
    assert tick_texts(fig, "x")[0] == list(tokens)
    assert any("CJK" in family for family in fonts.fallback_chain())


def test_checkpoints_are_named_on_the_compare_axis_and_in_the_report(tmp_path):
    import dataclasses

    import analyze_attention
    from attnpipe.store import open_attention

    paths = []
    for step, power in (("step-100", 1), ("step-300", 8)):
        folder = tmp_path / step
        folder.mkdir()
        path = attention_file(folder, TOKENS[:6])
        with open_attention(path) as f:
            item, meta = f[0], f.meta
        item = dataclasses.replace(item, attention=(item.attention ** power) / (item.attention ** power).sum(-1, keepdims=True))
        write_json(path, item, dataclasses.replace(meta, model=f"runs/{step}"))
        paths.append(str(path))
    out = tmp_path / "report"
    assert run_cli(analyze_attention.main, ["report", *paths, "--output-dir", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| 0 | step-100 |" in text and "| 1 | step-300 |" in text  # the files table
    changes = text.split("## Changes across checkpoints")[1]
    assert "step-300" in changes and "L0.H" in changes
    assert "| 1 | " not in changes  # checkpoints named, not numbered
    from attnpipe.analyze.compare import checkpoint_distances
    from attnpipe.visualize.analysis_plots import change_by_checkpoint
    from matplotlib.figure import Figure
    from contextlib import ExitStack

    with ExitStack() as stack:
        files = [stack.enter_context(open_attention(p)) for p in paths]
        table = checkpoint_distances(files)
    ax = change_by_checkpoint(Figure().subplots(), table)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["step-300"]
