#!/usr/bin/env python3
"""Extract the attention of a transformer with attnpipe's own explicit forward pass.

Every head's softmax(q·kᵀ/√d + mask) is computed by our pass (not read from a library hook)
and written for real tokens only, as (layer, head, query, key).

Examples:
    # one text -> JSON: tokens, text, attention_matrices (default model: the packaged all-MiniLM-L6-v2)
    python extract_attention.py --text "The cat sat on the mat." --output_file attention_data.json

    # a corpus -> HDF5, float16 storage, checked against transformers' eager attention
    python extract_attention.py --texts-file data/demo_corpus.jsonl --output_file results/demo.h5 \\
        --dtype float16 --verify

    # a big corpus: 8-bit storage, only the [CLS] rows; first print the expected size and time
    python extract_attention.py --texts-file corpus.txt --output_file big.h5 --dtype uint8 --rows cls --estimate

    # only the per-head metrics (docs/METRICS.md), no matrices
    python extract_attention.py --texts-file corpus.txt --output_file metrics.h5 --metrics-only

    # your own checkpoint (a transformers folder), last layer only
    python extract_attention.py --model_dir ./model_output --text "Hello" --layer -1 --output_file a.json

    # an encoder-decoder (T5, BART, Marian): a source/target pair, teacher-forced; stores encoder,
    # decoder and cross-attention. Several pairs: repeat both flags, or a .jsonl of {source, target}
    python extract_attention.py --model_dir ./opus-mt-ko-en --source "안녕하세요" --target "Hello" -o pair.json
    python extract_attention.py --model_dir ./opus-mt-ko-en --texts-file pairs.jsonl -o pairs.h5 --verify

    # generation: the model writes the translation (seed 003: --input / --file), or continues a
    # text by 20 tokens (causal LMs); our pass then runs on what it wrote, checked by --verify
    python extract_attention.py --model_dir ./opus-mt-ko-en --input "안녕하세요" -o translation.json --verify
    python extract_attention.py --model_dir ./gpt2 --text "Once upon a time" --generate 20 -o story.json

    # images through a ViT folder (config.json, weights, preprocessor_config.json)
    python extract_attention.py --model_dir ./vit --image cat.png --image-dir photos/ --output_file vit.h5

    # your own PyTorch encoder (runs YOUR code: mymodels.py's build()) on (batch, seq, dim) embeddings
    python extract_attention.py --torch-model mymodels:build --weights model.safetensors \\
        --data embeddings.npy --output_file torch.h5

    # any other transformers model, through transformers' own eager attention (marked method "hf")
    python extract_attention.py --model_dir ./deberta --method hf --text "Hello" --output_file hf.json
    # also store d target / d attention, head-gate gradients and head ablations for a classifier
    python extract_attention.py --model_dir results/classifier --texts-file data/labels/sentiment.jsonl \
        --explain predicted --ablate --output_file results/sentiment_grad.h5
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import sys
from pathlib import Path

from attnpipe.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Output format: see docs/FORMAT.md. Supported model types: bert, roberta, xlm-roberta, "
        "electra, distilbert, albert, gpt2, llama, mistral, qwen2; encoder-decoders (--source/--target): "
        "t5, mt5, bart, marian; vit (--image); plain torch encoders (--torch-model); any other "
        "transformers model with --method hf.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("input texts (give --text or --texts-file)")
    source.add_argument("--text", action="append", default=[], metavar="TEXT",
                        help="a text to analyse; repeat the flag for several texts")
    source.add_argument("--texts-file", "--texts_file", type=Path, metavar="FILE",
                        help="a file of texts: .txt (one per line), .jsonl (fields id, text), .csv or .tsv")
    source.add_argument("--text-column", default="text",
                        help="column holding the text in a .csv/.tsv file (default: text)")
    source.add_argument("--skip-empty", action="store_true",
                        help="skip the empty texts of --texts-file instead of refusing the file; their line "
                        "numbers are recorded in the output (skipped_empty) and counted in the summary")
    source.add_argument("--id-column", default=None,
                        help="column holding a unique id in a .csv/.tsv file (default: row-N)")
    source.add_argument("--source", "--input", action="append", default=[], metavar="TEXT",
                        help="encoder-decoder models: a source text; repeat for several, each paired "
                        "with the --target at the same position, or give no --target and the model "
                        "generates each target. A --texts-file .jsonl whose rows have source and "
                        "target fields (and an optional id; no target: generated) gives pairs too")
    source.add_argument("--target", action="append", default=[], metavar="TEXT",
                        help="encoder-decoder models: the target text of the matching --source, run with "
                        "teacher forcing (decoder input = the model's start token + the target shifted right)")
    source.add_argument("--file", type=Path, default=None, metavar="FILE",
                        help="encoder-decoder models (seed 003): a file of source sentences (.txt one per "
                        "line, or .jsonl/.csv like --texts-file) whose targets the model generates")
    source.add_argument("--num-examples", type=int, default=None, metavar="N",
                        help="use only the first N inputs (texts, sources or pairs) (default: all)")
    gen = parser.add_argument_group("generation (attnpipe/extract/generate.py): the model writes the text, "
                                    "then attnpipe's own pass runs on it")
    gen.add_argument("--generate", type=int, default=None, metavar="N",
                     help="causal LMs: continue each text by up to N tokens with transformers' generate, "
                     "then store the attention of prompt + continuation (generated tokens are marked)")
    gen.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                     help="encoder-decoders given --source without --target: the longest target "
                     "generated, in tokens (default: 64, or the decoder's limit if smaller)")
    gen.add_argument("--num-beams", type=int, default=None, metavar="B",
                     help="beam search with B beams (default: 1, greedy)")
    gen.add_argument("--sample", action="store_true",
                     help="sample instead of greedy decoding, after torch.manual_seed(--seed) for each input")
    gen.add_argument("--seed", type=int, default=None, metavar="S",
                     help="with --sample: the random seed, set before each input's generation (default: 0)")
    images = parser.add_argument_group("input images (a ViT --model_dir)")
    images.add_argument("--image", action="append", default=[], type=Path, metavar="FILE",
                        help="an image file; repeat the flag for several images")
    images.add_argument("--image-dir", "--image_dir", action="append", default=[], type=Path, metavar="DIR",
                        help="a folder of images (.png, .jpg, ...), taken in name order; may be repeated")
    torch_group = parser.add_argument_group("a plain PyTorch model (instead of --model_dir)")
    torch_group.add_argument("--torch-model", "--torch_model", default=None, metavar="MODULE:FUNCTION",
                             help="'package.module:build' or 'file.py:build': a function returning an "
                             "nn.Module with an nn.TransformerEncoder. THIS RUNS YOUR CODE (imported by name)")
    torch_group.add_argument("--weights", type=Path, default=None, metavar="FILE",
                             help="state dict for --torch-model: .safetensors (preferred) or .pt/.pth/.bin, "
                             "read with torch.load(weights_only=True)")
    torch_group.add_argument("--data", type=Path, default=None, metavar="FILE.npy",
                             help="embeddings of shape (batch, seq, dim) fed to the first encoder layer")
    torch_group.add_argument("--mask-zero-rows", action="store_true",
                             help="treat trailing all-zero rows of --data as padding (masked keys, not stored)")
    torch_group.add_argument("--causal", action="store_true",
                             help="apply a causal mask in --torch-model's encoder (as is_causal=True would)")
    model = parser.add_argument_group("model")
    model.add_argument("--model_dir", "--model-dir", "--model", type=Path, default=None, metavar="DIR",
                       help="a transformers model folder (config.json + weights); "
                       "default: the packaged all-MiniLM-L6-v2")
    model.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps", "auto"],
                       help="where to run the model (default: cpu; auto picks cuda, then mps, then cpu)")
    model.add_argument("--method", choices=["manual", "hf"], default="manual",
                       help="manual (default): attnpipe's own forward pass, for the supported families; "
                       "hf: any other transformers model, attention from its eager output_attentions "
                       "(recorded as method 'hf' in the file)")
    model.add_argument("--trust-remote-code", action="store_true",
                       help="allow a model folder's own Python code to run (off by default; recorded in the file)")
    select = parser.add_argument_group("what to store")
    select.add_argument("--layer", "--layers", nargs="+", default=["all"], metavar="N",
                        help="layer indices to store: 'all' (default), one index, or a list "
                        "('0,2,-1' or '0 2 -1'); negative indices count from the end")
    select.add_argument("--heads", "--head", nargs="+", default=["all"], metavar="N",
                        help="head indices to store, like --layer (default: all)")
    select.add_argument("--max-length", "--max_length", type=int, default=None, metavar="N",
                        help="truncate texts to N tokens; truncated texts are flagged and reported "
                        "(default: the model's limit)")
    select.add_argument("--dtype", default="float32", choices=["float32", "float16", "uint8"],
                        help="storage dtype of the probabilities (computation is always float32); "
                        "uint8 stores round(p*255), read back as p = v/255 (error <= 0.002; .h5 only)")
    select.add_argument("--compression", default="gzip", choices=["gzip", "lzf", "none"],
                        help="HDF5 chunk compression (default: gzip with shuffle)")
    select.add_argument("--compression-level", type=int, default=None, metavar="0-12",
                        help="gzip level: 0-3 fast (ISA-L), 4-12 smaller (libdeflate); default 1 for "
                        "float32/float16, whose low bytes do not compress, 6 for uint8")
    select.add_argument("--rows", default="all", choices=["all", "cls", "last"],
                        help="query rows stored: all (default), cls (position 0) or last (last token); "
                        "cls/last store (layer, head, 1, n) for long inputs (.h5 only)")
    select.add_argument("--schema-version", type=int, default=None, choices=[2, 3],
                        help="HDF5 layout: 3 (packed: a text costs its bytes, no HDF5 objects; the default) "
                        "or 2 (one group per text, as attnpipe wrote before); docs/FORMAT.md")
    select.add_argument("--metrics-only", action="store_true",
                        help="store the per-head metrics of analyze_attention.py (docs/METRICS.md) "
                        "instead of the matrices, for corpora too big to keep (.h5 only)")
    select.add_argument("--metrics", default="all", metavar="A,B",
                        help="with --metrics-only: comma-separated metric names (default: all)")
    out = parser.add_argument_group("output")
    out.add_argument("--output_file", "--output-file", "-o", type=Path, default=Path("attention_data.json"),
                     metavar="FILE", help=".json (one text: tokens, text, attention_matrices) or .h5 (any number of "
                     "texts); its folder is created if missing; default: attention_data.json")
    run = parser.add_argument_group("running")
    run.add_argument("--batch-size", "--batch_size", type=int, default=None,
                     help="most texts per forward pass; texts are grouped by length, and a pass holds at most "
                     "--max-tokens-per-batch padded tokens (default: 128)")
    run.add_argument("--max-tokens-per-batch", type=int, default=None, metavar="N",
                     help="padded tokens (texts x longest length) per forward pass (default: 4096)")
    run.add_argument("--batch-attention-mb", type=float, default=None, metavar="MB",
                     help="most MiB of one layer's float32 attention per forward pass (texts x heads x "
                     "length^2 x 4 bytes): longer texts go in smaller batches (default: 16; raise it on a GPU)")
    run.add_argument("--threads", type=int, default=None, metavar="N",
                     help="CPU threads for torch (default: torch's choice, all cores; 1 for a light model, whose layers "
                     "cost a token under 256 k multiply-adds: the other cores then write)")
    run.add_argument("--estimate", action="store_true",
                     help="print the expected output size and run time (after a short calibration "
                     "on a few texts), write nothing, and exit")
    run.add_argument("--verify", action="store_true",
                     help="also run transformers' eager attention on every batch, record the largest "
                     "difference in the file, and fail if it exceeds --verify-tol")
    run.add_argument("--verify-tol", type=float, default=None, metavar="X",
                     help="tolerance for --verify (default: 1e-5)")
    grad = parser.add_argument_group("gradients (attnpipe/extract/gradients.py; inputs run one at a time)")
    grad.add_argument("--explain", "--grad-target", default=None, metavar="T",
                      help="also store d target / d attention (for pairs: encoder, decoder and cross), "
                      "head-gate gradients and gradient x input for this target. By input kind: "
                      "'predicted' or a class index: texts (a ...ForSequenceClassification checkpoint) "
                      "and images (ViT ...ForImageClassification); 'next-token': texts of causal LMs, "
                      "and pairs (the likeliest token at the last decoder position); 'similarity:OTHER TEXT': "
                      "texts and pairs (cosine of mean-pooled (encoder) states); 'output-norm': every kind, "
                      "the only one for --torch-model (norm of the mean final hidden state)")
    grad.add_argument("--ablate", action="store_true",
                      help="with --explain: also re-run with each head's gate at 0 and store the change "
                      "in the target (L x H ablated copies of each input, run in batches)")
    grad.add_argument("--attribution", choices=("ig",), default=None,
                      help="with --explain: also store the integrated-gradients attribution of each stored "
                      "layer's attention, A x integral of d target / d(alpha A) over alpha in [0, 1] (Hao et al. "
                      "2021; attnpipe/extract/attribution.py), and each layer's completeness gap")
    grad.add_argument("--ig-steps", type=int, default=None, metavar="M",
                      help="with --attribution ig: quadrature steps (default: 20)")
    grad.add_argument("--ig-method", default=None, metavar="Q",
                      help="with --attribution ig: gausslegendre (default), riemann_right (the paper's) or "
                      "riemann_middle")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    return parser


def main(argv: list[str] | None = None, *, whole_process: bool = False) -> int:
    args = build_parser().parse_args(argv)
    if whole_process:  # see cli()
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads OpenMP
        gc.disable()
    try:
        from attnpipe.extract import command  # here, so that --help answers at once, without loading torch
    finally:
        if whole_process:
            gc.freeze()
            gc.enable()
    return command.main(args)


def cli() -> int:
    """The installed command (pyproject.toml [project.scripts]): errors as one line, exit 2.

    Two settings of the process, for a run whose writer thread works beside the forward pass:
    - torch's OpenMP threads sleep between parallel regions (OMP_WAIT_POLICY=PASSIVE, unless the
      environment sets it) instead of spinning on the core the writer needs. Small BERT, 20k short
      texts, 2 cores: the process used 13.5 CPU-s at the default against 9.0, and HF eager / ours
      was 0.78 against 0.95 (3 rounds, interleaved with HF); MiniLM's whole process: unchanged.
      OMP_WAIT_POLICY=ACTIVE gives the spinning back.
    - torch is imported with the garbage collector off, and what the imports made (~170k objects)
      is then frozen: every full collection had scanned them all, ~0.1 s each, 5 in that run.
    Only the process does this: a caller of main() keeps its own threads and collector."""
    return run_cli(functools.partial(main, whole_process=True))


if __name__ == "__main__":
    sys.exit(cli())
