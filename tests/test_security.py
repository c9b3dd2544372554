"""Nothing runs that should not: malicious checkpoints, remote code, hostile strings in outputs.

- A `.bin`/`.pt` whose pickle would run code (its payload creates a marker file) is refused by
  torch's weights_only unpickler: the error names what it tried to load, the marker never appears.
- A model folder whose config asks for its own Python code (`auto_map`) is refused without
  --trust-remote-code (its module would create a marker on import: it does not); with the flag
  the code runs, as asked, and the file's provenance says trust_remote_code = true.
- Hostile token strings and texts (`</script>`, quotes, U+2028/U+2029, bidi controls, NUL, a 10k-
  character token, LaTeX) are stored faithfully (HDF5 refuses NUL with a clear error; JSON keeps
  it), drawn literally in PNG/SVG/PDF, and inert in the HTML viewer in a real browser.
- Text ids never become file names: ids such as `../../x` or `/etc/x` select a text and nothing
  else; where the workflow turns names into paths they must match a safe pattern
  (test_errors_catalogue.py runs those cases).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

import visualize_attention
from attnpipe.visualize import plots
from attnpipe.extract.corpus import Text
from attnpipe.errors import AttnpipeError
from attnpipe.extract.runner import ExtractConfig, extract
from attnpipe.extract.loading import read_state_dict
from attnpipe.store import H5Writer, Provenance, TextAttention, open_attention, write_json
from conftest import ROOT, save_tiny_model
from test_viewer_browser import browser  # noqa: F401  (the headless chromium fixture)


class Payload:
    """Pickles as a call to `function(argument)`: what a malicious checkpoint carries."""

    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return (self.function, (self.argument,))


def evil_state_dict(marker: Path, function=os.system) -> dict:
    argument = f"touch {marker}" if function is os.system else f"open({str(marker)!r}, 'w')"
    return {"embeddings.word_embeddings.weight": torch.zeros(3, 2), "bias": Payload(function, argument)}


# ----------------------------------------------------------------------------- malicious pickles


@pytest.mark.parametrize("function", [os.system, eval], ids=["os.system", "builtins.eval"])
def test_bin_checkpoint_whose_pickle_runs_code_is_refused(tmp_path, function):
    folder = save_tiny_model("bert", tmp_path / "model")
    (folder / "model.safetensors").unlink()  # only the pickle is left: transformers must read it
    marker = tmp_path / "PWNED"
    torch.save(evil_state_dict(marker, function), folder / "pytorch_model.bin")
    output = tmp_path / "out.json"
    with pytest.raises(AttnpipeError, match=r"refused to load .*holds more than tensors \(its pickle asks for GLOBAL (posix\.system|eval), which weights_only loading blocks\)"):
        extract(ExtractConfig(texts=(Text("a", "the cat"),), output=output, model_dir=folder, progress=False))
    assert not marker.exists(), "the pickle's code ran"
    assert not output.exists()


def test_pt_file_loads_as_tensors_only(tmp_path):
    marker = tmp_path / "PWNED"
    evil, plain = tmp_path / "evil.pt", tmp_path / "plain.pt"
    torch.save(evil_state_dict(marker), evil)
    weights = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}
    torch.save(weights, plain)
    with pytest.raises(AttnpipeError, match=r"refused to load .*evil\.pt: it holds more than tensors"):
        read_state_dict(evil)
    assert not marker.exists(), "the pickle's code ran"
    loaded = read_state_dict(plain)
    assert set(loaded) == {"w", "b"} and all(torch.equal(loaded[k], weights[k]) for k in weights)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(AttnpipeError, match="not a state dict"):
        read_state_dict(tmp_path / "list.pt")


def test_malicious_pt_beside_safetensors_is_never_unpickled(tmp_path):
    folder = save_tiny_model("bert", tmp_path / "model")
    marker = tmp_path / "PWNED"
    torch.save(evil_state_dict(marker), folder / "extra.pt")
    output = tmp_path / "out.json"
    extract(ExtractConfig(texts=(Text("a", "the cat"),), output=output, model_dir=folder, progress=False))
    assert not marker.exists()
    with open_attention(output) as f:
        assert f.meta.weight_files == ("model.safetensors",)  # what was loaded, and hashed


# ----------------------------------------------------------------------------- remote code


def remote_code_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny BERT whose configs point at a local module that creates a marker when imported."""
    folder = save_tiny_model("bert", tmp_path / "remote")
    marker = tmp_path / "REMOTE_CODE_RAN"
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom_code.CustomConfig", "AutoModel": "custom_code.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom_code.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).touch()  # harmless stand-in for what remote code could do\n"
        "from transformers import BertConfig, BertModel\n"
        "class CustomConfig(BertConfig):\n    pass\n"
        "class CustomModel(BertModel):\n    config_class = CustomConfig\n"
    )
    return folder, marker


