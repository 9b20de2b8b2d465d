"""Duplicate and near-duplicate texts: the one rule `data split` and `data check` share.

The same email in train and test inflates the test score, and copies rarely stay byte-equal:
a mail client strips accents, upper-cases a subject, turns "n°" into "N", adds a word. Two
texts are grouped when

- they are equal once normalised and stripped of every space (an *exact* duplicate), or
- at least ``threshold`` of their character 5-grams (taken without spaces) or of their distinct
  words are shared, as Jaccard similarity (a *near* duplicate). Characters catch small edits
  and typos; words catch a word added to or dropped from a text of short words, which moves
  many characters at once.

Candidate pairs come from MinHash LSH (datasketch), tuned to miss a pair at the threshold with
probability below 1e-6; each candidate is then verified with the exact Jaccard, so the
threshold is exact. Groups are the connected components of the pairs found.
"""

from __future__ import annotations

import unicodedata
import zlib
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from functools import lru_cache

SHINGLE = 5  # characters per shingle: longer ones make unrelated texts share fewer
NUM_PERM = 128  # MinHash permutations
MAX_MISS = 1e-6  # highest chance LSH misses a pair whose similarity is exactly the threshold
TEMPLATE_SHARE = 0.15  # a word in more than this share of the texts is template (an instruction), not content
MIN_TEXTS_FOR_TEMPLATE = 20  # below this, word frequencies say nothing about a template


class _FoldTable(dict):
    """``str.translate`` table for NFKD-decomposed text, filled on first sight of a character.

    Letters and digits stay (case-folded); spaces stay spaces; punctuation, symbols, combining
    marks (the accents NFKD split off) and invisible characters are dropped, not spaced, so
    "n°2024" and "N2024" fold alike.
    """

    def __missing__(self, code: int) -> str:
        char = chr(code)
        if char.isspace() or unicodedata.category(char).startswith("Z"):
            folded = " "
        elif unicodedata.category(char)[0] in "LN":
            folded = char.casefold()
        else:
            folded = ""
        self[code] = folded
        return folded


_FOLD = _FoldTable()


def normalise_text(text: str) -> str:
    """The words of ``text``, case-folded, without accents or symbols, one space apart.

    NFKD first (ligatures, full-width and superscript forms, accents split off), so a copy that
    went through NFKC or NFKD normalisation folds like the original.
    """
    return " ".join(unicodedata.normalize("NFKD", text.casefold()).translate(_FOLD).split())


def compact_key(text: str) -> str:
    """Exact-duplicate key: the normalised text without any space (a symbol may have stood for one)."""
    return normalise_text(text).replace(" ", "")


def char_shingles(compact: str, size: int = SHINGLE) -> set[str]:
    """Character n-grams of a compact key; a key shorter than ``size`` is its own shingle."""
    if len(compact) <= size:
        return {compact} if compact else set()
    return {compact[i : i + size] for i in range(len(compact) - size + 1)}


def jaccard(a: AbstractSet[Hashable], b: AbstractSet[Hashable]) -> float:
    """Shared share of two sets (0 for two empty sets: nothing to compare)."""
    if not a or not b:
        return 0.0
    shared = len(a & b)
    return shared / (len(a) + len(b) - shared)


def similarity(first: str, second: str) -> float:
    """The near-duplicate similarity of two texts: 1 for exact duplicates, else the better Jaccard."""
    a, b = compact_key(first), compact_key(second)
    if a == b:
        return 1.0
    words = jaccard(set(normalise_text(first).split()), set(normalise_text(second).split()))
    return max(jaccard(char_shingles(a), char_shingles(b)), words)


