"""Quality rules: a clean document passes every rule; crafted documents fail exactly the rule they target."""

import json
import random
import time

import pytest

from llmkit.data.quality import QualityRules, check_document, document_measures, load_quality_rules
from llmkit.errors import LlmkitError
from tests.helpers import shakespeare_text

GOOD = (
    "The old library at the edge of town opened its doors again this spring after a long renovation.\n"
    "Volunteers spent months sorting donated books, repairing shelves and painting the reading room a warm shade of "
    "green.\nChildren now gather there on Saturday mornings to hear stories, while their parents browse the new "
    "collection of local history.\nThe head librarian said that the building should have a future as a meeting place "
    "for everyone, with evening classes, a small café and a garden behind the main hall where neighbours can relax."
)
WORDS = GOOD.split()
NO_STOP_WORDS = (
    "Bright morning light filled every corner as fishermen dragged heavy nets across wet sand. Gulls circled above, "
    "calling loudly while small boats returned from distant waters. Several merchants arrived early, hoping for fresh "
    "cod, herring or crab. Prices rose quickly because storms had kept most crews ashore during previous weeks. Nobody "
    "complained much; everyone seemed glad simply for calm weather, warm bread from nearby ovens, strong coffee served "
    "in chipped mugs, plus lively conversation about boats, markets, families or old friends."
)
PHRASE_SOURCE = (
    "quiet rivers carry silver fish beneath ancient stone bridges while patient herons wait among tall reeds "
    "hungry foxes wander through misty meadows searching for careless rabbits near hidden burrows beyond crumbling "
    "walls distant bells announce evening prayers across sleepy villages"
).split()
SHORT_WORDS = "a an it is to be of we go up on in at by so no do me my he us or if am as".split()
LONG_WORDS = ("internationalization responsibilities characteristically telecommunications incomprehensibility "
              "misrepresentations counterproductive electroencephalogram disproportionately institutionalization "
              "overenthusiastically uncharacteristically compartmentalization interdisciplinary").split()


def spread(extra: list[str], words: list[str] = WORDS) -> str:
    """The words with each `extra` piece inserted at evenly spaced places, as one line."""
    step = len(words) / len(extra)
    out = list(words)
    for index, piece in reversed(list(enumerate(extra))):
        out.insert(int(index * step) + 1, piece)
    return " ".join(out)


