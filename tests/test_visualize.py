"""visualize_attention.py and the modules behind it: figures opened as images, the prepared
JSON against its schema and the stored attention, the HTML page's escaping, bad input.

Most tests call `main` in-process on small synthetic attention files (written with the store's
own writers); the seed-001 command lines run as subprocesses, as a user types them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

import visualize_attention
from attnpipe.visualize import plots
from attnpipe.errors import run_cli
from attnpipe.visualize.prepare import prepare
from attnpipe.store import H5Writer, Provenance, TextAttention, open_attention, write_json
from attnpipe.errors import AttnpipeError
from attnpipe.visualize import viewer
from attnpipe.visualize.viewer import Panel, page_data, render_html
from conftest import ROOT, run_script

SCHEMA = json.loads((ROOT / "docs" / "prepared.schema.json").read_text())
VIRIDIS_TOP = np.array([253, 231, 37])  # viridis(1.0) in 0-255
VIRIDIS_BOTTOM = np.array([68, 1, 84])  # viridis(0.0)
EVIL = "</script><img src=x onerror=alert(1)>"


def provenance(layers=(0, 1), heads=(0, 1, 2), num_layers=2, num_heads=3) -> Provenance:
    return Provenance(
        model="/models/synthetic-bert", model_type="bert", weights_sha256="0" * 64, weight_files=("w",),
        num_layers=num_layers, num_heads=num_heads, layers=tuple(layers), heads=tuple(heads),
        dtype="float32", compute_dtype="float32", method="manual", max_length=512,
        trust_remote_code=False, library_versions={"attnpipe": "test"},
    )


def item(attention: np.ndarray, tokens=None, text_id="t0") -> TextAttention:
    n = attention.shape[-1]
    tokens = tuple(tokens or [f"tok{i}" for i in range(n)])
    return TextAttention(
        id=text_id, text=" ".join(tokens), tokens=tokens, token_ids=np.arange(n),
        special_tokens_mask=np.zeros(n, bool), offsets=np.zeros((n, 2), np.int64),
        word_ids=np.arange(n), truncated=False, num_tokens_untruncated=n,
        attention=attention.astype(np.float32),
    )


def random_attention(rng, layers: int, heads: int, n: int) -> np.ndarray:
    logits = rng.normal(size=(layers, heads, n, n)) * 2
    probs = np.exp(logits)
    return probs / probs.sum(-1, keepdims=True)  # (layer, head, query, key)


def hot_cell_attention(n: int, query: int, key: int, layers=2, heads=3) -> np.ndarray:
    """1.0 at (query, key) of every head, 0 elsewhere in that row, other rows uniform (1/n):
    one unmistakable cell, in rows that sum to 1 as the reader requires."""
    attention = np.full((layers, heads, n, n), 1.0 / n, np.float32)
    attention[:, :, query, :] = 0.0
    attention[:, :, query, key] = 1.0
    return attention


@pytest.fixture
def synthetic_json(tmp_path) -> Path:
    path = tmp_path / "synthetic.json"
    write_json(path, item(hot_cell_attention(6, query=1, key=4)), provenance())
    return path


@pytest.fixture
def corpus_h5(tmp_path) -> Path:
    """Three texts of different lengths; layers 1 and 3, heads 0, 2, 5 of a 4-layer, 6-head model."""
    rng = np.random.default_rng(0)
    path = tmp_path / "corpus.h5"
    meta = provenance(layers=(1, 3), heads=(0, 2, 5), num_layers=4, num_heads=6)
    with H5Writer(path, 3, "float32") as writer:
        for i, n in enumerate((5, 9, 7)):
            writer.write(i, item(random_attention(rng, 2, 3, n), text_id=f"doc-{i}"))
        writer.finish(meta)
    return path


def visualize(*argv) -> int:
    return run_cli(visualize_attention.main, [str(a) for a in argv])


def ok(*argv) -> None:
    assert visualize(*argv) == 0


def rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_not_blank(pixels: np.ndarray) -> None:
    non_white = np.any(pixels < 245, axis=-1).mean()
    assert non_white > 0.15, f"only {non_white:.1%} of the image is drawn"
    assert pixels.std() > 30, "the image is nearly uniform"


def near(pixels: np.ndarray, colour: np.ndarray, tol: int = 40) -> np.ndarray:
    return np.abs(pixels - colour).sum(-1) < tol


# ----------------------------------------------------------------------------- figures as images


def test_hot_cell_lands_at_its_query_row_and_key_column(synthetic_json, tmp_path):
    out = tmp_path / "hot.png"
    ok("--input_file", synthetic_json, "--layer", "1", "--head", "2", "--output_file", out, "--dpi", "80")
    pixels = rgb(out)
    height, width, _ = pixels.shape

    # The same figure, drawn here, tells where data cell (query 1, key 4) sits on the page.
    with open_attention(synthetic_json) as attn:
        text = attn[0]
    fig = plots.head_figure(text.attention[1, 2], plots.make_view(text.tokens, None), "x")
    fig.set_dpi(80)
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    assert (round(fig.get_figwidth() * 80), round(fig.get_figheight() * 80)) == (width, height)

    def to_pixel(col: float, row: float) -> tuple[int, int]:
        x, y = fig.transFigure.inverted().transform(ax.transData.transform((col, row)))
        return int(round(x * width)), int(round((1 - y) * height))

    x, y = to_pixel(4, 1)  # imshow: column = key, row = query
    assert near(pixels[y, x], VIRIDIS_TOP).all(), f"hot cell pixel {pixels[y, x]} is not yellow"
    for col, row in [(0, 1), (1, 1), (5, 1)]:  # the rest of the hot row: weight 0
        cx, cy = to_pixel(col, row)
        assert near(pixels[cy, cx], VIRIDIS_BOTTOM).all(), f"cell (q={row}, k={col}) is not dark"
    for col, row in [(1, 4), (0, 0), (5, 5), (4, 2)]:  # transposed, corners, the row below: 1/6 each
        cx, cy = to_pixel(col, row)
        assert not near(pixels[cy, cx], VIRIDIS_TOP).all(), f"cell (q={row}, k={col}) is yellow"
    # And the only yellow inside the heatmap is that cell.
    x0, y0 = to_pixel(-0.5, -0.5)
    x1, y1 = to_pixel(5.5, 5.5)
    ys, xs = np.nonzero(near(pixels[y0:y1, x0:x1], VIRIDIS_TOP))
    cell = (x1 - x0) / 6
    assert np.all(np.abs(xs + x0 - x) < cell) and np.all(np.abs(ys + y0 - y) < cell)


@pytest.mark.parametrize("mode", ["plot", "heads", "layers", "average"])
def test_every_figure_kind_has_the_expected_size_and_is_drawn(mode, corpus_h5, tmp_path):
    out = tmp_path / f"{mode}.png"
    ok("--input_file", corpus_h5, "--index", "1", "--mode", mode, "--layer", "3", "--head", "5",
       "--output_file", out, "--dpi", "72")
    pixels = rgb(out)
    assert pixels.shape[0] >= 250 and pixels.shape[1] >= 250
    assert_not_blank(pixels)
    assert near(pixels, VIRIDIS_BOTTOM, 120).any()  # the colormap is there


def test_plot_size_follows_dpi(synthetic_json, tmp_path):
    sizes = []
    for dpi in (50, 100):
        ok("--input_file", synthetic_json, "--output_file", tmp_path / f"d{dpi}.png", "--dpi", dpi)
        with Image.open(tmp_path / f"d{dpi}.png") as image:
            sizes.append(image.size)
    assert abs(sizes[1][0] - 2 * sizes[0][0]) <= 2 and abs(sizes[1][1] - 2 * sizes[0][1]) <= 2


@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf"])
def test_same_input_gives_byte_identical_files(suffix, corpus_h5, tmp_path):
    tokens = "$x$,\\frac,a_b,%,&,é,[SEP],x,y"  # math and special characters drawn literally
    outs = [tmp_path / f"a{suffix}", tmp_path / f"b{suffix}"]
    for out in outs:
        ok("--input_file", corpus_h5, "--index", "1", "--mode", "heads", "--layer", "1",
           "--tokens", tokens, "--output_file", out)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    if suffix == ".svg":  # a fresh process must agree too (SVG ids are salted per process otherwise)
        third = tmp_path / "c.svg"
        proc = run_script("visualize_attention.py", "--input_file", corpus_h5, "--index", "1", "--mode",
                          "heads", "--layer", "1", "--tokens", tokens, "--output_file", third)
        assert proc.returncode == 0, proc.stderr
        assert third.read_bytes() == outs[0].read_bytes()


def test_math_like_tokens_are_drawn_literally(tmp_path):
    """With mathtext on, "$\\frac$" makes savefig raise; here every format saves and keeps the text."""
    tokens = ["$x$", "$\\frac$", "$\\alpha$", "a^2", "{", "$"]
    fig = plots.head_figure(hot_cell_attention(6, 0, 0)[0, 0], plots.make_view(tokens, None), "$t$")
    for suffix in (".png", ".svg", ".pdf"):
        plots.save_figure(fig, tmp_path / f"m{suffix}")
        assert (tmp_path / f"m{suffix}").stat().st_size > 1000
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == tokens
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == tokens


def test_long_texts_are_windowed_and_thinned_and_the_figure_says_so():
    tokens = [f"w{i}" for i in range(200)]
    windowed = plots.make_view(tokens, max_tokens=40)
    assert windowed.tokens == tuple(tokens[:40]) and windowed.label_step == 1
    assert windowed.note == "first 40 of 200 tokens shown (--max-tokens)"
    thinned = plots.make_view(tokens, max_tokens=None)
    assert thinned.label_step == 4 and "every 4th token labelled" in thinned.note
    fig = plots.head_figure(np.eye(200), thinned, "long")
    assert "every 4th token labelled" in fig.get_suptitle()
    assert len(fig.axes[0].get_xticklabels()) == 50


def test_tokens_flag_replaces_labels_and_must_match_the_count(synthetic_json, tmp_path, capsys):
    ok("--input_file", synthetic_json, "--mode", "prepare", "--tokens", "a,b,c,d,e,f",
       "--output_file", tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text())["tokens"] == list("abcdef")
    out = tmp_path / "x.png"
    assert visualize("--input_file", synthetic_json, "--tokens", "a,b", "--output_file", out) == 2
    assert "--tokens gives 2 labels" in capsys.readouterr().err and not out.exists()


def test_output_dir_uses_the_seeds_file_names(corpus_h5, tmp_path):
    for mode in ("plot", "layers", "average", "prepare", "html"):
        ok("--input_file", corpus_h5, "--mode", mode, "--layer", "1", "--output-dir", tmp_path)
    ok("--input_file", corpus_h5, "--mode", "heads", "--layer", "all", "--output-dir", tmp_path,
       "--format", "svg")
    names = sorted(p.name for p in tmp_path.iterdir() if p.name != "corpus.h5")
    assert names == ["attention_heads_1.svg", "attention_heads_3.svg", "attention_heatmap.png",
                     "attention_interactive.html", "attention_layers.png", "attention_vis.png",
                     "backend_data.json"]


def test_average_of_every_layer_is_one_figure(corpus_h5, tmp_path):
    ok("--input_file", corpus_h5, "--mode", "average", "--layer", "all", "--output_file", tmp_path / "avg.png")
    assert_not_blank(rgb(tmp_path / "avg.png"))


# ----------------------------------------------------------------------------- prepare


def test_prepare_validates_and_equals_the_stored_attention(corpus_h5, tmp_path):
    out = tmp_path / "backend_data.json"
    ok("--input_file", corpus_h5, "--text-id", "doc-2", "--mode", "prepare", "--output_file", out)
    data = json.loads(out.read_text())
    jsonschema.validate(data, SCHEMA)
    assert list(data) == ["tokens", "text", "layers"]
    with open_attention(corpus_h5) as attn:
        stored = attn["doc-2"]
    assert data["tokens"] == list(stored.tokens) and data["text"] == stored.text
    assert [layer["layer_idx"] for layer in data["layers"]] == [1, 3]
    for lp, layer in enumerate(data["layers"]):
        assert [h["head_idx"] for h in layer["heads"]] == [0, 2, 5]
        for hp, head in enumerate(layer["heads"]):
            np.testing.assert_array_equal(np.asarray(head["attention"], np.float32), stored.attention[lp, hp])


def test_prepare_subsets_and_rounding(corpus_h5, tmp_path):
    out = tmp_path / "small.json"
    ok("--input_file", corpus_h5, "--index", "1", "--mode", "prepare", "--layers", "-1", "--heads", "5,0",
       "--decimals", "3", "--output_file", out)
    data = json.loads(out.read_text())
    jsonschema.validate(data, SCHEMA)
    assert [layer["layer_idx"] for layer in data["layers"]] == [3]
    assert [h["head_idx"] for h in data["layers"][0]["heads"]] == [5, 0]
    with open_attention(corpus_h5) as attn:
        stored = attn[1].attention[1, 2]  # layer 3 = position 1, head 5 = position 2
    values = np.asarray(data["layers"][0]["heads"][0]["attention"])
    np.testing.assert_allclose(values, stored, atol=5e-4 + 1e-9)
    assert max(len(digits) for digits in re.findall(r"\.(\d+)", out.read_text())) <= 3


def test_prepare_removes_padding_of_seed_001_files(tmp_path):
    """Seed 001's own tool kept [PAD] in `tokens`: those rows and columns are dropped."""
    n, real = 6, 4
    attention = random_attention(np.random.default_rng(1), 1, 2, n)
    path = tmp_path / "seed001.json"
    tokens = ["[CLS]", "hi", "there", "[SEP]", "[PAD]", "[PAD]"]
    path.write_text(json.dumps({"tokens": tokens, "text": "hi there", "attention_matrices": attention.tolist()}))
    out = tmp_path / "backend_data.json"
    ok("--input_file", path, "--mode", "prepare", "--output_file", out)
    data = json.loads(out.read_text())
    jsonschema.validate(data, SCHEMA)
    assert data["tokens"] == tokens[:real]
    np.testing.assert_array_equal(np.asarray(data["layers"][0]["heads"][1]["attention"], np.float32),
                                  attention[0, 1, :real, :real].astype(np.float32))


