import pytest

from affinage.data.formats import load_examples
from affinage.errors import DataError
from tests.conftest import write_jsonl


def test_three_formats(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "p", "completion": "c"},
        {"instruction": "Do it", "input": "now", "output": "done"},
        {"instruction": "Do it", "input": "", "output": "done"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
    ])
    a, b, c, d = load_examples(path)
    assert (a.prompt, a.completion) == ("p", "c")
    assert b.prompt == "Do it\n\nnow" and b.completion == "done"
    assert c.prompt == "Do it"
    assert d.prompt is None and d.completion == "a" and [m["role"] for m in d.messages] == ["system", "user"]


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", completion: b}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2") as error:
        load_examples(path)
    assert "fix:" in str(error.value)


def test_missing_field_is_named(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "x", "answer": "y"}])
    with pytest.raises(DataError, match=r"d.jsonl:2"):
        load_examples(path)


def test_empty_completion_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "  "}])
    with pytest.raises(DataError, match="'completion' is empty"):
        load_examples(path)


def test_empty_file_and_bad_utf8(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_examples(empty)
    latin = tmp_path / "l.jsonl"
    latin.write_bytes('{"prompt": "a", "completion": "b"}\n{"prompt": "é", "completion": "b"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"l.jsonl:2.*UTF-8"):
        load_examples(latin)


def test_custom_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"email": "hello", "dept": "RH"}])
    (example,) = load_examples(path, input_field="email", output_field="dept")
    assert (example.prompt, example.completion) == ("hello", "RH")
