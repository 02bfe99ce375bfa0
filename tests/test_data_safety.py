"""Harmful-content rules (C4 block list, the HH-RLHF classifier) and the safety pass inside `llmkit filter`."""

import json

import numpy as np
import pytest

from llmkit.checkpoints import load_tokenizer
from llmkit.commands.prepare import prepare_corpus
from llmkit.data.filter import filter_documents
from llmkit.data.harmful import (
    HH_RLHF_FILE,
    Blocklist,
    builtin_blocklist,
    builtin_classifier,
    evaluate_classifier,
    final_reply,
    hh_rlhf_split,
    train_classifier,
)
from llmkit.data.safety import HarmfulRule, SafetyRules, load_safety_rules
from llmkit.data.sft import filter_records
from llmkit.data.shared import shared_data_file
from llmkit.data.templates import SFTRecord
from llmkit.errors import LlmkitError
from tests.helpers import cli_status, run_cli, write_jsonl

CLEAN = "The river rose after the storm, and the village moved its boats to higher ground before night."
WITH_PII = "Write to anna.berg@example.com or call +46 8 123 456 78 about the boats. Our office is at 10.20.30.40."


def test_blocklist_matches_whole_words_and_phrases():
    blocklist = Blocklist(["bad", "two words"])
    assert blocklist.hits("A BAD day; two  words? no: Two words.") == ["bad", "two words"]
    assert blocklist.hits("badly, badge, sinbad, two-words") == []
    builtin = Blocklist()
    assert len(builtin_blocklist()) == 403 and builtin.hits(CLEAN) == []
    assert builtin.hits("what a bastard") == ["bastard"] and builtin.hits("Scunthorpe United") == []


