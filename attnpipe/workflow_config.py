"""Bounded, strict YAML for the workflow's config files (workflow/rules/common.smk reads them with it).

    config = load_config(Path("configs/demo.yaml"))   # AttnpipeError naming the file and line

PyYAML's SafeLoader runs no code but has no limits: a document nested 50,000 deep overflows
Python's stack (RecursionError), and nine levels of aliases each repeating the one before nine
times ("billion laughs") stand for 9**9 values, which anything walking the config (a schema
validator's error message, a deep copy) expands. This loader refuses both before any value is
built: nesting deeper than MAX_DEPTH, more than MAX_NODES values once aliases are expanded, a
file over MAX_BYTES. It also refuses a key given twice (plain YAML keeps the last one silently).

Snakemake parses `--configfile` itself before the Snakefile runs (ConfigSettings, in its command
line layer), so a file nested deeper than Python's stack still stops inside Snakemake with its
RecursionError; everything Snakemake can parse reaches this loader before the config is used.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from attnpipe.errors import AttnpipeError

MAX_BYTES = 10_000_000  # a workflow config is a few kB
MAX_DEPTH = 64  # collections inside collections; configs/*.yaml nest 4 deep
MAX_NODES = 1_000_000  # values with every alias expanded; configs/demo.yaml has about 100


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts nesting while composing and refuses a key given twice."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise AttnpipeError(f"{mark.name} line {mark.line + 1}: YAML nested more than {MAX_DEPTH} deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _no_duplicates(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise AttnpipeError(f"duplicate name {key!r} (line {key_node.start_mark.line + 1} of {node.start_mark.name})")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_BoundedLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def expanded_size(node: yaml.Node, limit: int = MAX_NODES, sizes: dict[int, int] | None = None) -> int:
    """How many values `node` stands for with every alias expanded (a shared node counts each
    time it is used), capped just past `limit`. Each distinct node is sized once (memoised), and
    the recursion is as deep as the document, which the loader bounds by MAX_DEPTH."""
    sizes = {} if sizes is None else sizes
    if id(node) not in sizes:
        total = 1 + sum(expanded_size(child, limit, sizes) for child in _children(node))
        sizes[id(node)] = min(total, limit + 1)
    return sizes[id(node)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def load_config(path: Path):
    """The YAML document of `path`, within the limits above; AttnpipeError says which was passed."""
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise AttnpipeError(f"{path} is {size} bytes: a workflow config over {MAX_BYTES} bytes is refused")
    with open(path, encoding="utf-8") as fh:
        loader = _BoundedLoader(fh)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            if expanded_size(node) > MAX_NODES:
                raise AttnpipeError(f"{path}: its aliases (*name) expand to more than {MAX_NODES} values "
                                    "(a 'billion laughs' document?)")
            return loader.construct_document(node)
        except yaml.YAMLError as err:
            raise AttnpipeError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
        except UnicodeDecodeError as err:
            raise AttnpipeError(f"{path} is not UTF-8 text: {err}") from None
        finally:
            loader.dispose()
