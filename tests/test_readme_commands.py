"""Every command of README.md runs as written, in a fresh folder, and exits 0.

The commands are read from README.md itself: every ```bash block (each line a command,
backslash continuations joined, comments dropped) and every ```python block (run with exec), in
the README's order, all in one fresh folder, so a later block can use what an earlier one wrote.
So a section added to the README is tested without touching this file.

Marking a block (the line just above its opening fence):
    <!-- readme-test: skip: REASON -->   never run here (set-up, a cluster, the whole demo); the
                                         reason must say what covers it instead
    <!-- readme-test: slow -->           run only with ATTNPIPE_README_SLOW=1 (minutes of CPU)

The fresh folder holds stand-ins for what a user would have: a copy of data/ (the demo corpus cut
to its DEMO_TEXTS shortest texts and news-002), the demo's results/demo/attention/demo/minilm.h5 (MiniLM on those texts),
and tiny random models under the README's folder names (./opus-mt-ko-en, ./my-t5, ./my-gpt2,
./vit, ./model_output, ./my-deberta), checkpoint files (step1k.h5, ...), images, a user's torch
module (mymodels.py, path/to/models.py) with weights and embeddings, and small texts files.
Commands run in this process (`python X.py ARGS` -> X's main(ARGS) through run_cli, as its
`__main__` does; attnpipe-extract/-visualize/-analyze likewise), not as subprocesses: one Python
start-up for all of them. A command this test cannot run is a failure, not a skip.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import analyze_attention
import extract_attention
import visualize_attention
from attnpipe.errors import run_cli
from conftest import ROOT, save_tiny_model
from seq2seq_tiny import save_tiny_seq2seq

README = ROOT / "README.md"
DEMO_TEXTS = 6  # shortest of data/demo_corpus.jsonl in the fresh folder, and news-002 (the README's example id)
MARK = re.compile(r"<!--\s*readme-test:\s*(skip|slow)\b:?\s*(.*?)\s*-->")
CLIS = {"extract_attention.py": extract_attention.main, "visualize_attention.py": visualize_attention.main,
        "analyze_attention.py": analyze_attention.main, "attnpipe-extract": extract_attention.main,
        "attnpipe-visualize": visualize_attention.main, "attnpipe-analyze": analyze_attention.main}


def readme_blocks(text: str) -> list[dict]:
    """The bash and python blocks of a README: language, first line number, body, mark, reason."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.fullmatch(r"```(bash|python)\s*", lines[i])
        if not fence:
            i += 1
            continue
        mark = MARK.fullmatch(lines[i - 1].strip()) if i else None
        end = lines.index("```", i + 1)
        blocks.append({"lang": fence.group(1), "line": i + 1, "body": "\n".join(lines[i + 1:end]),
                       "mark": mark.group(1) if mark else None, "reason": mark.group(2) if mark else ""})
        i = end + 1
    return blocks


