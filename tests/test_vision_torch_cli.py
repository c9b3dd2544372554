"""Images (ViT), plain torch models and --method hf, run as a user types them, through stage 2.

One subprocess per path runs extract_attention.py exactly as typed (each pays the torch import,
~6-10 s on a 2-core machine, so those fixtures are module-scoped and marked slow); the other
commands run in-process through the scripts' own main() and run_cli.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import analyze_attention
import extract_attention
import visualize_attention
from attnpipe.errors import AttnpipeError, run_cli
from attnpipe.store import H5_SCHEMA_VERSION, open_attention
from conftest import run_script, write_test_images

ATTN_TOL = 1e-5


def ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr


def one_line_error(proc, needles: list[str]) -> str:
    assert proc.returncode == 2, f"expected exit 2, got {proc.returncode}\n{proc.stderr}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def cli(main, *argv) -> int:
    return run_cli(main, [str(a) for a in argv])


def in_process_error(capsys, main, needles: list[str], *argv) -> None:
    assert cli(main, *argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"


# ----------------------------------------------------------------------------- ViT


@pytest.fixture(scope="module")
def vit_run(tiny_vit_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit_cli")
    images = write_test_images(folder / "imgs")
    out = folder / "vit.h5"
    proc = run_script("extract_attention.py", "--model_dir", tiny_vit_dir, "--image-dir", folder / "imgs",
                      "--verify", "--output_file", out)
    ok(proc)
    return folder, images, out


@pytest.mark.slow
def test_images_to_h5_with_patch_tokens_and_parity(vit_run):
    _, images, out = vit_run
    with open_attention(out) as f:
        assert f.meta.schema_version == H5_SCHEMA_VERSION == 3  # the default HDF5 layout (packed)
        assert f.meta.model_type == "vit" and f.meta.method == "manual"
        assert f.meta.parity_max_abs_diff is not None and f.meta.parity_max_abs_diff <= ATTN_TOL
        assert f.ids == ("img0.png", "img1.png", "img2.png")  # folder in name order
        item = f["img0.png"]
        assert item.input_kind == "image"
        assert item.tokens[:3] == ("[CLS]", "patch_0_0", "patch_0_1") and item.tokens[-1] == "patch_3_3"
        assert item.special_tokens_mask.tolist() == [True] + [False] * 16  # [CLS] is special
        assert item.image.patch_grid == (4, 4) and item.image.patch_size == 8
        assert item.image.size == (60, 40)  # (width, height) of the original image
        assert Path(item.image.path) == images[0]
        assert item.attention.shape == (2, 4, 17, 17)
        np.testing.assert_allclose(item.attention.sum(-1), 1.0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("head", ["0", "mean", "rollout"])
def test_overlay_figure_from_the_file(vit_run, head):
    folder, images, out = vit_run
    figure = folder / f"overlay_{head}.png"
    args = ["--input_file", out, "--mode", "image", "--layer", "-1", "--head", head, "--output_file", figure]
    if head == "mean":
        args += ["--image", images[0]]  # the image given explicitly; otherwise the stored path
    assert cli(visualize_attention.main, *args) == 0
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_overlay_errors(vit_run, tmp_path, capsys):
    _, _, out = vit_run
    png = tmp_path / "o.png"
    in_process_error(capsys, visualize_attention.main, ["--head", "'max'"], "--input_file", out,
                     "--mode", "image", "--head", "max", "--output_file", png)
    in_process_error(capsys, visualize_attention.main, ["image not found"], "--input_file", out,
                     "--mode", "image", "--image", tmp_path / "gone.png", "--output_file", png)
    in_process_error(capsys, visualize_attention.main, ["--head takes an integer"], "--input_file", out,
                     "--mode", "plot", "--head", "mean", "--output_file", png)
    assert not png.exists()


@pytest.mark.slow
def test_stage2_on_images(vit_run, tmp_path):
    _, _, out = vit_run
    heat = tmp_path / "heat.png"
    assert cli(visualize_attention.main, "--input_file", out, "--mode", "plot", "--layer", "1",
               "--head", "2", "--output_file", heat) == 0
    assert heat.is_file()
    assert cli(analyze_attention.main, "metrics", out, "--output-dir", tmp_path) == 0
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert metrics["text_id"].nunique() == 3 and set(metrics["layer"]) == {0, 1}
    assert cli(analyze_attention.main, "rollout", out, "--output-dir", tmp_path, "--query", "cls") == 0
    rollout = pd.read_csv(tmp_path / "rollout.csv")
    first = rollout[rollout["text_id"] == "img0.png"]
    assert first["query_token"].unique().tolist() == ["[CLS]"]
    assert len(first) == 17 and abs(first["value"].sum() - 1) < 1e-6


@pytest.mark.slow
def test_image_input_errors(tiny_vit_dir, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "o.h5"
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    in_process_error(capsys, extract_attention.main, ["cannot read image", "notes.png"],
                     "--model_dir", tiny_vit_dir, "--image", not_image, "--output_file", out)
    in_process_error(capsys, extract_attention.main, ["image file not found"],
                     "--model_dir", tiny_vit_dir, "--image", tmp_path / "gone.png", "--output_file", out)
    in_process_error(capsys, extract_attention.main, ["vision transformer", "'bert'"],
                     "--model_dir", tiny_model_dir("bert"), "--image", not_image, "--output_file", out)
    in_process_error(capsys, extract_attention.main, ["image model", "--image"],
                     "--model_dir", tiny_vit_dir, "--text", "hello", "--output_file", out)
    images = write_test_images(tmp_path / "imgs")
    in_process_error(capsys, extract_attention.main, ["same image file", "twice"], "--model_dir", tiny_vit_dir,
                     "--image", images[2], "--image-dir", tmp_path / "imgs", "--output_file", out)
    cropping = tmp_path / "cropping_vit"
    shutil.copytree(tiny_vit_dir, cropping)
    settings = json.loads((cropping / "preprocessor_config.json").read_text())
    settings.update(do_center_crop=True, crop_size={"height": 32, "width": 32})
    (cropping / "preprocessor_config.json").write_text(json.dumps(settings))
    in_process_error(capsys, extract_attention.main, ["center-crops", "do_center_crop"],
                     "--model_dir", cropping, "--image", images[0], "--output_file", out)
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


# ----------------------------------------------------------------------------- plain torch

USER_MODULE = '''
from torch import nn

def build():
    """A user's model: an input projection, then a pre-norm encoder with a final norm."""
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=24, dropout=0.1, activation="gelu",
                                       batch_first=True, norm_first=True)
    return nn.ModuleDict({"proj": nn.Linear(8, 16), "encoder": nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16))})
