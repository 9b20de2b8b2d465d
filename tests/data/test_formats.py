import json

import pytest

from affinage.data.formats import load_examples
from affinage.errors import DataError
from tests.conftest import write_jsonl


def test_three_formats(tmp_path):
    completion = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "completion": "c"}])
    alpaca = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Do it", "input": "now", "output": "done"},
            {"instruction": "Do it", "input": "", "output": "done"},
        ],
    )
    chat = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "s"},
                    {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "a"},
                ]
            },
        ],
    )
    (a,) = load_examples(completion)
    b, c = load_examples(alpaca)
    (d,) = load_examples(chat)
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


# --- CSV, Parquet, plain text, mixed formats ---------------------------------------------------

ROWS = {
    "completion": [
        {"prompt": "Facture 42 en retard", "completion": "Finance"},
        {"prompt": "Je postule, merci", "completion": "RH"},
    ],
    "alpaca": [
        {"instruction": "Classe l'email", "input": "Mon imprimante, encore", "output": "Support"},
        {"instruction": "Dis bonjour", "input": "", "output": "Bonjour"},
    ],
    "chat": [
        {
            "messages": [
                {"role": "system", "content": "Route les emails."},
                {"role": "user", "content": "Relance de paiement"},
                {"role": "assistant", "content": "Finance"},
                {"role": "user", "content": "Et « Candidature » ?"},
                {"role": "assistant", "content": "RH"},
            ]
        }
    ],
    "text": [
        {"text": "Le service RH traite les candidatures.\nLe support, les pannes."},
        {"text": 'Deuxième document, "cité".'},
    ],
}


def _same(examples):
    return [(e.prompt, e.completion, e.messages, e.kind) for e in examples]


def _write_csv(path, rows, delimiter=","):
    import csv

    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, columns, delimiter=delimiter)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v, ensure_ascii=False) if k == "messages" else v for k, v in row.items()})
    return path


@pytest.mark.parametrize("kind", sorted(ROWS))
def test_csv_and_parquet_give_the_same_examples_as_jsonl(tmp_path, kind):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = ROWS[kind]
    expected = _same(load_examples(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert _same(load_examples(_write_csv(tmp_path / "d.csv", rows))) == expected
    assert _same(load_examples(_write_csv(tmp_path / "d.tsv", rows, "\t"))) == expected
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")  # messages: a list<struct> column
    assert _same(load_examples(tmp_path / "d.parquet")) == expected


def test_csv_errors_name_the_file_line(tmp_path):
    path = tmp_path / "d.csv"
    # The header is line 1; the quoted answer spans lines 2-3, so the third row starts on line 4.
    path.write_text('prompt,completion\nFacture,"Fi\nnance"\nCandidature,\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.csv:4: field 'completion' is empty"):
        load_examples(path)
    path.write_text("prompt,completion\nFacture,Finance\nBonjour, ça va,RH\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.csv:3: the row has 3 fields but the header has 2") as error:
        load_examples(path)
    assert "quote" in error.value.fix
    path.write_text(
        "\ufeffprompt,answer\nFacture,Finance\n", encoding="utf-8"
    )  # Excel's byte-order mark is not a column
    with pytest.raises(DataError, match=r"d\.csv:2: cannot tell the row's format \(fields: answer, prompt\)"):
        load_examples(path)


def test_parquet_rows_are_named_by_index(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}]),
        tmp_path / "d.parquet",
    )
    with pytest.raises(DataError, match=r"d\.parquet:row 1: field 'completion' is empty"):
        load_examples(tmp_path / "d.parquet")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        load_examples(tmp_path / "bad.parquet")


def test_text_rows_are_plain_text(tmp_path):
    (example,) = load_examples(write_jsonl(tmp_path / "d.jsonl", [{"text": "Un document."}]))
    assert (example.prompt, example.completion, example.kind) == ("", "Un document.", "text")
    # With configured columns, a 'text' column is an ordinary input.
    (example,) = load_examples(
        write_jsonl(tmp_path / "l.jsonl", [{"text": "Facture", "label": "Finance"}]),
        input_field="text",
        output_field="label",
    )
    assert (example.prompt, example.completion, example.kind) == ("Facture", "Finance", "")


def test_mixed_formats_name_the_line_both_formats_and_the_fix(tmp_path):
    rows = [{"prompt": "p", "completion": "c"}] * 6 + [{"instruction": "i", "output": "o"}]
    with pytest.raises(
        DataError,
        match=r"d\.jsonl:7: mixed formats: this row is Alpaca \(instruction/input/output\) "
        r"but .*d\.jsonl:1 is prompt/completion",
    ) as error:
        load_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    assert "one format per file" in error.value.fix
    # A CSV holding every format's columns: the filled cells tell the rows apart.
    with pytest.raises(
        DataError, match=r"d\.csv:3: mixed formats: this row is plain text \(text\) but .*d\.csv:2 is prompt/completion"
    ):
        load_examples(
            _write_csv(
                tmp_path / "d.csv",
                [{"prompt": "p", "completion": "c", "text": ""}, {"prompt": "", "completion": "", "text": "t"}],
            )
        )


def test_named_template_keeps_the_configured_columns(tmp_path):
    from affinage.config import config_from_dict
    from affinage.data import load_file

    path = write_jsonl(tmp_path / "d.jsonl", [{"email": "Facture 42", "dept": "Finance"}])
    config = config_from_dict(
        {"prompt": {"template": "chatml"}, "input_features": [{"name": "email"}], "output_features": [{"name": "dept"}]}
    )
    (example,) = load_file(config, path)
    assert (example.prompt, example.completion) == ("Facture 42", "Finance")