def lines_of(words: list[str], count: int) -> list[str]:
    size = -(-len(words) // count)
    return [" ".join(words[i: i + size]) for i in range(0, len(words), size)]


def random_words(vocabulary: list[str], count: int, seed: int) -> list[str]:
    generator = random.Random(seed)
    return [generator.choice(vocabulary) for _ in range(count)]


def with_only(*names: str) -> QualityRules:
    """Rules with every rule disabled except `names`."""
    return QualityRules(disabled=frozenset(QualityRules().rule_names()) - set(names))


def one_word_lines_repeated() -> str:
    """12 lines, 7 of them followed by "Share": 6 of 19 lines repeat, few characters do, and no n-gram repeats."""
    return "\n".join(line for index, text in enumerate(lines_of(WORDS, 12)) for line in [text, "Share"][: 1 + (index < 7)])


def one_word_paragraphs_repeated() -> str:
    """6 paragraphs of 3 lines, then 5 paragraphs "Share": 4 of 11 paragraphs repeat but only 4 of 23 lines."""
    paragraphs = ["\n".join(lines_of(WORDS[start: start + 16], 3)) for start in range(0, 96, 16)]
    return "\n\n".join(paragraphs + ["Share"] * 5)


CASES = {
    "min_words": (" ".join(WORDS[:30]), QualityRules()),
    "max_words": (GOOD, QualityRules(max_words=60)),
    "min_mean_word_length": (" ".join(random_words(SHORT_WORDS, 70, seed=0)), QualityRules()),
    "max_mean_word_length": (" ".join(["the", "of", *random_words(LONG_WORDS, 60, seed=0)]), QualityRules()),
    "symbol_to_word_ratio": (spread(["#news"] * 12), QualityRules()),
    "ellipsis_lines": ("\n".join(line + ("..." if index % 2 else "") for index, line in enumerate(lines_of(WORDS, 10))),
                       QualityRules()),
    "bullet_lines": ("\n".join("• " + line for line in lines_of(WORDS, 10)), QualityRules()),
    "alpha_words": (spread([str(1900 + year) for year in range(25)]), QualityRules()),
    "stop_words": (NO_STOP_WORDS, QualityRules()),
    "lorem_ipsum": (GOOD + "\nLorem ipsum dolor sit amet.", QualityRules()),
    "dup_lines": (one_word_lines_repeated(), QualityRules()),
    "dup_paragraphs": (one_word_paragraphs_repeated(), QualityRules()),
    "top_2gram": (spread(["New York"] * 20), QualityRules()),
    "top_3gram": (spread(["United States Congress"] * 8), QualityRules()),
    "top_4gram": (spread(["Royal Botanic Gardens Edinburgh"] * 4), QualityRules()),
    # repeated text trips several repetition rules at once by design; these check the character rules on their own
    "dup_line_chars": ("\n".join([*lines_of(WORDS, 10), *lines_of(WORDS, 10)[:3]]),
                       with_only("dup_line_chars", "dup_lines")),
    "dup_paragraph_chars": ("\n\n".join([*lines_of(WORDS, 3), lines_of(WORDS, 3)[0]]),
                            with_only("dup_paragraph_chars", "dup_paragraphs")),
}


def test_clean_document_passes_every_rule():
    assert check_document(GOOD, QualityRules()) == []
    measures = document_measures(GOOD)
    assert measures["words"] == len(WORDS)
    assert measures["stop_words"] >= 10 and measures["alpha_word_fraction"] == 1.0


@pytest.mark.parametrize("rule", sorted(CASES))
def test_document_fails_exactly_its_rule(rule):
    document, rules = CASES[rule]
    assert check_document(document, rules) == [rule], document_measures(document)


@pytest.mark.parametrize("n", range(5, 11))
def test_repeated_phrases_fail_the_duplicate_ngram_rules_up_to_their_length(n):
    # -(-30 // n) distinct n-word phrases, each said twice far apart: n-grams up to n repeat, (n+1)-grams do not
    phrases = [" ".join(PHRASE_SOURCE[i * n: (i + 1) * n]) for i in range(-(-30 // n))]
    document = spread(phrases + phrases)
    assert check_document(document, QualityRules()) == [f"dup_{k}gram" for k in range(5, n + 1)]


def test_repetition_measures_on_a_hand_counted_text():
    measures = document_measures("a b c d e x a b c d e y")  # 12 one-letter words
    assert measures["duplicate_5gram_char_fraction"] == pytest.approx(5 / 12)  # the second "a b c d e"
    assert measures["duplicate_6gram_char_fraction"] == 0.0
    assert measures["top_2gram_char_fraction"] == pytest.approx(2 * 2 / 12)  # "a b" (and each pair) twice
    lines = document_measures("hello\nworld\nhello\n\nhello")
    assert lines["duplicate_line_fraction"] == pytest.approx(2 / 4)
    assert lines["duplicate_line_char_fraction"] == pytest.approx(10 / 20)
    assert lines["duplicate_paragraph_fraction"] == 0.0  # "hello\nworld\nhello" and "hello" differ
    paragraphs = document_measures("hello\nworld\n\nhello\nworld\n \nbye")
    assert paragraphs["duplicate_paragraph_fraction"] == pytest.approx(1 / 3)
    assert paragraphs["duplicate_paragraph_char_fraction"] == pytest.approx(11 / 25)  # "hello\nworld" is 11 characters


def test_disabling_a_rule_keeps_the_document():
    short = CASES["min_words"][0]
    assert check_document(short, QualityRules(disabled=frozenset({"min_words"}))) == []
    assert check_document(short, load_quality_rules(disable=["min_words"])) == []
    assert check_document("", QualityRules()) == ["min_words", "min_mean_word_length", "alpha_words", "stop_words"]


def test_unknown_rule_name_lists_the_valid_ones():
    with pytest.raises(LlmkitError, match=r"unknown quality rule\(s\) \['min_wrods'\]: valid names are min_words, "):
        load_quality_rules(disable=["min_wrods"])


def test_rules_file_overrides_fields_and_merges_ngram_sizes(tmp_path):
    yaml_file = tmp_path / "rules.yaml"
    yaml_file.write_text("min_words: 10\nmax_top_ngram_char_fraction: {2: 0.5}\ndisabled: [stop_words]\n")
    rules = load_quality_rules(yaml_file, disable=["lorem_ipsum"])
    assert rules.min_words == 10 and rules.max_top_ngram_char_fraction == {2: 0.5, 3: 0.18, 4: 0.16}
    assert rules.disabled == {"stop_words", "lorem_ipsum"}
    json_file = tmp_path / "rules.json"
    json_file.write_text(json.dumps({"max_duplicate_ngram_char_fraction": {"11": 0.09}}))
    assert "dup_11gram" in load_quality_rules(json_file).enabled_rule_names()


@pytest.mark.parametrize(("content", "name", "message"), [
    ("min_wordz: 10\n", "rules.yaml", r"unknown field\(s\) \['min_wordz'\]; valid fields are min_words, max_words"),
    ("disabled: [top_9gram]\n", "rules.yaml", r"unknown quality rule\(s\) \['top_9gram'\]: valid names are"),
    ("min_words: many\n", "rules.yaml", "threshold min_words must be a number, not 'many'"),
    ("max_top_ngram_char_fraction: [0.2]\n", "rules.yaml", "must map n-gram sizes to thresholds"),
    ("- min_words\n", "rules.yaml", "must hold a mapping of QualityRules fields"),
    ("{min_words: 1", "rules.json", "cannot be parsed"),
    ("min_words = 1\n", "rules.toml", r"must be \.json, \.yaml, \.yml"),
])  # fmt: skip
def test_bad_rules_file_is_named_in_the_error(tmp_path, content, name, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(LlmkitError, match=message):
        load_quality_rules(path)


def test_missing_rules_file():
    with pytest.raises(LlmkitError, match="quality rules file nowhere.yaml does not exist"):
        load_quality_rules("nowhere.yaml")


def test_speed_on_tinyshakespeare():
    text = shakespeare_text()
    documents = [text[i: i + 5000] for i in range(0, len(text), 5000)]
    start = time.perf_counter()
    failed = [check_document(document, QualityRules()) for document in documents]
    seconds = time.perf_counter() - start
    assert seconds < len(text) / 250_000, f"{len(text) / seconds / 1e6:.2f} MB/s"  # ~5 MB/s measured; 0.25 MB/s floor
    assert sum(not rules for rules in failed) > 0.8 * len(documents)  # plays are mostly kept (short repeated lines aside)
