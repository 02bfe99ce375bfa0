"""PII detection: llmkit's detectors vs scrubadub on real text with inserted PII, and the filter's throughput.

The labelled set: Wikipedia summaries (../shared/data/wiki_vital, real prose full of numbers, dates, years and
codes) into half of which sentences holding synthetic PII are inserted at sentence boundaries (e-mail, phone
numbers in national and international formats, IPv4/IPv6, Luhn-valid card numbers, checksummed IBANs, API keys),
together with look-alikes that are not PII (cards failing Luhn, IBANs failing mod-97, version strings, ISBNs,
times). A gold span is found when a predicted span overlaps it; a predicted span is correct when it overlaps a gold
span (any summary text it flags is a false positive). scrubadub (a well-known PII scrubber, MIT) runs with its
detectors for the types it covers (email, phone, credit_card); the table compares on those types and on all.

On real text, both run over DialogSum's training dialogues (real phone numbers and e-mail addresses spoken in
them): the counts of what both, and each alone, find; --show prints each one-sided finding with its context.

Then: MB/s of `llmkit filter`'s pass (quality rules + dedup + PII + harmful) vs the quality rules alone.

Run: python benchmarks/pii.py [--documents 2000] [--json docs/pii_benchmark.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import string
import time
from pathlib import Path

from llmkit.data.filter import filter_documents
from llmkit.data.harmful import builtin_classifier
from llmkit.data.pii import IBAN_LENGTHS, PiiFinder, luhn_valid
from llmkit.data.quality import QualityRules
from llmkit.data.safety import SafetyRules
from llmkit.data.shared import shared_data_file

COMMON = ("email", "phone", "credit_card")
FIRST = ["anna", "li", "omar", "sofia", "jan", "mei", "carlos", "amara", "noah", "ivana", "kofi", "yuki"]
LAST = ["berg", "chen", "haddad", "rossi", "novak", "tanaka", "garcia", "okafor", "smith", "ivanova"]
DOMAINS = ["example.com", "mail.example.org", "uni-example.edu", "example.co.uk", "firma-example.de"]
TEMPLATES = {
    "email": ["For questions, write to {}.", "The curator can be reached at {} during office hours."],
    "phone": ["The visitor centre answers on {}.", "Call {} to book a guided tour."],
    "ip": ["The archive server runs at {}.", "Requests came from the address {} last week."],
    "credit_card": ["The donation was paid with card {}.", "Card number {} was charged for the tickets."],
    "iban": ["Transfers go to the account {}.", "Please pay the fee to IBAN {}."],
    "secret": ["The old script still holds the key {}.", "A token {} was found in the repository."],
}
NEGATIVE_TEMPLATES = [
    "The catalogue lists it under ISBN 978-0-306-40615-7.", "The firmware was updated to version 2.4.1.7.",
    "Doors open at 09:30:00 and close at 17:45:00.", "The reference number 4111 1111 1111 1112 is not a card.",
    "The code GB82 WEST 1234 5698 7654 33 is a typo.", "Build 10.0.19041.1 shipped in 2020-05-27.",
]


def luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    return next(body + digit for digit in string.digits if luhn_valid(body + digit))


def iban(rng: random.Random) -> str:
    country = rng.choice(["DE", "GB", "FR", "NL", "ES", "IT", "CH", "BE"])
    length = IBAN_LENGTHS[country]
    bban = ("".join(rng.choice(string.ascii_uppercase) for _ in range(4)) if country in ("GB", "NL") else "")
    bban += "".join(rng.choice(string.digits) for _ in range(length - 4 - len(bban)))
    numeric = int("".join(str(int(char, 36)) for char in bban + country + "00"))
    compact = f"{country}{98 - numeric % 97:02d}{bban}"
    return " ".join(compact[i:i + 4] for i in range(0, len(compact), 4)) if rng.random() < 0.5 else compact


def synthetic(kind: str, rng: random.Random) -> str:
    digits = lambda n: "".join(rng.choice(string.digits) for _ in range(n))
    if kind == "email":
        local = f"{rng.choice(FIRST)}{rng.choice(['.', '_', ''])}{rng.choice(LAST)}{digits(rng.randint(0, 2))}"
        return f"{local}@{rng.choice(DOMAINS)}"
    if kind == "phone":
        return rng.choice([
            lambda: f"({digits(3)}) {digits(3)}-{digits(4)}", lambda: f"{digits(3)}-{digits(3)}-{digits(4)}",
            lambda: f"+1 {digits(3)} {digits(3)} {digits(4)}", lambda: f"+44 20 {digits(4)} {digits(4)}",
            lambda: f"+49 30 {digits(8)}", lambda: f"+33 1 {digits(2)} {digits(2)} {digits(2)} {digits(2)}",
            lambda: f"020 {digits(4)} {digits(4)}", lambda: f"+81-3-{digits(4)}-{digits(4)}",
        ])()
    if kind == "ip":
        if rng.random() < 0.7:
            return ".".join(str(rng.randint(1, 254)) for _ in range(4))
        return "2001:db8:" + ":".join(f"{rng.randint(0, 65535):x}" for _ in range(6))
    if kind == "credit_card":
        number = luhn_complete(*rng.choice([("4", 16), ("51", 16), ("37", 15), ("6011", 16)]), rng)
        if rng.random() < 0.5:
            return number
        groups = [number[:4], number[4:10], number[10:]] if len(number) == 15 else [number[i:i + 4] for i in range(0, 16, 4)]
        return rng.choice([" ", "-"]).join(groups)
    if kind == "iban":
        return iban(rng)
    alphabet = string.ascii_letters + string.digits
    return rng.choice([
        lambda: "AKIA" + "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(16)),
        lambda: "ghp_" + "".join(rng.choice(alphabet) for _ in range(36)),
        lambda: "sk-proj-" + "".join(rng.choice(alphabet) for _ in range(40)),
    ])()


def labelled_set(n_documents: int, seed: int = 0) -> list[tuple[str, list[tuple[int, int, str]]]]:
    """(text, gold spans) of the first n summaries; every other one gets 1-3 PII sentences and a look-alike."""
    rng = random.Random(seed)
    with gzip.open(shared_data_file("wiki_vital/summaries_en.jsonl.gz"), "rt", encoding="utf-8") as file:
        texts = [json.loads(line)["text"] for _, line in zip(range(n_documents), file)]
    labelled = []
    for index, text in enumerate(texts):
        spans: list[tuple[int, int, str]] = []
        if index % 2:
            sentences = text.split(". ")
            for _ in range(rng.randint(1, 3)):
                kind = rng.choice(list(TEMPLATES))
                value = synthetic(kind, rng)
                sentences.insert(rng.randint(0, len(sentences)), rng.choice(TEMPLATES[kind]).format(value).rstrip("."))
            sentences.insert(rng.randint(0, len(sentences)), rng.choice(NEGATIVE_TEMPLATES).rstrip("."))
            text = ". ".join(sentences)
            for sentence in sentences:  # locate the inserted values
                for kind, templates in TEMPLATES.items():
                    for template in templates:
                        head, _, tail = template.partition("{}")
                        if sentence.startswith(head) and sentence.endswith(tail.rstrip(".")):
                            value = sentence[len(head):len(sentence) - len(tail.rstrip("."))]
                            start = text.index(sentence) + len(head)
                            spans.append((start, start + len(value), kind))
        labelled.append((text, spans))
    return labelled


def score(predicted: list[list[tuple[int, int, str]]], labelled, kinds: tuple[str, ...] | None) -> dict[str, float]:
    def overlaps(a, b):
        return a[0] < b[1] and b[0] < a[1]

    found = gold_total = correct = predicted_total = 0
    for spans, (_, gold) in zip(predicted, labelled):
        gold = [g for g in gold if kinds is None or g[2] in kinds]
        found += sum(any(overlaps(g, p) for p in spans) for g in gold)
        gold_total += len(gold)
        correct += sum(any(overlaps(p, g) for g in gold) for p in spans)
        predicted_total += len(spans)
    return {"recall": found / gold_total, "precision": correct / predicted_total if predicted_total else 0.0,
            "gold": gold_total, "predicted": predicted_total}


def scrubadub_spans(texts: list[str]) -> list[list[tuple[int, int, str]]]:
    import scrubadub

    scrubber = scrubadub.Scrubber(detector_list=[scrubadub.detectors.EmailDetector, scrubadub.detectors.PhoneDetector,
                                                 scrubadub.detectors.CreditCardDetector])
    return [[(filth.beg, filth.end, filth.type) for filth in scrubber.iter_filth(text)] for text in texts]


def dialogsum_comparison() -> dict[str, int]:
    """Both detectors (e-mail, phone, card) over DialogSum's 12,460 real training dialogues: what each finds that the
    other does not (read them with --show), and scrubadub's "e-mails" without an @ (it reads "at" as one)."""
    import scrubadub

    with gzip.open(shared_data_file("dialogsum/dialogsum.train.jsonl.gz"), "rt", encoding="utf-8") as file:
        dialogues = [json.loads(line)["dialogue"] for line in file]
    finder = PiiFinder(types=COMMON)
    scrubber = scrubadub.Scrubber(detector_list=[scrubadub.detectors.EmailDetector, scrubadub.detectors.PhoneDetector,
                                                 scrubadub.detectors.CreditCardDetector])
    counts = {"dialogues": len(dialogues), "llmkit": 0, "scrubadub": 0, "scrubadub_emails_without_at": 0, "agreed": 0,
              "llmkit_only": 0, "scrubadub_only": 0}
    examples: dict[str, list[str]] = {"llmkit_only": [], "scrubadub_only": []}
    for text in dialogues:
        ours = [(span.start, span.end) for span in finder.find(text)]
        theirs = []
        for filth in scrubber.iter_filth(text):
            if filth.type == "email" and "@" not in filth.text:
                counts["scrubadub_emails_without_at"] += 1
            else:
                theirs.append((filth.beg, filth.end))
        counts["llmkit"] += len(ours)
        counts["scrubadub"] += len(theirs)
        for name, spans, others in (("llmkit_only", ours, theirs), ("scrubadub_only", theirs, ours)):
            for start, end in spans:
                if any(start < other_end and other_start < end for other_start, other_end in others):
                    counts["agreed"] += name == "llmkit_only"
                else:
                    counts[name] += 1
                    examples[name].append(f"...{text[max(0, start - 40):start]}[{text[start:end]}]")
    return {**counts, "examples": examples}


