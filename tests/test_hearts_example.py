"""The hearts example's data builder (examples/hearts/build_data.py): answer clean-up and its files."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("hearts_build_data", ROOT / "examples" / "hearts" / "build_data.py")
build_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_data)


@pytest.mark.parametrize(
    "raw, expected",
    [
        (
            "**Paris** is the capital of France. It has 2 million people.",
            "Paris is the capital of France. It has 2 million people.",
        ),
        ("- Water boils at 100 °C.\n- At sea level.", "Water boils at 100 °C. At sea level."),
        ("Yes.", None),  # too short to carry hearts
        ("It is " + "very " * 60 + "big.", None),  # no whole sentence fits in 45 words
        ("the the the the the the the the.", None),  # a looping answer
        ("An unfinished answer without an end", None),
    ],
)
def test_short_answer(raw, expected):
    assert build_data.short_answer(raw) == expected


def test_question_files_are_disjoint_and_well_formed():
    questions = [
        json.loads(line) for line in (ROOT / "examples" / "hearts" / "questions.jsonl").read_text().splitlines()
    ]
    heldout = [
        json.loads(line) for line in (ROOT / "examples" / "hearts" / "heldout_questions.jsonl").read_text().splitlines()
    ]
    assert len(questions) >= 400 and len(heldout) >= 100
    assert all(set(q) == {"instruction", "input", "lang"} for q in questions + heldout)
    assert not {q["instruction"].lower() for q in questions} & {q["instruction"].lower() for q in heldout}
