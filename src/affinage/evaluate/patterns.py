"""Pattern checkers: score one generated output in [0, 1] against a rule, not a reference.

The ``pattern`` evaluation task runs a checker over every output; ``hearts`` is seed 002's
rule, and any ``module.function`` taking the output text can be named in the config.
"""

from __future__ import annotations

from collections.abc import Callable

from affinage.data.transforms import HEARTS
from affinage.userfn import import_user_function

Checker = Callable[[str], float]


def hearts_score(text: str) -> float:
    """1.0 when every gap between two words holds the same heart from seed 002's list.

    Words are whitespace-separated. A heart before the first or after the last word is
    tolerated (generation may open with one or stop right after one); an answer with fewer
    than two words has no gap to check and scores 0.
    """
    tokens = text.split()
    heart = next((t for t in tokens if t in HEARTS), None)
    if heart is None:
        return 0.0
    while tokens and tokens[0] == heart:
        tokens.pop(0)
    while tokens and tokens[-1] == heart:
        tokens.pop()
    words, gaps = tokens[0::2], tokens[1::2]
    if len(words) < 2 or len(tokens) % 2 == 0:
        return 0.0
    ok = all(gap == heart for gap in gaps) and not any(word in HEARTS for word in words)
    return 1.0 if ok else 0.0


NAMED: dict[str, Checker] = {"hearts": hearts_score}


def resolve_checker(name: str, base_dir: str = ".") -> Checker:
    """A named checker or a user function given as ``module.function``."""
    if name in NAMED:
        return NAMED[name]
    function = import_user_function(name, base_dir, "eval.pattern", list(NAMED))

    def checked(text: str) -> float:
        return float(function(text))

    return checked
