"""The direct loader (attnpipe.extract.loading._load_direct, models/bert.py, extract/tokenizer.py):
a clean BERT-like checkpoint loaded without transformers is the transformers path's, bit for bit.

Tiers: the expected parameters against transformers' own model (parity of the spec), the
tokenizer against AutoTokenizer, the Weights and the stored attention against the transformers
path, every broken folder refused with the same message, and a default run that imports no
transformers modeling code.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT
from reliability_support import misfit_folders

from attnpipe.errors import AttnpipeError
from attnpipe.extract import corpus
from attnpipe.extract.loading import LOADER_ENV, load_model
from attnpipe.extract.tokenizer import direct_tokenizer
from attnpipe.models import bert

BERT_LIKE = ("bert", "roberta", "xlm-roberta", "electra", "distilbert")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folders(tiny_model_dir, minilm_dir, tmp_path_factory):
    made = {t: tiny_model_dir(t) for t in (*BERT_LIKE, "albert")}
    import transformers as T

    # ELECTRA whose embeddings are as wide as its hidden state: no embeddings_project.
    torch.manual_seed(1)
    wide = tmp_path_factory.mktemp("electra-wide")
    T.AutoModel.from_config(T.ElectraConfig(vocab_size=120, max_position_embeddings=64, hidden_size=32,
                                            embedding_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=37)).save_pretrained(wide)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (wide / name).write_bytes((made["electra"] / name).read_bytes())
    made["electra-wide"] = wide
    return {**made, "minilm": minilm_dir}


@pytest.mark.parametrize("name", [*BERT_LIKE, "electra-wide", "minilm"])
def test_expected_parameters_are_what_transformers_builds(name, folders):
    import transformers as T

    config = json.loads((folders[name] / "config.json").read_text())
    built = T.AutoModel.from_config(T.AutoConfig.from_pretrained(folders[name])).state_dict()
    assert bert.expected_parameters(config) == {k: tuple(v.shape) for k, v in built.items()}


def test_a_config_the_map_does_not_describe_goes_to_transformers(folders):
    config = json.loads((folders["bert"] / "config.json").read_text())
    for change in ({"position_embedding_type": "relative_key"}, {"add_cross_attention": True},
                   {"is_decoder": True}, {"hidden_size": None}, {"model_type": "albert"}):
        assert bert.expected_parameters({**config, **change}) is None, change


def _leaves(value, path="weights"):
    """(path, value) of every tensor, float and int in a Weights, through dataclasses and tuples."""
    if dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            yield from _leaves(getattr(value, field.name), f"{path}.{field.name}")
    elif isinstance(value, tuple):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{path}[{i}]")
    else:
        yield path, value


@pytest.mark.parametrize("name", [*BERT_LIKE, "electra-wide", "minilm"])
def test_direct_weights_equal_the_transformers_path_bit_for_bit(name, folders):
    direct = load_model(folders[name], CPU, reference=False)
    reference = load_model(folders[name], CPU)
    assert direct.hf_model is None and reference.hf_model is not None  # the direct path was taken
    ours, theirs = list(_leaves(direct.weights)), list(_leaves(reference.weights))
    assert [p for p, _ in ours] == [p for p, _ in theirs]
    for (path, a), (_, b) in zip(ours, theirs, strict=True):
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b), path
        elif callable(a):
            x = torch.linspace(-6, 6, 301)
            assert torch.equal(a(x), b(x)), path
        else:
            assert a == b, path
    for field in ("model_type", "weights_sha256", "weight_files", "checkpoint_dtype", "trust_remote_code"):
        assert getattr(direct, field) == getattr(reference, field), field
    assert direct.provenance_fields() == reference.provenance_fields()
    assert direct.config.max_position_embeddings == reference.config.max_position_embeddings


def test_albert_and_bin_checkpoints_keep_the_transformers_path(folders, tmp_path):
    assert load_model(folders["albert"], CPU, reference=False).hf_model is not None
    import shutil

    from safetensors.torch import load_file

    folder = shutil.copytree(folders["bert"], tmp_path / "bin")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert load_model(folder, CPU, reference=False).hf_model is not None


def test_a_bf16_checkpoint_is_computed_in_float32_as_transformers_does(folders, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(folders["bert"], tmp_path / "bf16")
    state = {k: v.to(torch.bfloat16) for k, v in load_file(folder / "model.safetensors").items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    direct, reference = load_model(folder, CPU, reference=False), load_model(folder, CPU)
    assert direct.hf_model is None and direct.checkpoint_dtype == reference.checkpoint_dtype == "bfloat16"
    for (path, a), (_, b) in zip(_leaves(direct.weights), _leaves(reference.weights), strict=True):
        if isinstance(a, torch.Tensor):
            assert a.dtype == torch.float32 and torch.equal(a, b), path


def test_every_broken_folder_is_refused_with_the_same_message(tiny_model_dir, tmp_path):
    for name, folder in misfit_folders(tiny_model_dir("bert"), tmp_path).items():
        messages = []
        for reference in (False, True):
            with pytest.raises(AttnpipeError) as err:
                load_model(folder, CPU, reference=reference)
            messages.append(str(err.value))
        assert messages[0] == messages[1], name


def test_a_damaged_weights_file_is_refused_with_the_same_message(tiny_model_dir, tmp_path):
    import shutil

    folder = shutil.copytree(tiny_model_dir("bert"), tmp_path / "cut")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 100])  # header intact, tensors cut short
    messages = []
    for reference in (False, True):
        with pytest.raises(AttnpipeError) as err:
            load_model(folder, CPU, reference=reference)
        messages.append(str(err.value))
    assert messages[0] == messages[1]


def test_remote_code_is_refused_on_the_direct_path(tiny_model_dir, tmp_path):
    import shutil

    folder = shutil.copytree(tiny_model_dir("bert"), tmp_path / "remote")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "mine.Model"}}))
    with pytest.raises(AttnpipeError, match="asks to run its own Python code"):
        load_model(folder, CPU, reference=False)


def _h5_contents(path: Path) -> dict:
    found = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        found["attrs"] = {k: np.asarray(v).tolist() for k, v in f.attrs.items() if not k.startswith("parity")}
    return found


@pytest.mark.parametrize("name", ["bert", "roberta", "distilbert", "minilm"])
def test_a_run_through_the_direct_path_stores_what_the_transformers_path_stores(name, folders, tmp_path,
                                                                                 monkeypatch):
    from attnpipe.extract.runner import ExtractConfig, extract

    texts = corpus.from_strings(["the cat sat on the mat .", "a dog ran fast", "it was big , red and blue !"])
    outputs = []
    for loader in ("direct", "transformers"):
        monkeypatch.setenv(LOADER_ENV, loader)
        out = tmp_path / f"{loader}.h5"
        extract(ExtractConfig(texts=tuple(texts), output=out, model_dir=folders[name], progress=False))
        outputs.append(_h5_contents(out))
    assert outputs[0].keys() == outputs[1].keys()
    for key in outputs[0]:
        a, b = outputs[0][key], outputs[1][key]
        assert (a == b) if key == "attrs" else np.array_equal(a, b), key


def test_verify_still_runs_against_transformers(folders, tmp_path):
    from attnpipe.extract.runner import ExtractConfig, extract

    out = tmp_path / "v.h5"
    extract(ExtractConfig(texts=tuple(corpus.from_strings(["the cat sat"])), output=out, model_dir=folders["bert"],
                          verify=True, progress=False))
    with h5py.File(out, "r") as f:
        assert float(f.attrs["parity_max_abs_diff"]) < 1e-5


def test_the_default_run_imports_no_transformers_modeling_code(tmp_path):
    probe = ("import sys, runpy; sys.argv = ['extract_attention.py', '--text', 'the cat sat', '--output_file', "
             f"{str(tmp_path / 'a.h5')!r}, '-q']\n"
             "try:\n    runpy.run_path('extract_attention.py', run_name='__main__')\n"
             "except SystemExit as e:\n    assert not e.code, e.code\n"
             "print(sorted(m for m in sys.modules if m.startswith('transformers')))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our own probe's printed list
    assert "transformers.models.bert.modeling_bert" not in loaded
    assert loaded == []  # not even transformers itself: the direct path reads the folder alone


# ----------------------------------------------------------------------------- tokenizer parity

HOSTILE = ["東京は日本の首都です。北京欢迎你", "emoji 😀👍🏽 family 👨‍👩‍👧", "combining é vs é, Å",
           "line\u2028sep\u2029para", "[CLS] the cat [SEP] sat [PAD] [MASK] <s> </s> <pad>", "", "   ", "\t\n",
           "a " * 600, "the cat sat on the mat " * 40, "ÀÉÎÕÜ ß ﬁ ｆｕｌｌ", "\x00\x01 ctrl \u200b zero width",
           "https://x.y/z?a=1&b=2 don't", "<unk> [UNK] ##ing"]


def _tokenized(tokenizer, texts, **kw):
    enc = tokenizer(texts, return_special_tokens_mask=True, return_offsets_mapping=True, split_special_tokens=True,
                    **kw)
    return ({key: [[tuple(x) if isinstance(x, (list, tuple)) else x for x in row] for row in enc[key]]
             for key in ("input_ids", "token_type_ids", "special_tokens_mask", "offset_mapping") if key in enc},
            [enc.word_ids(i) for i in range(len(texts))],
            [tokenizer.convert_ids_to_tokens(ids) for ids in enc["input_ids"]])


@pytest.mark.parametrize("name", [*BERT_LIKE, "albert", "minilm"])
def test_the_direct_tokenizer_is_autotokenizer(name, folders):
    import transformers as T

    theirs, ours = T.AutoTokenizer.from_pretrained(folders[name]), direct_tokenizer(folders[name])
    assert ours is not None
    texts = [t.text for t in corpus.read_texts_file(ROOT / "data" / "demo_corpus.jsonl")] + HOSTILE
    for kw in ({"truncation": True, "max_length": 8}, {"truncation": True, "max_length": theirs.model_max_length},
               {"truncation": False}):
        assert _tokenized(ours, texts, **kw) == _tokenized(theirs, texts, **kw), kw
    assert ours.pad_token_id == theirs.pad_token_id and ours.model_max_length == theirs.model_max_length
    assert ours.get_vocab() == theirs.get_vocab()
    assert set(ours.all_special_tokens) == set(theirs.all_special_tokens)


def test_a_tokenizer_the_direct_path_does_not_cover_is_left_to_transformers(folders, tmp_path):
    import shutil

    for name, edit in (("class", {"tokenizer_class": "XLNetTokenizer"}), ("bos", {"add_bos_token": True}),
                       ("lower", {"tokenizer_class": "BertTokenizer", "do_lower_case": False})):
        folder = shutil.copytree(folders["minilm"], tmp_path / name, ignore=shutil.ignore_patterns("*.safetensors"))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, **edit}))
        assert direct_tokenizer(folder) is None, name
    folder = shutil.copytree(folders["bert"], tmp_path / "added")
    saved = json.loads((folder / "tokenizer.json").read_text())
    saved["added_tokens"].append({**saved["added_tokens"][0], "id": 119, "content": "w119", "special": False})
    (folder / "tokenizer.json").write_text(json.dumps(saved))
    assert direct_tokenizer(folder) is None
    assert direct_tokenizer(tmp_path) is None  # no tokenizer files at all
