#!/usr/bin/env python3
"""Extract the attention of a transformer with attnpipe's own explicit forward pass.

Every head's softmax(q·kᵀ/√d + mask) is computed by our pass (not read from a library hook)
and written for real tokens only, as (layer, head, query, key).

Examples:
    # one text -> seed 001's JSON format (default model: the packaged all-MiniLM-L6-v2)
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
import sys
from pathlib import Path

from attnpipe.errors import AttnpipeError, run_cli


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
    source.add_argument("--id-column", default=None,
                        help="column holding a unique id in a .csv/.tsv file (default: row-N)")
    source.add_argument("--source", action="append", default=[], metavar="TEXT",
                        help="encoder-decoder models: a source text; repeat for several, each paired "
                        "with the --target at the same position. A --texts-file .jsonl whose rows have "
                        "source and target fields (and an optional id) gives pairs too")
    source.add_argument("--target", action="append", default=[], metavar="TEXT",
                        help="encoder-decoder models: the target text of the matching --source, run with "
                        "teacher forcing (decoder input = the model's start token + the target shifted right)")
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
    select.add_argument("--metrics-only", action="store_true",
                        help="store the per-head metrics of analyze_attention.py (docs/METRICS.md) "
                        "instead of the matrices, for corpora too big to keep (.h5 only)")
    select.add_argument("--metrics", default="all", metavar="A,B",
                        help="with --metrics-only: comma-separated metric names (default: all)")
    out = parser.add_argument_group("output")
    out.add_argument("--output_file", "--output-file", "-o", type=Path, default=Path("attention_data.json"),
                     metavar="FILE", help=".json (one text, seed 001's format) or .h5 (any number of "
                     "texts); default: attention_data.json")
    run = parser.add_argument_group("running")
    run.add_argument("--batch-size", "--batch_size", type=int, default=32,
                     help="texts per forward pass; texts are grouped by length (default: 32)")
    run.add_argument("--max-tokens-per-batch", type=int, default=None, metavar="N",
                     help="padded tokens (texts x longest length) per forward pass (default: 4096)")
    run.add_argument("--batch-attention-mb", type=float, default=None, metavar="MB",
                     help="most MiB of one layer's float32 attention per forward pass (texts x heads x "
                     "length^2 x 4 bytes): longer texts go in smaller batches (default: 16; raise it on a GPU)")
    run.add_argument("--threads", type=int, default=None, metavar="N",
                     help="CPU threads for torch (default: torch's choice, all cores)")
    run.add_argument("--estimate", action="store_true",
                     help="print the expected output size and run time (after a short calibration "
                     "on a few texts), write nothing, and exit")
    run.add_argument("--verify", action="store_true",
                     help="also run transformers' eager attention on every batch, record the largest "
                     "difference in the file, and fail if it exceeds --verify-tol")
    run.add_argument("--verify-tol", type=float, default=None, metavar="X",
                     help="tolerance for --verify (default: 1e-5)")
    grad = parser.add_argument_group("gradients (attnpipe/extract/gradients.py; texts run one at a time)")
    grad.add_argument("--explain", "--grad-target", default=None, metavar="T",
                      help="also store d target / d attention, head-gate gradients and gradient x input "
                      "for this target: 'predicted' or a class index (sequence-classification "
                      "checkpoints), 'next-token' (causal LMs), 'similarity:OTHER TEXT' (cosine of "
                      "mean-pooled embeddings, any model)")
    grad.add_argument("--ablate", action="store_true",
                      help="with --explain: also re-run with each head's gate at 0 and store the change "
                      "in the target (L x H ablated copies of each text, run in batches)")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported here so that --help answers at once, without loading torch.
    from attnpipe.extract import corpus
    from attnpipe.extract import pairs as extract_seq2seq
    from attnpipe.extract.runner import (
        DEFAULT_BATCH_ATTENTION_MB, DEFAULT_MAX_TOKENS_PER_BATCH, DEFAULT_VERIFY_TOL, ExtractConfig, extract,
    )

    pairs = ()
    result = _extract_other_inputs(args)
    if result is not None:
        _report(args, result)
        return 0
    if args.text and args.texts_file:
        raise AttnpipeError("give --text or --texts-file, not both")
    if args.target and not args.source and _looks_like_gradient_target(args.target[0]):
        raise AttnpipeError(f"--target is the target text of an encoder-decoder pair (with --source); "
                            f"to explain a prediction use --explain {args.target[0]}")
    if args.source or args.target:
        if args.text or args.texts_file:
            raise AttnpipeError("give --source/--target or --text/--texts-file, not both")
        texts, pairs = [], extract_seq2seq.pairs_from_strings(args.source, args.target)
    elif args.texts_file is not None and extract_seq2seq.is_pairs_file(args.texts_file):
        texts, pairs = [], extract_seq2seq.read_pairs_file(args.texts_file)
    elif args.texts_file is not None:
        texts = corpus.read_texts_file(args.texts_file, args.text_column, args.id_column)
    elif args.text:
        texts = corpus.from_strings(args.text)
    else:
        raise AttnpipeError("no texts given: use --text \"...\" or --texts-file FILE")
    if args.ablate and args.explain is None:
        raise AttnpipeError("--ablate needs --explain")
    run_extract = extract
    if args.explain is not None:
        from attnpipe.extract.gradients import extract_with_gradients, parse_target

        if pairs or args.method != "manual":
            raise AttnpipeError("--explain runs attnpipe's own pass of a text model (bert-like, gpt2, "
                                "llama family); not encoder-decoder pairs or --method hf")
        _refuse_text_only_options(args, "--explain (texts run one at a time with gradients)")
        target = parse_target(args.explain)
        run_extract = lambda config: extract_with_gradients(config, target, args.ablate)  # noqa: E731
    if pairs:
        _refuse_text_only_options(args, "encoder-decoder pairs")
    metric_names = None
    if args.metrics.strip() != "all":
        metric_names = tuple(name.strip() for name in args.metrics.split(",") if name.strip())
    config = ExtractConfig(
        texts=tuple(texts),
        output=args.output_file,
        model_dir=args.model_dir,
        layers=tuple(args.layer),
        heads=tuple(args.heads),
        device=args.device,
        batch_size=args.batch_size,
        max_length=args.max_length,
        dtype=args.dtype,
        verify=args.verify,
        verify_tol=DEFAULT_VERIFY_TOL if args.verify_tol is None else args.verify_tol,
        trust_remote_code=args.trust_remote_code,
        progress=False if args.quiet else None,
        pairs=tuple(pairs),
        method=args.method,
        max_tokens_per_batch=args.max_tokens_per_batch or DEFAULT_MAX_TOKENS_PER_BATCH,
        batch_attention_mb=(DEFAULT_BATCH_ATTENTION_MB if args.batch_attention_mb is None
                            else args.batch_attention_mb),
        threads=args.threads,
        compression=args.compression,
        compression_level=args.compression_level,
        rows=args.rows,
        metrics_only=args.metrics_only,
        metrics=metric_names,
    )
    if args.estimate:
        from attnpipe.extract.estimate import estimate

        print(estimate(config).describe())
        return 0
    result = run_extract(config)
    _report(args, result)
    return 0


def _refuse_text_only_options(args, what: str) -> None:
    """--rows, --metrics-only, --compression and --estimate belong to the plain text extraction."""
    used = [flag for flag, on in (("--rows", args.rows != "all"), ("--metrics-only", args.metrics_only),
                                  ("--compression", args.compression != "gzip"),
                                  ("--compression-level", args.compression_level is not None),
                                  ("--estimate", args.estimate)) if on]
    if used:
        raise AttnpipeError(f"{', '.join(used)}: only for the plain extraction of texts, not for {what}")


def _looks_like_gradient_target(value: str) -> bool:
    return value in ("predicted", "next-token") or value.isdigit() or value.startswith("similarity:")


def _extract_other_inputs(args):
    """Images (ViT) or a plain torch model; None when the input is text."""
    from attnpipe.extract.runner import DEFAULT_VERIFY_TOL

    text_given = bool(args.text) or args.texts_file is not None
    images_given = bool(args.image) or bool(args.image_dir)
    torch_given = args.torch_model is not None
    if sum((text_given, images_given, torch_given)) > 1:
        raise AttnpipeError("give one kind of input: texts (--text/--texts-file), images "
                            "(--image/--image-dir) or a torch model (--torch-model with --data)")
    if not torch_given and (args.weights or args.data or args.mask_zero_rows or args.causal):
        raise AttnpipeError("--weights, --data, --mask-zero-rows and --causal go with --torch-model")
    if images_given or torch_given:
        _refuse_text_only_options(args, "images" if images_given else "--torch-model")
    if images_given:
        from attnpipe.extract.images import ImageExtractConfig, collect_images, extract_images

        if args.model_dir is None:
            raise AttnpipeError("--image needs --model_dir: a ViT folder (config.json, weights, preprocessor_config.json)")
        if args.method != "manual":
            raise AttnpipeError("--method hf takes texts; images run through attnpipe's ViT pass")
        return extract_images(ImageExtractConfig(
            images=tuple(collect_images(args.image, args.image_dir)), output=args.output_file,
            model_dir=args.model_dir, layers=tuple(args.layer), heads=tuple(args.heads), device=args.device,
            batch_size=args.batch_size, dtype=args.dtype, verify=args.verify,
            verify_tol=DEFAULT_VERIFY_TOL if args.verify_tol is None else args.verify_tol,
            progress=False if args.quiet else None,
        ))
    if torch_given:
        from attnpipe.extract.embeddings import TorchExtractConfig, extract_torch

        if args.model_dir is not None or args.method != "manual":
            raise AttnpipeError("--torch-model replaces --model_dir and --method")
        if args.data is None:
            raise AttnpipeError("--torch-model needs --data embeddings.npy of shape (batch, seq, dim)")
        if args.verify:
            raise AttnpipeError("--verify compares with transformers; a --torch-model has no transformers "
                                "reference (tests/test_parity_vit_torch.py checks the torch pass)")
        return extract_torch(TorchExtractConfig(
            factory=args.torch_model, data=args.data, output=args.output_file, weights=args.weights,
            layers=tuple(args.layer), heads=tuple(args.heads), device=args.device,
            batch_size=args.batch_size, dtype=args.dtype, mask_zero_rows=args.mask_zero_rows,
            causal=args.causal,
        ))
    return None


def _report(args, result) -> None:
    if result.truncated_ids:
        shown = ", ".join(result.truncated_ids[:10]) + (" ..." if len(result.truncated_ids) > 10 else "")
        print(f"warning: {len(result.truncated_ids)} text(s) longer than --max-length "
              f"{result.max_length} were truncated (flagged 'truncated' in the file): {shown}",
              file=sys.stderr)
    if not args.quiet:
        summary = (f"wrote {result.num_texts} text(s), {result.num_tokens} tokens, "
                   f"{len(result.layers)} layer(s) x {len(result.heads)} head(s) to {result.output}")
        if result.decoder_layers is not None:  # encoder-decoder models
            summary = (f"wrote {result.num_texts} source/target pair(s), {result.num_tokens} tokens, "
                       f"{len(result.layers)} encoder layer(s) x {len(result.heads)} head(s) and "
                       f"{len(result.decoder_layers)} decoder layer(s) x {len(result.decoder_heads)} head(s) "
                       f"(self- and cross-attention) to {result.output}")
        if result.parity_max_abs_diff is not None:
            summary += (f"; verified against transformers eager: max |diff| attention "
                        f"{result.parity_max_abs_diff:.2e}, hidden {result.parity_hidden_max_abs_diff:.2e}")
        print(summary, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_cli(main))
