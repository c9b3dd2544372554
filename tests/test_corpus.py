"""The corpus reader: ids by input kind, line numbers, separators inside texts, workflow shards."""

import json

import pytest

from attnpipe.errors import AttnpipeError
from attnpipe.extract.corpus import (
    duplicate_ids,
    from_strings,
    num_shards,
    pairs_from_strings,
    read_pairs_file,
    read_texts_file,
    shard,
    Text,
    shard_digest,
    write_jsonl,
)


def test_only_newline_separates_texts(tmp_path):
    # U+2028 and a form feed are characters of a text, not line breaks (str.splitlines would split).
    path = tmp_path / "t.txt"
    path.write_bytes("the cat\u2028sat\r\nsecond\x0cpart\n\nthird\n".encode())
    texts = read_texts_file(path)
    assert [(t.id, t.text) for t in texts] == [
        ("line-1", "the cat\u2028sat"), ("line-2", "second\x0cpart"), ("line-4", "third")]


def test_jsonl_keeps_raw_line_separators_inside_strings(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [{"id": "a", "text": "one\u2028two"}, {"id": "b", "text": "three\u2029"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    assert [(t.id, t.text) for t in read_texts_file(path)] == [("a", "one\u2028two"), ("b", "three\u2029")]


def test_ids_by_input_kind(tmp_path):
    """The one id scheme (module docstring of attnpipe.extract.corpus), for each kind of input."""
    assert [t.id for t in from_strings(["a", "b"])] == ["text-0", "text-1"]
    assert [p.id for p in pairs_from_strings(["a", "b"], ["x", "y"])] == ["pair-0", "pair-1"]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"id": 7, "text": "two"}\n{"text": "three"}\n', encoding="utf-8")
    assert [t.id for t in read_texts_file(jsonl)] == ["line-1", "7", "line-4"]
    table = tmp_path / "t.csv"
    table.write_text("name,text\nx,one\ny,two\n", encoding="utf-8")
    assert [t.id for t in read_texts_file(table)] == ["row-1", "row-2"]
    assert [t.id for t in read_texts_file(table, id_column="name")] == ["x", "y"]
    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"source": "a", "target": "b"}\n{"id": "q", "source": "c", "target": "d"}\n')
    assert [p.id for p in read_pairs_file(pairs)] == ["line-1", "q"]


def test_shards_keep_the_ids_and_texts(tmp_path):
    """A shard written for the workflow reads back with the ids and texts of the corpus file."""
    path = tmp_path / "t.txt"
    path.write_text("first\n\nsecond \u2028 half\nthird\r\nfourth\n", encoding="utf-8")
    texts = read_texts_file(path)
    assert num_shards(len(texts), 3) == 2
    back = []
    for index in range(2):
        write_jsonl(tmp_path / f"shard_{index}.jsonl", shard(texts, 3, index))
        back += read_texts_file(tmp_path / f"shard_{index}.jsonl")
    assert back == texts
    assert [t.id for t in back] == ["line-1", "line-3", "line-4", "line-5"]
    assert shard_digest(texts[:3]) != shard_digest(texts[1:4])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard_0.jsonl", "shard_1.jsonl", "t.txt"]


def test_duplicate_ids_are_all_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": "x"}) + "\n" for i in "abacba"), encoding="utf-8")
    assert duplicate_ids([Text(i, "x") for i in "abacba"]) == ["a", "b"]
    with pytest.raises(AttnpipeError, match=r"d.jsonl has 3 problems: line 3 repeats text id 'a' \(first on line 1\); "
                       r"line 5 repeats text id 'b' \(first on line 2\); line 6 repeats text id 'a'"):
        read_texts_file(path)
