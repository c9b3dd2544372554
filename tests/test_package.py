"""attnpipe as a package: pyproject.toml agrees with requirements.txt, `pip install <checkout>`
works in a fresh venv, and the installed package and commands work from outside the checkout.

The fresh venv is made by `python -m venv`; the dependencies (torch and the rest, which cannot be
downloaded for every test run) are the ones already installed for this checkout, seen through a
.pth file, and pip installs attnpipe itself with `--no-index --no-build-isolation`: what is
tested is that the checkout builds and installs, its console scripts exist, and the installed
copy (not the checkout on sys.path) reads files and extracts in memory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import tomllib
from pathlib import Path

import pytest

import extract_attention
from attnpipe.errors import run_cli
from conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def requirement_lines() -> dict[str, str]:
    """requirements.txt as name -> the requirement as written (comments dropped)."""
    out = {}
    for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            out[re.split(r"[<>=!~ \[]", line)[0].lower()] = line.replace(" ", "")
    return out


def test_pyproject_ranges_are_those_of_requirements_txt():
    reqs = requirement_lines()
    listed = PYPROJECT["project"]["dependencies"] + [
        r for extra in PYPROJECT["project"]["optional-dependencies"].values() for r in extra]
    for requirement in listed:
        name = re.split(r"[<>=!~ \[]", requirement)[0].lower()
        assert reqs.get(name) == requirement.replace(" ", ""), f"{requirement!r} differs from requirements.txt"
    torch = next(r for r in listed if r.startswith("torch"))
    assert torch == "torch>=2.10,<=2.13.0"  # the CPU build on disk; an open bound pulls CUDA builds
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "attnpipe.version.__version__"}
    assert set(PYPROJECT["project"]["scripts"]) == {"attnpipe-extract", "attnpipe-visualize", "attnpipe-analyze"}


def test_ruff_is_configured_and_clean():
    assert "ruff" in requirement_lines()
    assert "ruff check" in (ROOT / "Makefile").read_text(encoding="utf-8")
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    if ruff is None:
        pytest.skip("ruff is not installed in this venv (make test installs it from requirements.txt)")
    proc = subprocess.run([ruff, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


CHECK = r'''
import json, sys
from pathlib import Path
import numpy as np
import attnpipe

assert "site-packages" in attnpipe.__file__ and not attnpipe.__file__.startswith(sys.argv[1]), attnpipe.__file__
corpus = attnpipe.open("demo.h5")
text = corpus["text-1"]
assert text.attention(1, 3).shape == (len(text.tokens),) * 2
assert np.array_equal(text.attention(1, 3), text.attention()[1, 3])
assert np.array_equal(corpus.attention("text-1", 1, 3), text.attention(1, 3))
da = text.to_xarray()
assert da.dims == ("layer", "head", "query", "key") and list(da.coords["layer"].values) == [0, 1]
assert list(da.coords["key_token"].values) == list(text.tokens)
metrics = corpus.metrics(workers=1)
assert list(metrics.columns) == ["text_id", "layer", "head", "metric", "value"] and len(metrics) > 0
memory = attnpipe.extract(["a text"])
cli = attnpipe.open("cli.json")
assert memory[0].tokens == cli[0].tokens and np.array_equal(memory[0].token_ids, cli[0].token_ids)
assert np.array_equal(memory[0].attention(), cli[0].attention())
print(json.dumps({"version": attnpipe.__version__, "texts": len(corpus), "rows": len(metrics)}))
'''


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX venv layout")
def test_pip_install_in_a_fresh_venv(tmp_path, tiny_model_dir):
    source = tmp_path / "checkout"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "results", ".snakemake", "__pycache__", "*.egg-info", "build", ".pytest_cache"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    here = Path(sysconfig.get_path("purelib"))  # this checkout's venv: torch, transformers, pip, ...
    (site / "checkout_dependencies.pth").write_text(f"{here}\n", encoding="utf-8")
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"
    started = time.monotonic()
    install = subprocess.run([python, "-m", "pip", "install", "--no-index", "--no-build-isolation", "--quiet",
                              "--disable-pip-version-check", str(source)], capture_output=True, text=True,
                             cwd=tmp_path, env=env, timeout=600)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    print(f"pip install: {time.monotonic() - started:.1f} s")

    work = tmp_path / "work"  # outside the checkout: only the installed package can be imported
    work.mkdir()
    # a corpus file to read (written here, in-process: its writer is not what is tested)
    assert run_cli(extract_attention.main, ["--model_dir", str(tiny_model_dir("bert")), "--text", "the cat sat",
                                            "--text", "a dog ran", "-q", "--output_file", str(work / "demo.h5")]) == 0
    for command in (["attnpipe-extract", "--text", "a text", "-q", "--output_file", "cli.json"],
                    ["attnpipe-visualize", "--help"], ["attnpipe-analyze", "--help"]):
        run = subprocess.run([str(venv / "bin" / command[0]), *command[1:]], capture_output=True, text=True,
                             cwd=work, env=env, timeout=600)
        assert run.returncode == 0, f"{command}: {run.stderr[-2000:]}"
        assert command[1] != "--help" or "usage:" in run.stdout
    run = subprocess.run([python, "-c", CHECK, str(ROOT)], capture_output=True, text=True, cwd=work, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["texts"] == 2 and result["version"] == source_version()


def source_version() -> str:
    text = (ROOT / "attnpipe" / "version.py").read_text(encoding="utf-8")
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)