def bash_commands(body: str) -> list[str]:
    """One command per line, continuations joined, blank and comment lines dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", body)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def script_main(path: Path):
    """main() of scripts/*.py or bench/*.py, loaded from its file as `python path` would run it."""
    spec = importlib.util.spec_from_file_location(f"readme_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_command(command: str, capsys) -> None:
    argv = shlex.split(command, comments=True)
    if argv[0] == "python":
        argv = argv[1:]
    program, args = argv[0], argv[1:]
    if program in CLIS:
        main = CLIS[program]
    elif re.fullmatch(r"(scripts|bench)/\w+\.py", program):
        main = script_main(ROOT / program)
    else:
        pytest.fail(f"README command {command!r}: this test runs python scripts and the attnpipe-* commands; "
                    "mark its block <!-- readme-test: skip: REASON --> if it cannot run here")
    status = run_cli(main, args)
    err = capsys.readouterr().err
    assert status == 0, f"README command failed (exit {status}):\n  {command}\n{err[-2000:]}"


# ----------------------------------------------------------------------------- the fresh folder

TORCH_MODULE = '''
from torch import nn

def build():
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=24, batch_first=True)
    return nn.TransformerEncoder(layer, 2)
'''


def lay_out_folder(folder: Path) -> None:
    """The stand-ins of what the README's commands expect to find (see the module docstring)."""
    import torch
    import transformers as T
    from PIL import Image
    from safetensors.torch import save_file

    shutil.copytree(ROOT / "data", folder / "data")
    rows = (ROOT / "data" / "demo_corpus.jsonl").read_text(encoding="utf-8").splitlines()
    shortest = sorted(rows, key=lambda r: len(json.loads(r)["text"]))[:DEMO_TEXTS - 1]  # flow is slow on long ones
    kept = [r for r in rows if r in shortest or json.loads(r)["id"] == "news-002"]
    (folder / "data" / "demo_corpus.jsonl").write_text("\n".join(kept) + "\n", encoding="utf-8")
    assert any(json.loads(r)["id"] == "news-002" for r in kept)
    words = "the cat sat on the mat . a dog ran fast and it was big".split()
    lines = [" ".join(words[i:] + words[:i]) for i in range(6)]
    for name in ("corpus.txt", "texts.txt", "my_texts.txt", "examples.txt"):
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "long.txt").write_text(" ".join(words * 3) + "\n", encoding="utf-8")

    demo = folder / "results" / "demo" / "attention" / "demo" / "minilm.h5"
    assert run_cli(extract_attention.main, ["--texts-file", str(folder / "data" / "demo_corpus.jsonl"),
                                            "--output_file", str(demo), "-q"]) == 0
    texts = folder / "texts.txt"
    for seed, name in enumerate(("step1k", "step2k", "final")):
        model = save_tiny_model("bert", folder / "ckpts" / name, seed=seed)
        assert run_cli(extract_attention.main, ["--model_dir", str(model), "--texts-file", str(texts),
                                                "--output_file", str(folder / f"{name}.h5"), "-q"]) == 0
    save_tiny_model("bert", folder / "model_output")
    save_tiny_model("deberta-v2", folder / "my-deberta")
    save_tiny_seq2seq("marian", folder / "opus-mt-ko-en")
    save_tiny_seq2seq("t5", folder / "my-t5")
    pairs = [{"id": f"ex-{i}", "source": " ".join(words[i:i + 5]), "target": " ".join(words[i + 2:i + 6])}
             for i in range(1, 4)]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    gpt2 = save_tiny_model("gpt2", folder / "my-gpt2")  # its tokenizer; then the model with its LM head
    torch.manual_seed(0)
    T.GPT2LMHeadModel(T.AutoConfig.from_pretrained(gpt2)).save_pretrained(gpt2)
    shutil.copytree(gpt2, folder / "gpt2")  # the generation example's ./gpt2

    torch.manual_seed(0)  # a 6-layer ViT: the README draws layer 5, head 3
    vit = T.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                      intermediate_size=37, initializer_range=0.2)
    T.ViTModel(vit, add_pooling_layer=False).save_pretrained(folder / "vit")
    T.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder / "vit")
    rng = np.random.default_rng(0)
    (folder / "photos").mkdir()
    for name in ("cat.png", "dog.jpg", "photos/a.png", "photos/b.png"):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")).save(folder / name)

    (folder / "mymodels.py").write_text(TORCH_MODULE, encoding="utf-8")
    (folder / "path" / "to").mkdir(parents=True)
    (folder / "path" / "to" / "models.py").write_text(TORCH_MODULE, encoding="utf-8")
    namespace: dict = {}
    exec(TORCH_MODULE, namespace)  # noqa: S102 - the module written above
    torch.manual_seed(0)
    module = namespace["build"]()
    save_file(module.state_dict(), folder / "model.safetensors")
    torch.save({"model_state_dict": module.state_dict()}, folder / "checkpoint.pt")
    embeddings = rng.standard_normal((2, 5, 16)).astype(np.float32)
    embeddings[1, 3:] = 0
    np.save(folder / "embeddings.npy", embeddings)


@contextlib.contextmanager
def inside(folder: Path):
    before, path = os.getcwd(), list(sys.path)
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)
        sys.path[:] = path
        for name in ("mymodels", "models"):  # the user's modules imported by --torch-model
            sys.modules.pop(name, None)


# ----------------------------------------------------------------------------- tests


def test_blocks_are_found_and_marks_give_reasons():
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    assert len([b for b in blocks if b["lang"] == "bash" and b["mark"] is None]) >= 10
    for block in blocks:
        if block["mark"] == "skip":
            assert len(block["reason"]) > 10, f"README line {block['line']}: a skipped block must say why"
    assert bash_commands("# c\nx a \\\n   b\n\n y") == ["x a b", "y"]


def test_every_readme_command_runs(tmp_path, capsys):
    slow = os.environ.get("ATTNPIPE_README_SLOW") == "1"
    lay_out_folder(tmp_path)
    capsys.readouterr()
    ran = 0
    with inside(tmp_path):
        for block in readme_blocks(README.read_text(encoding="utf-8")):
            if block["mark"] == "skip" or (block["mark"] == "slow" and not slow):
                continue
            if block["lang"] == "python":
                exec(compile(block["body"], f"README.md line {block['line']}", "exec"), {"__name__": "readme"})  # noqa: S102
                ran += 1
                continue
            for command in bash_commands(block["body"]):
                run_command(command, capsys)
                ran += 1
    assert ran >= 40
    # what the commands promised is there
    assert (tmp_path / "outputs" / "attention_plots").is_dir()  # --output-dir made as asked
    assert (tmp_path / "figs" / "attention_heads_0.png").is_file()
    assert (tmp_path / "out" / "report" / "report.md").is_file()