def test_remote_code_is_refused_without_the_flag(tmp_path):
    folder, marker = remote_code_folder(tmp_path)
    output = tmp_path / "out.json"
    with pytest.raises(AttnpipeError, match=r"asks to run its own Python code \(config\.json: custom_code\.CustomConfig\); "
                                            r"attnpipe runs none unless you pass --trust-remote-code"):
        extract(ExtractConfig(texts=(Text("a", "the cat"),), output=output, model_dir=folder, progress=False))
    assert not marker.exists(), "the folder's code ran without --trust-remote-code"
    assert not output.exists()


@pytest.mark.slow
def test_remote_code_runs_only_with_the_flag_and_is_recorded(tmp_path):
    """With --trust-remote-code (in a subprocess whose module cache is a temp folder); without it
    the same command is catalogue row 20 (tests/test_errors_catalogue.py)."""
    folder, marker = remote_code_folder(tmp_path)
    output = tmp_path / "out.json"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "extract_attention.py"), "--model_dir", str(folder), "--text", "the cat",
           "--output_file", str(output), "-q"]
    allowed = subprocess.run([*cmd, "--trust-remote-code"], capture_output=True, text=True, env=env, timeout=300)
    assert allowed.returncode == 0, allowed.stderr
    assert marker.exists(), "the flag is what lets the folder's code run"
    with open_attention(output) as f:
        assert f.meta.trust_remote_code is True
    assert json.loads(output.read_text())["metadata"]["trust_remote_code"] is True


def test_default_provenance_says_no_remote_code(tiny_model_dir, tmp_path):
    output = tmp_path / "out.h5"
    extract(ExtractConfig(texts=(Text("a", "the cat"),), output=output, model_dir=tiny_model_dir("bert"),
                          progress=False))
    with open_attention(output) as f:
        assert f.meta.trust_remote_code is False


# ----------------------------------------------------------------------------- hostile strings

HOSTILE = (
    "[CLS]",
    "</script><img src=x onerror=alert(1)>",
    "<img src=x onerror=\"document.title='pwned';window.pwned=1\">",
    "\"double\" 'single' `back`",
    "line\u2028sep\u2029para",
    "\u202eevil\u202c \u200fRTL\u200e",
    "$\\frac{a}{b}$",
    "&amp; &lt;b&gt; ]]> <!--",
    "x" * 10_000,
    "[SEP]",
)
NUL_TOKEN = "nul\x00byte"
HOSTILE_TEXT = "</script><script>window.pwned=1</script> \u2028 $\\frac{a}{b}$ \u202eevil"
HOSTILE_ID = "</title><script>window.pwned=1</script>"


def hostile_item(tokens: tuple[str, ...], text: str = HOSTILE_TEXT, text_id: str = HOSTILE_ID) -> TextAttention:
    n = len(tokens)
    attention = np.full((1, 2, n, n), 0.2 / (n - 1), np.float32)
    attention[:, :, np.arange(n), np.arange(n)] = 0.8  # rows sum to 1
    return TextAttention(
        id=text_id, text=text, tokens=tokens, token_ids=np.arange(n), special_tokens_mask=np.zeros(n, bool),
        offsets=np.zeros((n, 2), np.int64), word_ids=np.arange(n), truncated=False, num_tokens_untruncated=n,
        attention=attention,
    )


META = Provenance(
    model="/models/hostile", model_type="bert", weights_sha256="", weight_files=(), num_layers=1, num_heads=2,
    layers=(0,), heads=(0, 1), dtype="float32", compute_dtype="float32", method="manual", max_length=64,
    trust_remote_code=False,
)


def test_hostile_strings_are_stored_faithfully(tmp_path):
    item = hostile_item(HOSTILE)
    with H5Writer(tmp_path / "a.h5", 1, "float32") as writer:
        writer.write(0, item)
        writer.finish(META)
    with_nul = hostile_item(HOSTILE[:-1] + (NUL_TOKEN, "[SEP]"), text=HOSTILE_TEXT + "\x00", text_id="id\x00")
    write_json(tmp_path / "a.json", with_nul, META)
    for path, want in ((tmp_path / "a.h5", item), (tmp_path / "a.json", with_nul)):
        with open_attention(path) as f:
            got = f[0]
            assert (got.id, got.text, got.tokens) == (want.id, want.text, want.tokens)
            np.testing.assert_array_equal(got.attention, want.attention)


def test_nul_is_refused_by_hdf5_with_a_clear_error(tmp_path):
    """HDF5 variable-length strings end at NUL: storing one would cut the string silently."""
    for item, what in ((hostile_item(HOSTILE[:-1] + (NUL_TOKEN, "[SEP]")), "token"),
                       (hostile_item(HOSTILE, text="a\x00b"), "text"), (hostile_item(HOSTILE, text_id="a\x00"), "id")):
        with pytest.raises(AttnpipeError, match=rf"its {what} contains a NUL character \(U\+0000\), which HDF5"):
            with H5Writer(tmp_path / "nul.h5", 1, "float32") as writer:
                writer.write(0, item)
                writer.finish(META)
        assert list(tmp_path.iterdir()) == []


