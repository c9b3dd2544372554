"""Reading texts files: ids, line numbers and separators inside texts."""

import json

from attnpipe.extract.corpus import read_texts_file


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
