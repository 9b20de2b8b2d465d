"""Duplicate detection: copies that differ by case, accents, symbols, spacing or one word are one group."""

import random
import string
import time
import unicodedata

from hypothesis import example, given, settings
from hypothesis import strategies as st

from affinage.data.dedup import (
    char_shingles,
    compact_key,
    duplicate_groups,
    jaccard,
    lsh_bands,
    normalise_text,
    repeated_groups,
    similarity,
    summarise_groups,
)
from affinage.data.split import stratified_split

THRESHOLD = 0.8  # the config's default
SYMBOLS = "°€$%'’«»“”\"-–—!?.,;:…•/()#@*+=&😀✉️"  # each folds to nothing (not №: NFKD makes it "No")
SPACES = [" ", "  ", "\t", "\n", "\u00a0", " \n "]
ACCENTED = {"a": "àâ", "e": "éèêë", "i": "îï", "o": "ôö", "u": "ùûü", "c": "ç"}

WORD = st.text(string.ascii_lowercase + string.digits, min_size=2, max_size=10)
EMAIL_WORDS = st.lists(WORD, min_size=12, max_size=30, unique=True)  # >= 12 distinct words


def _email(words: list[str]) -> str:
    return "Bonjour, " + " ".join(words) + " Cordialement"


def _vocabulary(rng: random.Random, size: int = 300) -> list[str]:
    return ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10))) for _ in range(size)]


def _perturb(text: str, rng: random.Random) -> str:
    """The same email as another system might hand it back: case, accents, symbols and spacing changed."""
    chars = []
    for char in text:
        if rng.random() < 0.3:
            char = char.upper() if char.islower() else char.lower()
        if char.lower() in ACCENTED and rng.random() < 0.3:
            char = rng.choice(ACCENTED[char.lower()])
        if char in SYMBOLS and rng.random() < 0.5:
            char = ""  # a symbol removed
        if char == " ":
            char = rng.choice(SPACES)
        chars.append(char)
        if rng.random() < 0.08:
            chars.append(rng.choice(SYMBOLS))  # a symbol inserted, inside a word or beside a space
    text = "".join(chars)
    if rng.random() < 0.5:  # accents stripped altogether
        text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return rng.choice(SPACES) + text + rng.choice(SPACES)


def test_symbols_dropped_not_spaced_so_variants_are_one_key():
    variants = ["facture n°2024-118", "FACTURE N2024-118", "Facture  n° 2024–118 ", "facture\tn2024118"]
    assert {compact_key(v) for v in variants} == {"facturen2024118"}
    assert duplicate_groups(variants, None) == [[0, 1, 2, 3]]
    assert normalise_text("Candidature  spontanée !") == normalise_text("candidature spontanee")
    assert normalise_text("ﬁn Ｅté ß") == "fin ete ss"  # ligatures, full-width forms, sharp s


def test_a_copy_normalised_by_nfkc_or_nfkd_folds_like_the_original():
    text = "Réf. №2024 – ½ tarif™, ﬁche « İstanbul » x²"
    assert normalise_text(text) == "ref no2024 12 tariftm fiche istanbul x2"
    for form in ("NFC", "NFD", "NFKC", "NFKD"):
        assert normalise_text(unicodedata.normalize(form, text)) == normalise_text(text)


def test_one_row_in_a_group_needs_no_similar_partner():
    assert duplicate_groups(["", "a", "", "b"], THRESHOLD) == [[0, 2], [1], [3]]


@settings(max_examples=60, deadline=None)
@given(EMAIL_WORDS, st.randoms(use_true_random=False), st.sampled_from(["same", "added", "dropped"]), WORD)
def test_a_perturbed_copy_is_detected(words, rng, edit, new_word):
    original = _email(words)
    copy = list(words)
    if edit == "added":
        copy.insert(rng.randrange(len(copy) + 1), new_word)
    elif edit == "dropped":
        del copy[rng.randrange(len(copy))]
    perturbed = _perturb(_email(copy), rng)
    assert duplicate_groups([original, perturbed], THRESHOLD) == [[0, 1]], (original, perturbed)
    if edit == "same":
        assert duplicate_groups([original, perturbed], None) == [[0, 1]]  # exact once folded


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_independent_random_texts_are_not_grouped(seed):
    rng = random.Random(seed)
    vocabulary = _vocabulary(rng)
    first, second = (_email(rng.sample(vocabulary, rng.randint(12, 40))) for _ in range(2))
    assert similarity(first, second) < THRESHOLD
    assert duplicate_groups([first, second], THRESHOLD) == [[0], [1]]


