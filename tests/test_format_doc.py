"""docs/FORMAT.md's plain-h5py example runs as written against a freshly extracted file."""

from __future__ import annotations

import re

import numpy as np
import pytest

from attnpipe.store import open_attention
from conftest import ROOT, run_script

DOC = ROOT / "docs" / "FORMAT.md"


def h5py_blocks(version: int) -> list[str]:
    """The ```python blocks of docs/FORMAT.md that use h5py: the plain-h5py recipe of schema
    version 3 (marked "# schema version 3") or the others (versions 2 and 1)."""
    blocks = re.findall(r"^```python\n(.*?)^```", DOC.read_text(encoding="utf-8"), re.S | re.M)
    return [block for block in blocks if "h5py" in block and ("# schema version 3" in block) == (version == 3)]


@pytest.mark.parametrize("version", [3, 2])
def test_plain_h5py_example_runs(tiny_model_dir, tmp_path, capsys, version):
    """Version 3's recipe on a file of the default options, version 2's on --schema-version 2."""
    path = tmp_path / "doc.h5"
    result = run_script(
        "extract_attention.py", "--model_dir", tiny_model_dir("bert"),
        "--text", "the cat sat", "--text", "a dog ran", "--output_file", path, "-q",
        *(() if version == 3 else ("--schema-version", "2")),
    )
    assert result.returncode == 0, result.stderr
    blocks = h5py_blocks(version)
    assert blocks, "docs/FORMAT.md has no ```python block using h5py"
    assert "attnpipe" not in "".join(blocks).replace('"attnpipe-attention"', ""), \
        "the plain-h5py example must not need attnpipe"
    doc = DOC.read_text(encoding="utf-8")
    assert doc.index("# schema version 3") < doc.index("# schema version 2"), "version 3's recipe comes first"

    namespace = {"path": str(path), "__name__": "format_doc"}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - our own documentation

    # The example's results agree with attnpipe's reader.
    with open_attention(path) as f:
        assert f.meta.schema_version == version
        expected = f[0]
        assert namespace["ids"] == list(f.ids)
        assert namespace["tokens"] == list(expected.tokens)
        assert namespace["special"].tolist() == expected.special_tokens_mask.tolist()
        assert namespace["truncated"] is expected.truncated is False
        assert namespace["layers"] == list(f.meta.layers)
        assert namespace["heads"] == list(f.meta.heads)
        np.testing.assert_array_equal(namespace["matrix"], f.head(0, len(f.meta.layers) - 1, 0))
    assert namespace["text"] == "the cat sat"
    assert namespace["verified"] is False  # no --verify: parity is NaN
    assert "the" in capsys.readouterr().out