def test_classifier_learns_from_hh_rlhf_and_beats_chance():
    model, report = builtin_classifier()
    assert report.examples > 800
    # held-out pairs never seen in training; chance is 0.5 for both (labels are balanced by construction)
    assert report.accuracy > 0.53 and report.pairwise_accuracy > 0.53
    train, held_out = hh_rlhf_split(shared_data_file(HH_RLHF_FILE))
    assert len(held_out) == report.examples and 0.19 < len(held_out) / (len(train) + len(held_out)) < 0.21
    assert [label for _, label in held_out] == [0, 1] * (len(held_out) // 2)  # (chosen, rejected) pairs kept whole
    assert evaluate_classifier(model, train).accuracy > report.accuracy  # it fits what it saw better


def test_thresholds_are_monotonic():
    model, _ = builtin_classifier()
    _, held_out = hh_rlhf_split(shared_data_file(HH_RLHF_FILE))
    reports = [evaluate_classifier(model, held_out, threshold) for threshold in (0.2, 0.4, 0.5, 0.6, 0.8)]
    flagged = [report.recall for report in reports]
    assert flagged == sorted(flagged, reverse=True) and flagged[0] > flagged[-1]
    rule_low, rule_high = HarmfulRule("classifier", 0.2), HarmfulRule("classifier", 0.8)
    texts = [text for text, _ in held_out[:200]]
    low = {text for text in texts if rule_low.check(text)}
    high = {text for text in texts if rule_high.check(text)}
    assert high <= low and len(high) < len(low)


def test_train_classifier_checks_its_inputs_and_separates_a_clear_signal():
    texts = [f"you are {word} and awful" for word in ("vile", "rotten", "nasty")] * 10
    texts += [f"thank you, that is {word}" for word in ("kind", "lovely", "helpful")] * 10
    model = train_classifier(texts, [1] * 30 + [0] * 30)
    low, high = model.scores(["thank you, lovely"]), model.scores(["you are vile"])
    assert high[0] > 0.9 > 0.1 > low[0]
    with pytest.raises(LlmkitError, match="0/1 labels"):
        train_classifier(["a", "b"], [1])
    assert final_reply("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: x\n\nAssistant: last one ") == "last one"


def test_safety_pass_counts_what_it_changed():
    documents = [CLEAN, WITH_PII, "a bastard of a day, mail x@example.com", CLEAN.upper(), WITH_PII]
    kept, report = filter_documents(documents, rules=None, exact_dedup=True, near_dedup=False,
                                    safety=SafetyRules(pii="redact", harmful="drop"))
    kept = list(kept)
    expected_redacted = "Write to <EMAIL> or call <PHONE> about the boats. Our office is at <IP>."
    assert kept == [CLEAN, expected_redacted]
    assert report.dropped_documents == {"harmful_blocklist": 1, "exact_duplicate": 2}
    # the one kept document with PII was redacted once per type; its duplicate was dropped after redaction
    changed = sum(before != after for before, after in zip([CLEAN, WITH_PII], kept))
    assert report.redacted_documents == {"pii_email": changed, "pii_phone": changed, "pii_ip": changed}
    assert report.redacted_spans == {"pii_email": 1, "pii_phone": 1, "pii_ip": 1}
    assert report.redacted_units == {"pii_email": 1, "pii_phone": 5, "pii_ip": 1}
    assert report.failed_documents["pii_email"] == 3  # the harmful one held an address too
    row = report.to_dict()["reasons"]["pii_phone"]
    assert row == {"dropped_documents": 0, "dropped_words": 0, "failed_documents": 2, "redacted_documents": 1,
                   "redacted_words": 5, "redacted_spans": 1}
    assert "| pii_phone | 0 | 0.0% | 0 | 0.0% | 2 | 1 | 5 |" in report.to_markdown()


def test_drop_and_report_modes():
    documents = [CLEAN, WITH_PII]
    kept, report = filter_documents(documents, None, False, False, safety=SafetyRules(pii="drop"))
    assert list(kept) == [CLEAN] and report.dropped_documents == {"pii_email": 1}
    kept, report = filter_documents(documents, None, False, False, safety=SafetyRules(pii="report", harmful="report"))
    assert list(kept) == documents and report.dropped_documents == {}
    findings = [(index, [span.kind for span in spans]) for index, spans in report.pii_findings]
    assert findings == [(1, ["email", "phone", "ip"])]
    kept, report = filter_documents(documents, None, False, False, safety=SafetyRules(pii="off"))
    assert list(kept) == documents and report.reasons == []


def test_rules_file_and_flags(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("min_words: 3\npii: redact\npii_allow: [press@example.org]\nharmful: report\n")
    safety = load_safety_rules(rules, harmful="drop", pii_types=None)
    assert (safety.pii, safety.pii_allow, safety.harmful) == ("redact", ("press@example.org",), "drop")
    with pytest.raises(LlmkitError, match="--pii 'redakt'"):
        SafetyRules(pii="redakt")
    with pytest.raises(LlmkitError, match="--harmful_threshold must be in"):
        HarmfulRule("classifier", 1.5)


def test_filter_verb_with_safety(tmp_path, capsys):
    rows = [{"text": CLEAN}, {"text": WITH_PII}, {"text": "Ask press@example.org for the kit."}]
    source = write_jsonl(tmp_path / "raw.jsonl", rows)
    out = tmp_path / "clean.jsonl"
    code, stdout, _ = run_cli(capsys, "filter", "--data", str(source), "--output", str(out), "--rules",
                              str(write_rules(tmp_path)), "--pii", "redact", "--pii_allow", "[press@example.org]")
    assert code == 0 and "pii_email" in stdout
    kept = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert kept == [CLEAN, "Write to <EMAIL> or call <PHONE> about the boats. Our office is at <IP>.",
                    "Ask press@example.org for the kit."]
    report = json.loads((tmp_path / "clean.report.json").read_text())
    assert report["reasons"]["pii_ip"]["redacted_documents"] == 1 and report["safety"]["pii"] == "redact"
    code, _, _ = run_cli(capsys, "filter", "--data", str(source), "--output", str(tmp_path / "r.jsonl"), "--rules",
                         str(write_rules(tmp_path)), "--pii", "report")
    findings = [json.loads(line) for line in (tmp_path / "r.pii.jsonl").read_text().splitlines()]
    assert code == 0 and findings == [{"document": 1, "spans": [[9, 30, "email"], [39, 55, "phone"], [90, 101, "ip"]]},
                                      {"document": 2, "spans": [[4, 21, "email"]]}]
    assert (WITH_PII[9:30], WITH_PII[39:55]) == ("anna.berg@example.com", "+46 8 123 456 78")
    code, err = cli_status(capsys, "filter", "--data", str(source), "--output", str(tmp_path / "x.jsonl"),
                           "--pii", "redact", "--pii_types", "[mail]")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: unknown PII type(s) ['mail']")
    assert not (tmp_path / "x.jsonl").exists()


def write_rules(tmp_path):
    path = tmp_path / "quality.yaml"
    path.write_text("disabled: [min_words, stop_words, alpha_words]\n")  # short test documents pass
    return path


def test_filter_records_redacts_every_field_and_drops_harmful_rows():
    records = [
        SFTRecord("Sure, mail me at bo@example.com.", instruction="Reply", input="I am at +1 555 010 9999"),
        SFTRecord("You bastard.", instruction="Insult me"),
        SFTRecord("Fine.", messages=({"role": "user", "content": "my IP is 10.1.1.1"},)),
        SFTRecord("No personal data here.", instruction="Say something"),
    ]
    kept, report = filter_records(records, SafetyRules(pii="redact", harmful="drop"))
    assert [record.output for record in kept] == ["Sure, mail me at <EMAIL>.", "Fine.", "No personal data here."]
    assert kept[0].input == "I am at <PHONE>" and kept[0].instruction == "Reply"
    assert kept[1].messages == ({"role": "user", "content": "my IP is <IP>"},) and kept[2] == records[3]
    assert report.dropped_documents == {"harmful_blocklist": 1}
    assert sum(before != after for before, after in zip([records[0], records[2], records[3]], kept)) == 2
    assert report.redacted_documents == {"pii_email": 1, "pii_phone": 1, "pii_ip": 1}


def test_prepare_applies_the_safety_rules(tmp_path):
    source = write_jsonl(tmp_path / "raw.jsonl", [{"text": CLEAN}, {"text": WITH_PII}, {"text": "what a bastard"}] * 10)
    manifest = prepare_corpus([str(source)], tmp_path / "shards", vocab_size=300, progress=False,
                              safety=SafetyRules(pii="redact", harmful="drop"))
    assert manifest["settings"]["safety"]["pii"] == "redact"
    splits = manifest["splits"]
    assert sum(split["n_documents"] for split in splits.values()) == 20
    reasons = manifest["safety_report"]["reasons"]
    assert reasons["harmful_blocklist"]["dropped_documents"] == 10 and reasons["pii_email"]["redacted_documents"] == 10
    tokenizer = load_tokenizer(tmp_path / "shards" / "tokenizer")
    ids = np.concatenate([np.fromfile(tmp_path / "shards" / entry["name"], dtype=manifest["dtype"])
                          for split in splits.values() for entry in split["files"]])
    text = tokenizer.decode(ids.tolist())
    assert "<EMAIL>" in text and "anna.berg" not in text and "bastard" not in text


def test_finetune_refuses_bad_safety_flags_before_loading_a_model(capsys):
    code, err = cli_status(capsys, "finetune", "--pii", "redact", "--pii_types", "[card]")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: unknown PII type(s) ['card']")