def test_size_budget_refuses_or_trims(corpus_h5, tmp_path, capsys):
    out = tmp_path / "big.json"
    assert visualize("--input_file", corpus_h5, "--mode", "prepare", "--max-bytes", "2000",
                     "--output_file", out) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--max-bytes 2000" in err and "--trim" in err
    assert not out.exists()
    ok("--input_file", corpus_h5, "--mode", "prepare", "--max-bytes", "2000", "--trim", "--output_file", out)
    assert "warning: --trim kept" in capsys.readouterr().err
    data = json.loads(out.read_text())
    jsonschema.validate(data, SCHEMA)
    assert 0 < sum(len(layer["heads"]) for layer in data["layers"]) < 6
    assert out.stat().st_size <= 2000
    assert visualize("--input_file", corpus_h5, "--mode", "prepare", "--max-bytes", "50", "--trim",
                     "--output_file", out.with_name("none.json")) == 2
    assert "cannot hold even one head" in capsys.readouterr().err


def test_prepare_function_keeps_model_indices():
    text = item(hot_cell_attention(3, 0, 2, layers=2, heads=2))
    result = prepare(text, (4, 7), (1, 9), [1], [1, 0])
    assert result.kept == ((7, 9), (7, 1)) and result.dropped == ()
    jsonschema.validate(result.payload, SCHEMA)