def test_nul_in_a_corpus_text_stops_hdf5_extraction_but_json_keeps_it(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("bert")
    texts = (Text("ok", "the cat"), Text("has-nul", "the\x00dog"))
    with pytest.raises(AttnpipeError, match=r"text 'has-nul': its text contains a NUL"):
        extract(ExtractConfig(texts=texts, output=tmp_path / "a.h5", model_dir=model_dir, progress=False))
    assert list(tmp_path.iterdir()) == []
    extract(ExtractConfig(texts=texts[1:], output=tmp_path / "a.json", model_dir=model_dir, progress=False))
    with open_attention(tmp_path / "a.json") as f:
        assert f[0].text == "the\x00dog"


@pytest.mark.filterwarnings("ignore:constrained_layout not applied")  # the 10k-character label
@pytest.mark.filterwarnings("ignore:Glyph")  # U+2028/U+2029 and bidi marks have no glyph: drawn as boxes
def test_hostile_tokens_are_drawn_literally(tmp_path):
    tokens = HOSTILE[:-2] + (NUL_TOKEN, "[SEP]")  # the 10k token gets its own PNG below (SVG of it: 1.6 MB)
    view = plots.make_view(tokens, None)
    attention = hostile_item(tokens).attention
    figures = {"head": plots.head_figure(attention[0, 0], view, "$x$ </script>"),
               "heads": plots.heads_figure(attention[0], view, [0, 1], "heads")}
    for name, fig in figures.items():
        for suffix in (".png", ".svg", ".pdf"):
            plots.save_figure(fig, tmp_path / f"{name}{suffix}")
        labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        assert labels == [t.replace("\x00", "\u2400") for t in tokens], labels  # NUL shown as its picture
        svg = ET.parse(tmp_path / f"{name}.svg").getroot()  # well-formed XML: nothing broke out
        assert not [el for el in svg.iter() if el.tag.endswith("script") or el.tag.endswith("foreignObject")]
    long_view = plots.make_view(HOSTILE, None)
    fig = plots.head_figure(hostile_item(HOSTILE).attention[0, 0], long_view, "long")
    plots.save_figure(fig, tmp_path / "long.png")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == list(HOSTILE)


def test_hostile_page_runs_nothing_in_a_real_browser(browser, tmp_path, capsys):  # noqa: F811
    from selenium.common.exceptions import NoAlertPresentException

    tokens = HOSTILE[:-1] + (NUL_TOKEN, "[SEP]")
    write_json(tmp_path / "hostile.json", hostile_item(tokens), META)
    page = tmp_path / "page.html"
    assert visualize_attention.main(["--input_file", str(tmp_path / "hostile.json"), "--mode", "html",
                                     "--output_file", str(page)]) == 0
    browser.get(page.as_uri())
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert  # noqa: B018
    assert browser.execute_script("return window.pwned") is None
    assert browser.title != "pwned" and HOSTILE_ID in browser.title  # the id is text in the title
    assert browser.find_elements("tag name", "img") == []
    assert len(browser.find_elements("tag name", "script")) == 2  # the page's own two, nothing injected
    shown = browser.execute_script("return document.getElementById('text').textContent")
    assert shown == HOSTILE_TEXT
    browser.find_element("css selector", "input[name=view][value=lines]").click()
    words = browser.execute_script(
        "return Array.from(document.querySelectorAll('#lines text[data-side=query]')).map(e => e.textContent)")
    assert words == list(tokens)  # every token, NUL and 10k characters included, as text
    assert browser.execute_script("return window.pwned") is None
    logs = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not logs, logs


def test_text_ids_never_become_file_names(tmp_path, capsys):
    """Ids that look like paths pick a text; outputs keep the fixed names inside --output-dir."""
    ids = ["../../escape", "/etc/passwd-like", "..", "a/b\\c"]
    path = tmp_path / "corpus.h5"
    with H5Writer(path, len(ids), "float32") as writer:
        for index, text_id in enumerate(ids):
            writer.write(index, hostile_item(HOSTILE[:3], text_id=text_id))
        writer.finish(META)
    out = tmp_path / "out"
    out.mkdir()
    for text_id in ids:
        for mode in ("heads", "prepare", "html"):
            assert visualize_attention.main(["--input_file", str(path), "--text-id", text_id, "--mode", mode,
                                             "--layer", "all" if mode == "heads" else "0",
                                             "--output-dir", str(out)]) == 0
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["corpus.h5", "out/attention_heads_0.png", "out/attention_interactive.html",
                       "out/backend_data.json"]
    with open_attention(path) as f:
        assert list(f.ids) == ids  # stored as given