@settings(max_examples=40, deadline=None)
@given(st.integers(3, 12), st.lists(st.integers(0, 11), max_size=12), st.integers(0, 1000), st.integers(0, 2**32 - 1))
# Found by this test: one email copied 7 times among 22 rows had its words taken for a template (in > 15 % of
# the rows), which stripped a copy bare; a template word must now also be in 20 rows or more.
@example(originals=12, copied=[0, 0, 0, 0, 0, 0, 0, 2, 2, 2], seed=0, text_seed=0)
def test_stratified_split_never_splits_a_group(originals, copied, seed, text_seed):
    rng = random.Random(text_seed)
    vocabulary = _vocabulary(rng)
    bodies = [rng.sample(vocabulary, rng.randint(12, 30)) for _ in range(originals)]
    texts = [_email(words) for words in bodies]
    for index in copied:  # perturbed copies, most with one word dropped
        words = list(bodies[index % originals])
        dropped = rng.randrange(len(words) + 3)  # past the end: none dropped
        texts.append(_perturb(_email(words[:dropped] + words[dropped + 1 :]), rng))
    labels = [rng.choice(["RH", "Finance", "SPAM"]) for _ in texts]  # a copy may carry another label
    items = list(range(len(texts)))
    splits = stratified_split(items, labels, texts, (0.8, 0.1, 0.1), seed, THRESHOLD)
    home = {i: number for number, split in enumerate(splits) for i in split}
    assert sorted(home) == items
    groups = duplicate_groups(texts, THRESHOLD)
    for members in groups:
        assert len({home[i] for i in members}) == 1
    for copy, index in enumerate(copied, start=originals):  # each copy is grouped with its original
        assert any({copy, index % originals} <= set(members) for members in groups)


def test_small_edits_that_change_many_words_are_caught_by_characters():
    original = (
        "Bonjour, je vous écris au sujet de la facture numéro 2024-118 concernant la livraison des fournitures "
        "de bureau du mois dernier, le montant indiqué ne correspond pas au devis signé"
    )
    edited = original.replace("la facture", "lafacture").replace("des fournitures", "desfournitures")
    edited = edited.replace("du mois", "dumois").replace("montant", "montent")  # words glued, a typo
    a, b = compact_key(original), compact_key(edited)
    assert jaccard(char_shingles(a), char_shingles(b)) >= THRESHOLD
    assert jaccard(set(normalise_text(original).split()), set(normalise_text(edited).split())) < THRESHOLD
    assert duplicate_groups([original, edited], THRESHOLD) == [[0, 1]]


def test_threshold_one_or_none_is_exact_only():
    original = _email([f"mot{i}" for i in range(20)])
    near = original.replace("mot7 ", "")
    assert similarity(original, near) >= THRESHOLD
    assert duplicate_groups([original, near], THRESHOLD) == [[0, 1]]
    assert duplicate_groups([original, near], 1.0) == duplicate_groups([original, near], None) == [[0], [1]]


def test_lsh_misses_a_pair_at_the_threshold_rarely():
    for threshold in (0.5, 0.8, 0.95, 0.99):
        bands, rows = lsh_bands(threshold)
        assert bands * rows <= 128 and (1 - threshold**rows) ** bands <= 1e-6


def test_groups_are_summarised_by_their_rows():
    line = summarise_groups([[0, 2], [1, 3, 4]], ["a:1", "a:2", "a:3", "a:4", "a:5"])
    assert line == "2 duplicate groups (5 rows), e.g. a:1 ~ a:3; a:2 ~ a:4 ~ a:5"


def test_fifteen_hundred_rows_in_well_under_two_seconds():
    rng = random.Random(0)
    vocabulary = _vocabulary(rng, 2000)
    texts = [_email(rng.sample(vocabulary, rng.randint(20, 120))) for _ in range(1200)]
    texts += [_perturb(text, rng) for text in rng.sample(texts, 300)]
    duplicate_groups(texts[:10], THRESHOLD)  # datasketch imported outside the timing
    started = time.perf_counter()
    groups = repeated_groups(duplicate_groups(texts, THRESHOLD))
    assert time.perf_counter() - started < 2.0
    assert len(groups) == 300


def test_a_shared_instruction_does_not_make_short_emails_near_copies():
    instruction = "[INST] rediriger l'email suivant vers le bon service de l'entreprise : \"{}\"[/INST]"
    emails = [f"CV pour le poste de {job}" for job in ("magasinier", "technicien SAV", "comptable")]
    emails += [f"Question numéro {i} sur la commande {1000 + 37 * i} livrée hier" for i in range(40)]
    emails.append("cv pour le poste de MAGASINIER !")  # a real copy of the first
    groups = repeated_groups(duplicate_groups([instruction.format(e) for e in emails], 0.8))
    assert [0, len(emails) - 1] in groups  # the copy is caught
    assert not any({1, 2} & set(g) for g in groups)  # the same instruction and opening words are not a copy