def lsh_bands(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """LSH (bands, rows per band) that misses a pair at ``threshold`` with probability below MAX_MISS.

    More rows per band mean fewer dissimilar candidates to verify; the most rows that still
    keep misses that rare win.
    """
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if (1 - threshold**rows) ** bands <= MAX_MISS:
            best = (bands, rows)
    return best


def _char_features(folded: str) -> set[bytes]:
    """``char_shingles`` as UTF-32 bytes, 4 a character: the same sets, hashed by a C function."""
    data = folded.replace(" ", "").encode("utf-32-le")
    width = 4 * SHINGLE
    if len(data) <= width:
        return {data} if data else set()
    return {data[i : i + width] for i in range(0, len(data) - width + 4, 4)}


def _word_features(folded: str) -> set[bytes]:
    return {word.encode("utf-8") for word in folded.split()}


def _candidate_pairs(
    folded: Sequence[str], features: Callable[[str], set[bytes]], threshold: float
) -> set[tuple[int, int]]:
    """Index pairs (i < j) whose MinHash signatures share an LSH band: probable near-duplicates.

    Feature sets are made one at a time and dropped once signed: only the signatures (1 kB a
    text) stay in memory. CRC-32 hashes the features (any fixed hash will do: MinHash's random
    permutations come after it); called from C, it halves the time datasketch's default SHA-1 takes.
    """
    from datasketch import MinHash, MinHashLSH  # lazy: importing it (and scipy) takes half a second

    signatures = MinHash.generator((features(text) for text in folded), num_perm=NUM_PERM, hashfunc=zlib.crc32)
    index = MinHashLSH(num_perm=NUM_PERM, params=lsh_bands(threshold))
    pairs: set[tuple[int, int]] = set()
    for position, signature in enumerate(signatures):
        if signature.is_empty():
            continue
        pairs.update((earlier, position) for earlier in index.query(signature))
        index.insert(position, signature)
    return pairs


def _near_pairs(folded: Sequence[str], threshold: float) -> list[tuple[int, int]]:
    """Pairs of distinct folded texts whose characters or words are at least ``threshold`` similar (exactly)."""
    found = []
    for features in (_char_features, _word_features):
        cached = lru_cache(maxsize=256)(lambda i, features=features: features(folded[i]))
        for i, j in sorted(_candidate_pairs(folded, features, threshold)):  # i repeats: its set stays cached
            if jaccard(cached(i), cached(j)) >= threshold:
                found.append((i, j))
    return found


def template_free(folded: Sequence[str]) -> list[str]:
    """Each text without the words a sizeable share of all texts carry: what tells the rows apart.

    Rows often share an instruction ("rediriger l'email suivant vers le bon service...") longer
    than their content; kept, it makes any two short emails look like near-copies. A word in more
    than ``TEMPLATE_SHARE`` of the texts (the instruction's, and the commonest function words) is
    dropped from the comparison once it is in enough texts to tell; a text left empty keeps its words.
    """
    if len(folded) < MIN_TEXTS_FOR_TEMPLATE:
        return list(folded)
    frequency = Counter(word for text in folded for word in set(text.split()))
    # A template word is also in MIN_TEXTS_FOR_TEMPLATE texts or more: a share alone would make the words of an
    # email copied a few times into a small set "template", strip the copies bare and hide that they are copies.
    common = {
        word
        for word, count in frequency.items()
        if count > TEMPLATE_SHARE * len(folded) and count >= MIN_TEXTS_FOR_TEMPLATE
    }
    return [" ".join(word for word in text.split() if word not in common) or text for text in folded]


def _components(size: int, pairs: Iterable[tuple[int, int]]) -> list[int]:
    """Union-find: each index's component root (the smallest index of its component)."""
    parent = list(range(size))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [root(i) for i in range(size)]


def duplicate_groups(texts: Sequence[str], threshold: float | None = None) -> list[list[int]]:
    """Every index of ``texts`` in exactly one group; copies share a group.

    ``threshold`` None or 1: exact duplicates only. Groups are ordered by their first index and
    list their indices in order, so a split built on them is deterministic.
    """
    key_index: dict[str, int] = {}
    folded: list[str] = []  # one folded text per distinct key, for its words and characters
    key_of_text = []
    for text in texts:
        words = normalise_text(text)
        key = words.replace(" ", "")
        if key not in key_index:
            key_index[key] = len(folded)
            folded.append(words)
        key_of_text.append(key_index[key])
    near = threshold is not None and threshold < 1
    roots = _components(len(folded), _near_pairs(template_free(folded), threshold) if near else [])
    groups: dict[int, list[int]] = {}
    for index, key in enumerate(key_of_text):
        groups.setdefault(roots[key], []).append(index)
    return sorted(groups.values(), key=lambda members: members[0])


def repeated_groups(groups: Iterable[list[int]]) -> list[list[int]]:
    """The groups with more than one member: the duplicates to report."""
    return [members for members in groups if len(members) > 1]


def is_exact(texts: Sequence[str], members: Sequence[int]) -> bool:
    """Whether a group's texts are all equal once normalised (else some are near-copies)."""
    return len({compact_key(texts[i]) for i in members}) == 1


def describe_group(members: Sequence[int], names: Sequence[str], shown: int = 4) -> str:
    """A group as its rows, e.g. ``a.jsonl:3 ~ a.jsonl:41``: where to look, for a person."""
    listed = " ~ ".join(names[i] for i in members[:shown])
    return listed + (f" (+{len(members) - shown} more)" if len(members) > shown else "")


def summarise_groups(groups: Sequence[Sequence[int]], names: Sequence[str], shown: int = 3) -> str:
    """One line on the groups: how many, how many rows, the first few by their rows."""
    examples = "; ".join(describe_group(members, names) for members in groups[:shown])
    more = f"; and {len(groups) - shown} more" if len(groups) > shown else ""
    rows = sum(len(members) for members in groups)
    return f"{len(groups)} duplicate group{'s' * (len(groups) != 1)} ({rows} rows), e.g. {examples}{more}"