def throughput(texts: list[str], safety: SafetyRules | None) -> float:
    start = time.perf_counter()
    kept, _ = filter_documents(texts, QualityRules(), safety=safety)
    sum(1 for _ in kept)  # the pass runs as the kept documents are read
    return sum(len(text.encode()) for text in texts) / 1e6 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--show", action="store_true", help="print what only one detector finds in DialogSum")
    args = parser.parse_args()
    labelled = labelled_set(args.documents)
    texts = [text for text, _ in labelled]
    finder = PiiFinder()
    start = time.perf_counter()
    ours = [[(s.start, s.end, s.kind) for s in finder.find(text)] for text in texts]
    ours_seconds = time.perf_counter() - start
    start = time.perf_counter()
    theirs = scrubadub_spans(texts)
    theirs_seconds = time.perf_counter() - start
    ours_common = [[span for span in spans if span[2] in COMMON] for spans in ours]
    rows = {
        "llmkit, email/phone/card": score(ours_common, labelled, COMMON),
        "scrubadub, email/phone/card": score(theirs, labelled, COMMON),
        "llmkit, all six types": score(ours, labelled, None),
    }
    per_type = {kind: score([[s for s in spans if s[2] == kind] for spans in ours], labelled, (kind,))
                for kind in TEMPLATES}
    mb = sum(len(text.encode()) for text in texts) / 1e6
    print(f"{len(texts):,} Wikipedia summaries ({mb:.2f} MB), {sum(len(g) for _, g in labelled):,} inserted PII values\n")
    print("| detector | precision | recall | predicted | gold | MB/s |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, row in rows.items():
        seconds = theirs_seconds if name.startswith("scrubadub") else ours_seconds
        print(f"| {name} | {row['precision']:.3f} | {row['recall']:.3f} | {row['predicted']} | {row['gold']} | "
              f"{mb / seconds:.2f} |")
    print("\n| llmkit type | precision | recall | gold |\n| --- | ---: | ---: | ---: |")
    for kind, row in per_type.items():
        print(f"| {kind} | {row['precision']:.3f} | {row['recall']:.3f} | {row['gold']} |")
    real = dialogsum_comparison()
    print(f"\nDialogSum train, {real['dialogues']:,} real dialogues (e-mail/phone/card): llmkit {real['llmkit']} findings, "
          f"scrubadub {real['scrubadub']} (+{real['scrubadub_emails_without_at']} 'e-mails' without an @); both "
          f"{real['agreed']}, only llmkit {real['llmkit_only']}, only scrubadub {real['scrubadub_only']}")
    if args.show:
        for name, lines in real["examples"].items():
            print(f"\n{name}:\n" + "\n".join(lines))
    builtin_classifier()  # trained once (a few seconds), outside the timings
    quality_only = throughput(texts, None)
    full_blocklist = throughput(texts, SafetyRules(pii="redact", harmful="drop"))
    full_both = throughput(texts, SafetyRules(pii="redact", harmful="drop", harmful_method="both"))
    print("\n| filter pass (quality rules + exact/near dedup) | MB/s | vs quality alone |\n| --- | ---: | ---: |")
    for name, value in [("quality + dedup", quality_only), ("+ PII redact + block list", full_blocklist),
                        ("+ PII redact + block list + classifier", full_both)]:
        print(f"| {name} | {value:.2f} | {value / quality_only:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"documents": len(texts), "megabytes": mb, "detectors": rows,
                                               "llmkit_per_type": per_type, "dialogsum": real,
                                               "throughput_mb_s": {"quality_dedup": quality_only,
                                                                   "with_pii_blocklist": full_blocklist,
                                                                   "with_pii_blocklist_classifier": full_both}},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
