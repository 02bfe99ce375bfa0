"""PII detectors: positive and negative cases per type with exact redacted outputs, checksums, span rules."""

import random

import pytest

from llmkit.data.pii import PII_TYPES, PiiFinder, iban_valid, luhn_valid, redact
from llmkit.errors import LlmkitError


def redacted(text: str, **options) -> str:
    return redact(text, PiiFinder(**options).find(text))


@pytest.mark.parametrize("text, expected", [
    # e-mail
    ("Write to john.doe+news@mail.example.co.uk today.", "Write to <EMAIL> today."),
    ("a_b@x.io, c-d@sub.domain.org", "<EMAIL>, <EMAIL>"),
    ("not an address: user@localhost or @handle or a@b", "not an address: user@localhost or @handle or a@b"),
    # phone: international, North American, national
    ("Call +44 20 7946 0958 now", "Call <PHONE> now"),
    ("+1-555-123-4567 and +33 1 23 45 67 89 and +4915123456789", "<PHONE> and <PHONE> and <PHONE>"),
    ("(555) 123-4567, 555.123.4567, 555-123-4567", "<PHONE>, <PHONE>, <PHONE>"),
    ("UK 020 7946 0958, DE 030 12345678, FR 01 23 45 67 89", "UK <PHONE>, DE <PHONE>, FR <PHONE>"),
    ("dates 01.02.2023 and 2023-01-15, 555-123.4567, year 1999, ref 12345678, +1 555",
     "dates 01.02.2023 and 2023-01-15, 555-123.4567, year 1999, ref 12345678, +1 555"),
    ("Call me at 5558929. My telephone number is 8456086363; mail bo@yahoo. com", "Call me at <PHONE>. My telephone "
     "number is <PHONE>; mail <EMAIL>"),
    ("In 1999 the town had 1234567 people; bwhite@uk.net. My reply",
     "In 1999 the town had 1234567 people; <EMAIL>. My reply"),
    # IP addresses; version strings are not
    ("host 192.168.1.20 and 8.8.8.8.", "host <IP> and <IP>."),
    ("version 1.2.3.4, v10.0.0.1, release 2.0.0.1, 1.2.3.4.5, 256.1.1.1", "version 1.2.3.4, v10.0.0.1, release 2.0.0.1, "
     "1.2.3.4.5, 256.1.1.1"),
    ("v6 2001:db8::8a2e:370:7334 and fe80::1ff:fe23:4567:890a", "v6 <IP> and <IP>"),
    ("at 12:30:45, x[1::2], std::vector", "at 12:30:45, x[1::2], std::vector"),
    # payment cards: Luhn and issuer prefix
    ("card 4111 1111 1111 1111 ok", "card <CREDIT_CARD> ok"),
    ("amex 3782-822463-10005, mc 5555555555554444", "amex <CREDIT_CARD>, mc <CREDIT_CARD>"),
    ("bad 4111 1111 1111 1112, no issuer 9999 9999 9999 9995, mixed 4111-1111 1111 1111",
     "bad 4111 1111 1111 1112, no issuer 9999 9999 9999 9995, mixed 4111-1111 1111 1111"),
    # IBAN: registered length and mod-97
    ("IBAN GB82 WEST 1234 5698 7654 32.", "IBAN <IBAN>."),
    ("DE89370400440532013000 and FR1420041010050500013M02606", "<IBAN> and <IBAN>"),
    ("GB82 WEST 1234 5698 7654 33 and DE89370400440532013001 and XX89370400440532013000",
     "GB82 WEST 1234 5698 7654 33 and DE89370400440532013001 and XX89370400440532013000"),
    # secrets
    ("aws AKIAIOSFODNN7EXAMPLE, gh ghp_" + "a1B2" * 9 + ".", "aws <SECRET>, gh <SECRET>."),
    ("key sk-proj-abcdefghijklmnopqrstuvwxyz123 and AIza" + "x" * 35, "key <SECRET> and <SECRET>"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY----- done", "<SECRET> done"),
    ("a task-runner, sk-short, AKIA1234", "a task-runner, sk-short, AKIA1234"),
])
def test_redaction_table(text, expected):
    assert redacted(text) == expected


def test_checksums():
    assert luhn_valid("4111111111111111") and luhn_valid("378282246310005") and not luhn_valid("4111111111111112")
    assert luhn_valid("0") and not luhn_valid("1")
    assert iban_valid("GB82 WEST 1234 5698 7654 32") and iban_valid("NL91ABNA0417164300")
    assert not iban_valid("GB82WEST123456987654")  # 20 characters: GB IBANs have 22
    assert not iban_valid("NL91ABNA0417164301")


def test_spans_never_overlap_and_prefer_the_longest():
    text = "mail sales+555-123-4567@example.com or 4111111111111111@example.com; +44 20 7946 0958"
    spans = PiiFinder().find(text)
    assert [span.kind for span in spans] == ["email", "email", "phone"]
    assert all(first.end <= second.start for first, second in zip(spans, spans[1:]))


def test_redaction_is_idempotent_and_leaves_clean_text_byte_identical():
    rng = random.Random(0)
    pieces = ["john@example.com", "+44 20 7946 0958", "10.1.2.3", "4111 1111 1111 1111", "DE89370400440532013000",
              "AKIAIOSFODNN7EXAMPLE", "the", "river", "1999", "v1.2.3.4", "ünïcødé —", "\n\n"]
    finder = PiiFinder()
    for _ in range(50):
        text = " ".join(rng.choice(pieces) for _ in range(20))
        once = redact(text, finder.find(text))
        assert redact(once, finder.find(once)) == once
    clean = "Ünïcødé text — with tabs\tand 3.14, 2024-05-01, v1.2.3.4\r\nand no personal data.  "
    assert finder.find(clean) == [] and redact(clean, finder.find(clean)) == clean


def test_allow_list_and_type_choice():
    text = "press@example.org and alice@example.org at 10.0.0.1"
    assert redacted(text, allow=["PRESS@example.org"]) == "press@example.org and <EMAIL> at <IP>"
    assert redacted(text, types=["ip"]) == "press@example.org and alice@example.org at <IP>"
    with pytest.raises(LlmkitError, match="unknown PII type"):
        PiiFinder(types=["mail"])
    with pytest.raises(LlmkitError, match="none chosen"):
        PiiFinder(types=[])
    assert set(PII_TYPES) == {"email", "phone", "ip", "credit_card", "iban", "secret"}
