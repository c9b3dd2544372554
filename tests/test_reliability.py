"""Issue 16, reliability and safety: nothing silently wrong.

A model folder whose weights do not fit its config is refused (never filled with random values,
which --verify would agree with), as is one with no real tokenizer; the same check runs before a
workflow starts (attnpipe.extract.checkpoint_fit.folder_problems).
"""

from __future__ import annotations

import sys

import pytest

import extract_attention
from attnpipe.errors import run_cli
from attnpipe.extract.checkpoint_fit import folder_problems
from reliability_support import misfit_folders

EXPECTED = {  # broken folder -> what the one error line must say
    "ddp": "37 parameter(s) of the architecture are not in the weights (embeddings.LayerNorm.bias, "
           "embeddings.LayerNorm.weight, embeddings.position_embeddings.weight and 34 more) (every weight name "
           "starts with 'module.'",
    "noquery": "1 parameter(s) of the architecture are not in the weights (encoder.layer.0.attention.self.query.weight)",
    "nowords": "(embeddings.word_embeddings.weight)",
    "shape": "encoder.layer.0.attention.self.query.weight has shape [32, 30] in the weights, the config makes [32, 32]",
    "layers3": "parameter(s) of the architecture are not in the weights (encoder.layer.2.",
    "layers1": "weight(s) the configured architecture does not have (encoder.layer.1.",
    "notokenizer": "no usable tokenizer",
}


@pytest.fixture(scope="module")
def misfits(tiny_model_dir, tmp_path_factory):
    return misfit_folders(tiny_model_dir("bert"), tmp_path_factory.mktemp("misfits"))


CASES = [(name, False) for name in sorted(EXPECTED)] + [("noquery", True), ("layers3", True)]


@pytest.mark.parametrize(("name", "verify"), CASES, ids=[f"{n}{'-verify' if v else ''}" for n, v in CASES])
def test_a_model_that_does_not_fit_its_config_is_refused(name, verify, misfits, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["extract_attention.py"])
    out = tmp_path / "a.json"
    args = ["--model_dir", str(misfits[name]), "--text", "the cat sat", "--output_file", str(out)]
    status = run_cli(extract_attention.main, args + (["--verify"] if verify else []))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and EXPECTED[name] in err[0], err[0]
    assert not out.exists()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_workflow_check_agrees_with_the_loader(name, misfits, tiny_model_dir):
    problems = folder_problems(misfits[name])
    wanted = "no tokenizer file" if name == "notokenizer" else EXPECTED[name]
    assert any(wanted in p for p in problems), problems
    assert folder_problems(tiny_model_dir("bert")) == []