# ----------------------------------------------------------------------------- html (no browser)


def test_html_embeds_tokens_inertly_and_needs_no_network(tmp_path):
    tokens = ["[CLS]", EVIL, "a\u2028b", "&amp;", "[SEP]"]
    text = item(random_attention(np.random.default_rng(2), 1, 2, 5), tokens=tokens)
    panel = Panel(kind="self", label="self-attention", rows=tuple(tokens), cols=tuple(tokens), layers=(0,),
                  heads=(0, 1), attention=text.attention)
    page = render_html(page_data([panel], title="title </title><b>", text=text.text, start="self").data)
    assert EVIL not in page and "</script><img" not in page and "\u2028" not in page
    assert "title &lt;/title&gt;&lt;b&gt;" in page
    match = re.search(r'<script type="application/json" id="attnpipe-data">(.*?)</script>', page, re.S)
    assert json.loads(match.group(1))["panels"][0]["rows"] == tokens  # same data once parsed
    assert page.count("<script") == 2  # the data block and the viewer: nothing injected
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "page loads a remote asset"
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page and "document.write" not in page


def test_page_encodings_round_trip_and_the_budget_picks_the_finest_that_fits():
    rng = np.random.default_rng(3)
    matrix = rng.dirichlet(np.ones(7), size=5).astype(np.float32)  # (query 5, key 7)
    np.testing.assert_array_equal(viewer.decode(viewer.encode(matrix, "f32"), "f32", (5, 7)), matrix)
    for encoding, top in (("u16", 65535), ("u8", 255)):
        back = viewer.decode(viewer.encode(matrix, encoding), encoding, (5, 7))
        assert np.abs(back - matrix).max() <= 0.5 / top + 1e-7
    attention = rng.dirichlet(np.ones(40), size=(2, 3, 40)).astype(np.float32)
    panel = Panel(kind="self", label="self", rows=("t",) * 40, cols=("t",) * 40, layers=(0, 1), heads=(0, 1, 2),
                  attention=attention)
    def base64_bytes(bytes_per_value: int) -> int:  # six 40 x 40 matrices
        return 6 * (4 * ((40 * 40 * bytes_per_value + 2) // 3) + 3)

    unlimited = page_data([panel], title="t", text="t", start="self")
    assert unlimited.encoding == "f32"
    fixed = unlimited.num_bytes - base64_bytes(4)  # tokens, colour table, page around the data
    sizes = {}
    for encoding, bytes_per_value in (("f32", 4), ("u16", 2), ("u8", 1)):
        budget = fixed + base64_bytes(bytes_per_value) + 100
        result = page_data([panel], title="t", text="t", start="self", max_bytes=budget)
        assert result.encoding == encoding and len(result.kept) == 6 and not result.dropped
        sizes[encoding] = result.num_bytes
        assert result.num_bytes <= budget
    assert sizes["u8"] < sizes["u16"] < sizes["f32"]
    with pytest.raises(AttnpipeError, match="even at 1 byte per value"):
        page_data([panel], title="t", text="t", start="self", max_bytes=fixed + 1_000)
    trimmed = page_data([panel], title="t", text="t", start="self", max_bytes=fixed + base64_bytes(1) // 2,
                        trim=True)
    assert len(trimmed.kept) == 3 and trimmed.kept + trimmed.dropped == tuple(
        ("self", layer, head) for layer in (0, 1) for head in (0, 1, 2))
    assert sum(len(row) for row in trimmed.data["panels"][0]["data"]) == len(trimmed.kept)


# ----------------------------------------------------------------------------- seed 001 command lines


@pytest.fixture(scope="module")
def tiny_attention_json(tiny_model_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("seed001")
    proc = run_script("extract_attention.py", "--model_dir", tiny_model_dir("bert"), "--text",
                      "the cat sat on the mat", "--output_file", "attention_data.json", "-q", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    return folder / "attention_data.json"


def test_seed_001_commands_work_as_written(tiny_attention_json):
    folder = tiny_attention_json.parent
    commands = [
        ("--input_file", "attention_data.json", "--mode", "plot", "--layer", "0", "--head", "0",
         "--output_file", "attention_vis.png"),
        ("--input_file", "attention_data.json", "--mode", "prepare", "--output_file", "backend_data.json"),
        ("--input_file", "attention_data.json", "--layer", "0", "--head", "0", "--output_file", "x.png"),
    ]
    for args in commands:
        proc = run_script("visualize_attention.py", *args, cwd=folder)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert_not_blank(rgb(folder / "attention_vis.png"))
    assert (folder / "x.png").read_bytes() == (folder / "attention_vis.png").read_bytes()
    data = json.loads((folder / "backend_data.json").read_text())
    jsonschema.validate(data, SCHEMA)
    stored = json.loads(tiny_attention_json.read_text())
    assert data["tokens"] == stored["tokens"] == ["[CLS]", "the", "cat", "sat", "on", "the", "mat", "[SEP]"]
    assert [[h["attention"] for h in layer["heads"]] for layer in data["layers"]] == stored["attention_matrices"]


@pytest.mark.slow
def test_seed_001_commands_on_the_packaged_minilm(minilm_dir, tmp_path):
    proc = run_script("extract_attention.py", "--model_dir", minilm_dir, "--text",
                      "This is an example text to analyze", "--output_file", "example_attention.json",
                      "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for args in [("--layer", "0", "--head", "0", "--output_file", "example_layer0_head0.png"),
                 ("--mode", "prepare", "--output_file", "for_backend.json")]:
        proc = run_script("visualize_attention.py", "--input_file", "example_attention.json", *args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    assert_not_blank(rgb(tmp_path / "example_layer0_head0.png"))
    data = json.loads((tmp_path / "for_backend.json").read_text())
    jsonschema.validate(data, SCHEMA)
    assert len(data["layers"]) == 6 and all(len(layer["heads"]) == 12 for layer in data["layers"])
    ok("--input_file", tmp_path / "example_attention.json", "--mode", "layers", "--output_file",
       tmp_path / "layers.png")  # 6 x 12 panels in one figure
    assert_not_blank(rgb(tmp_path / "layers.png"))


# ----------------------------------------------------------------------------- bad input


def bad(capsys, out: Path, needles: list[str], *argv) -> None:
    """One error line naming `needles`, exit status 2, nothing (not even a temp file) written."""
    assert visualize(*argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"
    assert not out.exists()
    if out.parent.is_dir():
        assert not list(out.parent.glob(".*.tmp")), "temporary file left behind"


def test_bad_input_files(tmp_path, capsys):
    out = tmp_path / "o.png"
    not_attention = tmp_path / "other.json"
    not_attention.write_text('{"hello": 1}')
    bad(capsys, out, ["lacks", "attention_matrices"], "--input_file", not_attention, "--output_file", out)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5 at all")
    bad(capsys, out, ["not a readable HDF5"], "--input_file", garbage, "--output_file", out)
    text = tmp_path / "t.txt"
    text.write_text("hi")
    bad(capsys, out, ["unknown attention file type"], "--input_file", text, "--output_file", out)
    bad(capsys, out, ["not found"], "--input_file", tmp_path / "missing.json", "--output_file", out)


def test_wrong_schema_version(synthetic_json, tmp_path, capsys):
    data = json.loads(synthetic_json.read_text())
    data["metadata"]["schema_version"] = 99
    future = tmp_path / "future.json"
    future.write_text(json.dumps(data))
    out = tmp_path / "o.png"
    bad(capsys, out, ["schema version 99", "reads version 1"], "--input_file", future, "--output_file", out)


def test_out_of_range_indices_name_the_valid_range(corpus_h5, tmp_path, capsys):
    out = tmp_path / "o.png"
    bad(capsys, out, ["--layer 2", "layers 1, 3"], "--input_file", corpus_h5, "--layer", "2", "--output_file", out)
    bad(capsys, out, ["--layer -3", "-2 to -1"], "--input_file", corpus_h5, "--layer", "-3", "--output_file", out)
    bad(capsys, out, ["--head 1", "heads 0, 2, 5"], "--input_file", corpus_h5, "--layer", "1", "--head", "1",
        "--output_file", out)
    bad(capsys, out, ["--index 3", "3 text(s) (0-2)"], "--input_file", corpus_h5, "--index", "3",
        "--layer", "1", "--output_file", out)
    bad(capsys, out, ["--text-id 'nope'", "doc-0"], "--input_file", corpus_h5, "--text-id", "nope",
        "--output_file", out)
    bad(capsys, tmp_path / "p.json", ["--heads 4"], "--input_file", corpus_h5, "--mode", "prepare",
        "--heads", "4", "--output_file", tmp_path / "p.json")


def test_bad_outputs(synthetic_json, tmp_path, capsys):
    bad(capsys, tmp_path / "o.bmp", ["unknown output type '.bmp'", ".png / .svg / .pdf"],
        "--input_file", synthetic_json, "--output_file", tmp_path / "o.bmp")
    bad(capsys, tmp_path / "o.png", ["writes .json"], "--input_file", synthetic_json, "--mode", "prepare",
        "--output_file", tmp_path / "o.png")
    (tmp_path / "a_file").write_text("x")  # a missing folder is made; one under a file cannot be
    missing = tmp_path / "a_file" / "such" / "o.png"
    bad(capsys, missing, ["cannot be made", "a_file is a file"], "--input_file", synthetic_json,
        "--output_file", missing)
    folder = tmp_path / "taken.png"
    folder.mkdir()
    assert visualize("--input_file", synthetic_json, "--output_file", folder) == 2
    assert "is a folder" in capsys.readouterr().err
    bad(capsys, tmp_path / "o.png", ["--output_file", "--output-dir"], "--input_file", synthetic_json)
    bad(capsys, tmp_path / "o.png", ["--cmap 'nope'"], "--input_file", synthetic_json, "--cmap", "nope",
        "--output_file", tmp_path / "o.png")


def test_an_existing_output_survives_a_failed_run(synthetic_json, tmp_path, capsys):
    out = tmp_path / "keep.png"
    out.write_bytes(b"old")
    assert visualize("--input_file", synthetic_json, "--layer", "9", "--output_file", out) == 2
    assert out.read_bytes() == b"old"


def test_unwritable_folder_is_reported(synthetic_json, tmp_path, capsys, monkeypatch):
    """Root ignores permission bits, so the folder check is exercised through os.access."""
    import attnpipe.store.atomic as atomic

    monkeypatch.setattr(atomic.os, "access", lambda path, mode: False)
    out = tmp_path / "o.png"
    bad(capsys, out, ["not writable"], "--input_file", synthetic_json, "--output_file", out)
