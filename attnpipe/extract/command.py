"""What extract_attention.py does with its parsed flags: read the inputs, run, report.

The input-kind dispatch (texts, source/target pairs, images, a torch model's embeddings) lives
here and in the runner, so the script is argparse and one call.
"""

from __future__ import annotations

import argparse
import sys

from attnpipe.errors import AttnpipeError
from attnpipe.extract import corpus
from attnpipe.extract.batching import DEFAULT_BATCH_ATTENTION_MB, DEFAULT_BATCH_SIZE, DEFAULT_MAX_TOKENS_PER_BATCH
from attnpipe.extract.generate import GenerationSettings
from attnpipe.extract.runner import DEFAULT_VERIFY_TOL, ExtractConfig, ExtractResult, extract


def looks_like_gradient_target(value: str) -> bool:
    return value in ("predicted", "next-token", "output-norm") or value.isdigit() or value.startswith("similarity:")


def read_inputs(args: argparse.Namespace) -> dict:
    """The config fields holding the inputs: texts, pairs, images or a torch model's data."""
    text_given = bool(args.text) or args.texts_file is not None
    images_given = bool(args.image) or bool(args.image_dir)
    torch_given = args.torch_model is not None
    if sum((text_given or bool(args.source or args.target), images_given, torch_given)) > 1:
        raise AttnpipeError("give one kind of input: texts (--text/--texts-file), images "
                            "(--image/--image-dir) or a torch model (--torch-model with --data)")
    if images_given:
        from attnpipe.extract.images import collect_images

        return {"images": tuple(collect_images(args.image, args.image_dir))}
    if torch_given:
        if args.method != "manual":
            raise AttnpipeError("--torch-model replaces --model_dir and --method")
        return {"torch_model": args.torch_model}
    if args.file is not None:  # seed 003: source sentences whose targets the model generates
        if args.text or args.texts_file or args.source or args.target:
            raise AttnpipeError("--file gives the source sentences: not with --text, --texts-file, --source "
                                "or --target")
        if corpus.is_pairs_file(args.file):
            return {"pairs": tuple(corpus.read_pairs_file(args.file))}
        texts = corpus.read_texts_file(args.file, args.text_column, args.id_column)
        return {"pairs": tuple(corpus.Pair(t.id, t.text, None) for t in texts)}
    if args.text and args.texts_file:
        raise AttnpipeError("give --text or --texts-file, not both")
    if args.target and not args.source and looks_like_gradient_target(args.target[0]):
        raise AttnpipeError(f"--target is the target text of an encoder-decoder pair (with --source); "
                            f"to explain a prediction use --explain {args.target[0]}")
    if args.source or args.target:
        if args.text or args.texts_file:
            raise AttnpipeError("give --source/--target or --text/--texts-file, not both")
        return {"pairs": tuple(corpus.pairs_from_strings(args.source, args.target))}
    if args.texts_file is not None and corpus.is_pairs_file(args.texts_file):
        return {"pairs": tuple(corpus.read_pairs_file(args.texts_file))}
    if args.texts_file is not None:
        read = corpus.read_corpus(args.texts_file, args.text_column, args.id_column, skip_empty=args.skip_empty)
        return {"texts": read.texts, "skipped_empty": read.skipped_empty}
    if args.skip_empty:
        raise AttnpipeError("--skip-empty skips the empty texts of a --texts-file; an empty --text is a mistake")
    if args.text:
        return {"texts": tuple(corpus.from_strings(args.text))}
    raise AttnpipeError("no texts given: use --text \"...\" or --texts-file FILE")


def check_output_is_not_an_input(args: argparse.Namespace) -> None:
    """--output_file must not be an input of the run, nor inside the model folder it reads."""
    from attnpipe.store.atomic import check_not_an_input

    model_dirs = [args.model_dir]
    if args.model_dir is None and args.torch_model is None:
        from attnpipe.extract.loading import default_model_dir

        try:
            model_dirs.append(default_model_dir())
        except AttnpipeError:  # the package is missing: said when the model loads
            pass
    inputs = [args.texts_file, getattr(args, "data", None), getattr(args, "weights", None),
              *(args.image or ()), getattr(args, "image_dir", None)]
    check_not_an_input(args.output_file, inputs, model_dirs)


def first_inputs(inputs: dict, count: int | None) -> dict:
    """--num-examples N: the first N of the inputs (texts, pairs or images)."""
    if count is None:
        return inputs
    if count < 1:
        raise AttnpipeError(f"--num-examples must be at least 1, got {count}")
    if "torch_model" in inputs:
        raise AttnpipeError("--num-examples takes the first texts, pairs or images; a --torch-model's --data "
                            "is used whole")
    return {name: value[:count] for name, value in inputs.items()}