'''


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory):
    """A user's folder: their module, a safetensors state dict, a training checkpoint, embeddings."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("torch_cli")
    (folder / "user_encoders.py").write_text(USER_MODULE)
    sys.path.insert(0, str(folder))
    try:
        import user_encoders
    finally:
        sys.path.remove(str(folder))
    torch.manual_seed(3)
    module = user_encoders.build()
    save_file(module.state_dict(), folder / "weights.safetensors")
    torch.save({"model_state_dict": module.state_dict(), "epoch": 7}, folder / "checkpoint.pt")
    embeddings = np.random.default_rng(0).standard_normal((3, 6, 16)).astype(np.float32)
    embeddings[1, 4:] = 0  # sample 1: 4 real positions, then padding
    np.save(folder / "embeddings.npy", embeddings)
    out = folder / "torch.h5"
    proc = run_script("extract_attention.py", "--torch-model", "user_encoders:build", "--weights",
                      "weights.safetensors", "--data", "embeddings.npy", "--mask-zero-rows",
                      "--output_file", out, cwd=folder)
    ok(proc)
    return folder, module.eval(), embeddings, out


@pytest.mark.slow
def test_torch_model_to_h5_matches_multihead_attention(torch_run):
    _, module, embeddings, out = torch_run
    encoder = module["encoder"]
    with open_attention(out) as f:
        assert f.meta.model_type == "torch" and f.meta.model == "user_encoders:build"
        assert f.meta.trust_remote_code is True and f.meta.weight_files == ("weights.safetensors",)
        assert f.ids == ("sample-0", "sample-1", "sample-2")
        lengths = [f[i].num_tokens for i in range(3)]
        assert lengths == [6, 4, 6]
        assert f[1].tokens == ("0", "1", "2", "3") and f[1].input_kind == "embeddings"
        stored = [f[i].attention for i in range(3)]
    # The file against each layer's own nn.MultiheadAttention, per head, on the same padded batch.
    x = torch.from_numpy(embeddings)
    padding = torch.tensor([[False] * n + [True] * (6 - n) for n in lengths])
    diff = 0.0
    with torch.inference_mode():
        h = x
        for index, layer in enumerate(encoder.layers):
            a = layer.norm1(h)  # pre-norm
            _, ref = layer.self_attn(a, a, a, key_padding_mask=padding, need_weights=True,
                                     average_attn_weights=False)  # (B, H, Q, K)
            for row, n in enumerate(lengths):
                diff = max(diff, np.abs(stored[row][index] - ref[row, :, :n, :n].numpy()).max())
            h = layer(h, src_key_padding_mask=padding)
    assert diff <= ATTN_TOL


@pytest.mark.slow
def test_torch_file_through_stage2(torch_run, tmp_path, capsys):
    _, _, _, out = torch_run
    heat = tmp_path / "attention_heatmap.png"
    assert cli(visualize_attention.main, "--input_file", out, "--index", "1", "--mode", "average",
               "--layer", "0", "--output_file", heat) == 0
    assert heat.is_file()
    assert cli(visualize_attention.main, "--input_file", out, "--mode", "heads", "--layer", "-1",
               "--output-dir", tmp_path) == 0
    assert (tmp_path / "attention_heads_1.png").is_file()
    assert cli(analyze_attention.main, "metrics", out, "--output-dir", tmp_path) == 0
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert metrics["text_id"].nunique() == 3 and metrics["head"].nunique() == 4
    capsys.readouterr()
    assert cli(analyze_attention.main, "summary", out) == 0  # seed 000's printed summary
    assert "Avg entropy" in capsys.readouterr().out


@pytest.mark.slow
def test_checkpoint_dict_and_file_factory_give_the_same_attention(torch_run, tmp_path):
    folder, _, _, out = torch_run
    again = tmp_path / "again.h5"
    # file.py:function form, and a training checkpoint {"model_state_dict": ..., "epoch": ...} via torch.load(weights_only=True)
    assert cli(extract_attention.main, "--torch-model", f"{folder / 'user_encoders.py'}:build", "--weights",
               folder / "checkpoint.pt", "--data", folder / "embeddings.npy", "--mask-zero-rows",
               "--output_file", again, "-q") == 0
    with open_attention(out) as a, open_attention(again) as b:
        for i in range(3):
            np.testing.assert_array_equal(a[i].attention, b[i].attention)


class NotAWeight:  # pickled into a .pt file: torch.load(weights_only=True) must refuse it
    pass


@pytest.mark.slow
def test_torch_model_errors(torch_run, tmp_path, capsys):
    folder, _, _, _ = torch_run
    out = tmp_path / "o.h5"
    factory = f"{folder / 'user_encoders.py'}:build"
    data = folder / "embeddings.npy"
    pickled = tmp_path / "code.pt"
    torch.save({"x": NotAWeight()}, pickled)
    in_process_error(capsys, extract_attention.main, ["weights_only=True"],
                     "--torch-model", factory, "--weights", pickled, "--data", data, "--output_file", out)
    in_process_error(capsys, extract_attention.main, ["has no function", "nope"],
                     "--torch-model", f"{folder / 'user_encoders.py'}:nope", "--data", data, "--output_file", out)
    in_process_error(capsys, extract_attention.main, ["cannot import", "no_such_module_xyz"],
                     "--torch-model", "no_such_module_xyz:build", "--data", data, "--output_file", out)
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((2, 5, 7), dtype=np.float32))
    in_process_error(capsys, extract_attention.main, ["embedding size 7", "16"],
                     "--torch-model", factory, "--data", wrong, "--output_file", out)
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file
    save_file({"unrelated": torch.zeros(2)}, other)
    in_process_error(capsys, extract_attention.main, ["does not fit"],
                     "--torch-model", factory, "--weights", other, "--data", data, "--output_file", out)
    in_process_error(capsys, extract_attention.main, ["needs --data"],
                     "--torch-model", factory, "--output_file", out)
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


# ----------------------------------------------------------------------------- --method hf


@pytest.mark.slow
def test_unsupported_model_type_names_the_families_and_method_hf(tiny_model_dir, tmp_path):
    out = tmp_path / "o.json"
    proc = run_script("extract_attention.py", "--model_dir", tiny_model_dir("deberta-v2"),
                      "--text", "the cat sat", "--output_file", out)
    one_line_error(proc, ["unsupported", "'deberta-v2'", "bert", "gpt2", "llama", "vit", "--method hf"])
    assert not out.exists()


@pytest.mark.slow
def test_method_hf_extracts_and_marks_the_file(tiny_model_dir, tmp_path):
    import transformers

    folder = tiny_model_dir("deberta-v2")
    out = tmp_path / "hf.h5"
    texts = ["the cat sat on the mat .", "a dog", "big red cat and small blue dog ran fast"]
    argv = ["--model_dir", folder, "--method", "hf", "--output_file", out, "-q"]
    for text in texts:
        argv += ["--text", text]
    assert cli(extract_attention.main, *argv) == 0
    model = transformers.AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    with open_attention(out) as f:
        assert f.meta.method == "hf" and f.meta.model_type == "deberta-v2"
        assert f.meta.compute_dtype == "float32" and f.meta.checkpoint_dtype == "float32"
        for i, text in enumerate(texts):  # each text alone (no padding) against what is stored
            item = f[i]
            with torch.inference_mode():
                ref = model(**tokenizer(text, return_tensors="pt"), output_attentions=True).attentions
            expected = torch.stack(ref, dim=1)[0].numpy()  # (L, H, n, n)
            assert item.attention.shape == expected.shape
            # batched with padding vs alone: the same eager computation, float32 rounding apart
            assert np.abs(item.attention - expected).max() <= ATTN_TOL
            np.testing.assert_allclose(item.attention.sum(-1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_method_hf_computes_a_bf16_checkpoint_in_float32(tiny_model_dir, tmp_path):
    import transformers

    source = tiny_model_dir("deberta-v2")
    folder = tmp_path / "bf16"
    model = transformers.AutoModel.from_pretrained(source).to(torch.bfloat16)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    out = tmp_path / "bf16.json"
    assert cli(extract_attention.main, "--model_dir", folder, "--method", "hf", "--text", "the cat sat",
               "--output_file", out, "-q") == 0
    data = json.loads(out.read_text())
    assert data["metadata"]["checkpoint_dtype"] == "bfloat16"
    assert data["metadata"]["compute_dtype"] == "float32" and data["metadata"]["method"] == "hf"
    attention = np.asarray(data["attention_matrices"])
    assert np.isfinite(attention).all()
    np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-5)  # float32 rows, not bf16 (~4e-3)


def test_method_hf_guards():
    from attnpipe.models.hf import check_attentions

    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    good = torch.softmax(torch.randn(2, 4, 3, 3), -1)
    check_attentions((good, good), mask, 2, 4)  # passes
    with pytest.raises(AttnpipeError, match="empty tuple"):
        check_attentions((), mask, 2, 4)  # what sdpa returns
    with pytest.raises(AttnpipeError, match="for 1 layers, but the config says 2"):
        check_attentions((good,), mask, 2, 4)
    nan = good.clone()
    nan[1, 0, 0, 0] = float("nan")
    with pytest.raises(AttnpipeError, match="NaN"):
        check_attentions((good, nan), mask, 2, 4)
    padded_noise = good.clone()
    padded_noise[1, :, 2, :] = float("nan")  # a padded query row: cropped, never stored
    check_attentions((good, padded_noise), mask, 2, 4)


def test_method_hf_refuses_verify(tmp_path, capsys):
    in_process_error(capsys, extract_attention.main, ["--verify", "--method hf"],
                     "--model_dir", tmp_path / "model", "--method", "hf", "--verify", "--text", "x",
                     "--output_file", tmp_path / "o.json")


# ----------------------------------------------------------------------------- storage options, every kind


def test_images_take_rows_metrics_only_and_compression(tiny_vit_dir, tmp_path, capsys):
    """Images run through the same sink as texts: --rows cls keeps the [CLS] row, --metrics-only
    stores the per-head table, --compression lzf / uint8 change only the bytes."""
    from attnpipe import store

    images = write_test_images(tmp_path / "images")
    args = ["--model_dir", tiny_vit_dir, *[a for p in images for a in ("--image", p)], "-q"]
    assert cli(extract_attention.main, *args, "-o", tmp_path / "all.h5") == 0
    assert cli(extract_attention.main, *args, "-o", tmp_path / "cls.h5", "--rows", "cls") == 0
    assert cli(extract_attention.main, *args, "-o", tmp_path / "lzf.h5", "--compression", "lzf",
               "--dtype", "uint8") == 0
    assert cli(extract_attention.main, *args, "-o", tmp_path / "m.h5", "--metrics-only") == 0
    with store.open_attention(tmp_path / "all.h5") as full, \
            store.open_attention(tmp_path / "cls.h5", partial_rows=True) as cls, \
            store.open_attention(tmp_path / "lzf.h5") as lzf:
        assert cls.storage.rows == "cls" and lzf.storage.compression == "lzf"
        for want, got, small in zip(full, cls, lzf, strict=True):
            np.testing.assert_array_equal(got.attention, want.attention[:, :, [0], :])
            assert np.abs(small.attention - want.attention).max() <= 0.5 / 255 + 1e-7
    with store.open_attention(tmp_path / "m.h5") as f:
        assert f.metrics_only and len(f.stored_metrics()) > 0


def test_pairs_take_compression_and_refuse_rows_and_metrics_with_a_reason(tmp_path, capsys):
    from attnpipe import store
    from seq2seq_tiny import save_tiny_seq2seq

    model = save_tiny_seq2seq("bart", tmp_path / "bart")
    args = ["--model_dir", model, "--source", "the cat sat on the mat", "--target", "a cat sat",
            "--source", "a dog", "--target", "the dog ran", "-q"]
    assert cli(extract_attention.main, *args, "-o", tmp_path / "gz.h5") == 0
    assert cli(extract_attention.main, *args, "-o", tmp_path / "lzf.h5", "--compression", "lzf") == 0
    with store.open_attention(tmp_path / "gz.h5") as a, store.open_attention(tmp_path / "lzf.h5") as b:
        assert b.storage.compression == "lzf"
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x.attention, y.attention)
            np.testing.assert_array_equal(x.target.cross_attention, y.target.cross_attention)
    in_process_error(capsys, extract_attention.main, ["--rows cls", "cross-attention", "--rows all"],
                     *args, "-o", tmp_path / "r.h5", "--rows", "cls")
    in_process_error(capsys, extract_attention.main, ["--metrics-only", "encoder, decoder, cross"],
                     *args, "-o", tmp_path / "m.h5", "--metrics-only")
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == ["gz.h5", "lzf.h5"]


# ----------------------------------------------------------------------------- --explain on images and torch


def test_explain_images_stores_what_the_library_computes(tiny_vit_dir, tmp_path):
    """--explain output-norm through a ViT, with --verify and a head subset: the file holds the
    attention, d target / d attention of the stored heads and the gate gradients of every head,
    exactly what attnpipe.extract.gradients computes for the same pixels."""
    from attnpipe.extract import gradients
    from attnpipe.extract.images import ImageInputs
    from attnpipe.extract.loading import load_model

    images = write_test_images(tmp_path / "images")[:2]
    out = tmp_path / "vit_grad.h5"
    # The run on this process's torch threads, as the comparison below: a light model would
    # otherwise run on one (runner.run_model), and another thread count splits the products
    # differently, equal only to float32 rounding.
    assert cli(extract_attention.main, "--model_dir", tiny_vit_dir, *[a for p in images for a in ("--image", p)],
               "--explain", "output-norm", "--ablate", "--heads", "0,2", "--verify", "-q", "-o", out,
               "--threads", torch.get_num_threads()) == 0
    model = load_model(tiny_vit_dir, torch.device("cpu"), input_kind="image")
    inputs = ImageInputs(images, model)
    objective = gradients.build_objective(model, gradients.parse_target("output-norm"))
    with open_attention(out) as f:
        assert f.meta.gradient_target == "output-norm" and f.meta.parity_max_abs_diff <= 1e-5
        assert f.meta.heads == (0, 2)
        for i, item in enumerate(f):
            want = gradients.text_gradients(model, objective, inputs.prepare([i], torch.device("cpu")).tensors,
                                            ablate=True)
            assert item.attention_grad.shape == item.attention.shape == (model.num_layers, 2, 17, 17)
            # The same code on the same input in the same process: equal to the bit.
            np.testing.assert_array_equal(item.attention_grad, want.attention_grad["self"][:, [0, 2]])
            np.testing.assert_array_equal(item.head_gate_grad, want.head_gate_grad["self"])
            np.testing.assert_array_equal(item.head_ablation, want.head_ablation["self"])
            assert item.token_grad_input.shape == (17,) and np.abs(item.head_gate_grad).max() > 0


@pytest.mark.slow
def test_explain_torch_model_stores_gradients_on_real_positions(torch_run):
    """--explain output-norm through a user's torch encoder, one padded sample among them: the
    stored gradients cover the real positions only and match the library's on that sample."""
    from attnpipe.extract import gradients
    from attnpipe.extract.embeddings import load_torch_model

    folder, _, embeddings, _ = torch_run
    out = folder / "torch_grad.h5"
    proc = run_script("extract_attention.py", "--torch-model", "user_encoders:build", "--weights",
                      "weights.safetensors", "--data", "embeddings.npy", "--mask-zero-rows",
                      "--explain", "output-norm", "--output_file", out, cwd=folder)
    ok(proc)
    sys.path.insert(0, str(folder))
    try:
        model = load_torch_model("user_encoders:build", folder / "weights.safetensors", torch.device("cpu"), False)
    finally:
        sys.path.remove(str(folder))
    objective = gradients.build_objective(model, gradients.parse_target("output-norm"))
    with open_attention(out) as f:
        items = list(f)
    assert [item.num_tokens for item in items] == [6, 4, 6]
    x = torch.from_numpy(embeddings[1:2, :4])  # sample 1's real positions
    want = gradients.text_gradients(model, objective, {"inputs_embeds": x, "attention_mask": torch.ones(1, 4)})
    # A subprocess against this process (thread counts may differ): float32 rounding only.
    np.testing.assert_allclose(items[1].attention_grad, want.attention_grad["self"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(items[1].token_grad_input, want.token_grad_input, rtol=1e-5, atol=1e-7)
