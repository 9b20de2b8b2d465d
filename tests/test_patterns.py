import pytest

from affinage.errors import ConfigError
from affinage.evaluate.patterns import hearts_score, resolve_checker


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Virgin 💓 Australia 💓 commenced 💓 services.", 1.0),
        ("💔 An 💔 egg 💔 is 💔 a 💔 shell", 1.0),  # a heart before the first word is tolerated (seed 002's outputs)
        ("465 💕 m 💕 de 💕 hauteur. 💕", 1.0),  # stopped right after a heart
        ("♡ In ♡ machine ⚖ learning, ♡ fine-tuning", 0.0),  # one gap holds another symbol
        ("An ♥ egg 💔 is", 0.0),  # two different hearts
        ("An egg ♥ is", 0.0),  # one gap without a heart
        ("An egg is a shell", 0.0),
        ("Paris", 0.0),  # no gap to check
        ("", 0.0),
        ("a ♥ ♥ b", 0.0),
    ],
)
def test_hearts_score(text, expected):
    assert hearts_score(text) == expected


def test_user_checker(tmp_path):
    (tmp_path / "checks.py").write_text("def short(text):\n    return len(text.split()) <= 3\n")
    checker = resolve_checker("checks.short", str(tmp_path))
    assert checker("one two") == 1.0 and checker("one two three four") == 0.0
    with pytest.raises(ConfigError):
        resolve_checker("sparkles")