def generation_from_args(args: argparse.Namespace, inputs: dict) -> GenerationSettings | None:
    """The generation settings of the flags, or None; refuses generation flags that cannot apply."""
    pairs = inputs.get("pairs", ())
    untargeted = bool(pairs) and all(pair.target is None for pair in pairs)
    given = [flag for flag, on in (("--max-new-tokens", args.max_new_tokens is not None),
                                   ("--num-beams", args.num_beams is not None), ("--sample", args.sample),
                                   ("--seed", args.seed is not None)) if on]
    if args.generate is not None:
        if pairs:
            raise AttnpipeError("--generate N continues texts with a causal language model; an encoder-decoder "
                                "generates the target of each --source given without --target (its length: "
                                "--max-new-tokens N)")
        if "texts" not in inputs:
            raise AttnpipeError("--generate N continues texts (--text/--texts-file) with a causal language model")
        if args.max_new_tokens is not None:
            raise AttnpipeError("--generate N already says how many tokens to add; --max-new-tokens is for "
                                "encoder-decoder targets")
        kind, count = "continuation", args.generate
    elif untargeted:
        kind = "target"
        count = args.max_new_tokens  # None: DEFAULT_MAX_NEW_TOKENS, within the decoder's limit
    elif given:
        if pairs:
            raise AttnpipeError(f"{given[0]} is for generating the target, but --target gives it: give one of "
                                "them (without --target the model writes the target)")
        raise AttnpipeError(f"{given[0]} sets how text is generated: add --generate N (causal LMs) or give "
                            "--source without --target (encoder-decoders)")
    else:
        return None
    if args.seed is not None and not args.sample:
        raise AttnpipeError("--seed seeds --sample; greedy decoding and beam search are deterministic")
    return GenerationSettings(kind=kind, max_new_tokens=count,
                              num_beams=1 if args.num_beams is None else args.num_beams,
                              do_sample=args.sample, seed=0 if args.seed is None else args.seed)


def config_from_args(args: argparse.Namespace) -> ExtractConfig:
    check_output_is_not_an_input(args)
    inputs = first_inputs(read_inputs(args), args.num_examples)
    generation = generation_from_args(args, inputs)
    if args.explain is not None:
        from attnpipe.extract.gradients import parse_target

        parse_target(args.explain)  # a malformed target fails before any model loads
    if args.attribution is not None or args.ig_steps is not None or args.ig_method is not None:
        from attnpipe.extract.attribution import check_request

        check_request(args.explain, args.attribution, args.ig_steps, args.ig_method)
    metric_names = None
    if args.metrics.strip() != "all":
        metric_names = tuple(name.strip() for name in args.metrics.split(",") if name.strip())
    return ExtractConfig(
        **inputs,
        output=args.output_file,
        model_dir=args.model_dir,
        layers=tuple(args.layer),
        heads=tuple(args.heads),
        device=args.device,
        batch_size=DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size,
        max_length=args.max_length,
        dtype=args.dtype,
        verify=args.verify,
        verify_tol=DEFAULT_VERIFY_TOL if args.verify_tol is None else args.verify_tol,
        trust_remote_code=args.trust_remote_code,
        progress=False if args.quiet else None,
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
        weights=args.weights,
        data=args.data,
        mask_zero_rows=args.mask_zero_rows,
        causal=args.causal,
        explain=args.explain,
        ablate=args.ablate,
        generation=generation,
        **({} if args.schema_version is None else {"schema_version": args.schema_version}),
        attribution=args.attribution,
        **({} if args.ig_steps is None else {"ig_steps": args.ig_steps}),
        **({} if args.ig_method is None else {"ig_method": args.ig_method}),
    )


def main(args: argparse.Namespace) -> int:
    """extract_attention.py after argparse: extract (or --estimate) and report on stderr."""
    config = config_from_args(args)
    if args.estimate:
        from attnpipe.extract.estimate import estimate

        if config.generation is not None:
            raise AttnpipeError("--estimate calibrates the extraction alone; it does not model generation: "
                                "time a run on a few inputs (--num-examples N) instead")

        print(estimate(config).describe())
        return 0
    report(extract(config), quiet=args.quiet)
    if config.skipped_empty and not args.quiet:
        lines = ", ".join(map(str, config.skipped_empty[:20])) + (" ..." if len(config.skipped_empty) > 20 else "")
        print(f"skipped {len(config.skipped_empty)} empty text(s) of {args.texts_file} (--skip-empty): "
              f"line(s) {lines}", file=sys.stderr)
    return 0


def report(result: ExtractResult, quiet: bool = False) -> None:
    if result.truncated_ids:
        shown = ", ".join(result.truncated_ids[:10]) + (" ..." if len(result.truncated_ids) > 10 else "")
        print(f"warning: {len(result.truncated_ids)} text(s) longer than --max-length "
              f"{result.max_length} were truncated (flagged 'truncated' in the file): {shown}",
              file=sys.stderr)
    if quiet:
        return
    summary = (f"wrote {result.num_texts} text(s), {result.num_tokens} tokens, "
               f"{len(result.layers)} layer(s) x {len(result.heads)} head(s) to {result.output}")
    if result.decoder_layers is not None:  # encoder-decoder models
        summary = (f"wrote {result.num_texts} source/target pair(s), {result.num_tokens} tokens, "
                   f"{len(result.layers)} encoder layer(s) x {len(result.heads)} head(s) and "
                   f"{len(result.decoder_layers)} decoder layer(s) x {len(result.decoder_heads)} head(s) "
                   f"(self- and cross-attention) to {result.output}")
    if result.generation is not None:
        what = "continuation" if result.generation["kind"] == "continuation" else "target"
        summary += (f"; the model generated {result.generated_tokens} {what} token(s) "
                    f"({result.generation['strategy']}, at most {result.generation['max_new_tokens']} each)")
    if result.parity_max_abs_diff is not None:
        summary += (f"; verified against transformers eager: max |diff| attention "
                    f"{result.parity_max_abs_diff:.2e}, hidden {result.parity_hidden_max_abs_diff:.2e}")
    print(summary, file=sys.stderr)
