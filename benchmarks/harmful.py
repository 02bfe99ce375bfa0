"""Harmful-content rules on real text: the HH-RLHF classifier's held-out precision/recall by threshold, and how
much clean encyclopedic text (Wikipedia summaries) each rule flags.

HH-RLHF harmless-base (../shared/data/hh_rlhf) labels are relative (of two replies, the rejected one was judged
more harmful), so the classifier's ceiling on them is low; the share of Wikipedia summaries flagged says what a
rule costs on text that should pass.

Run: python benchmarks/harmful.py [--json docs/harmful_benchmark.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from llmkit.data.harmful import HH_RLHF_FILE, Blocklist, builtin_classifier, evaluate_classifier, hh_rlhf_split
from llmkit.data.shared import shared_data_file

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--wiki_documents", type=int, default=2000)
    args = parser.parse_args()
    model, _ = builtin_classifier()
    _, held_out = hh_rlhf_split(shared_data_file(HH_RLHF_FILE))
    with gzip.open(shared_data_file("wiki_vital/summaries_en.jsonl.gz"), "rt", encoding="utf-8") as file:
        wiki = [json.loads(line)["text"] for _, line in zip(range(args.wiki_documents), file)]
    wiki_scores = model.scores(wiki)
    rows = []
    print(f"HH-RLHF harmless-base held-out: {len(held_out)} replies ({len(held_out) // 2} pairs); "
          f"{len(wiki)} Wikipedia summaries\n")
    print("| threshold | precision | recall | accuracy | Wikipedia flagged |\n| ---: | ---: | ---: | ---: | ---: |")
    for threshold in THRESHOLDS:
        report = evaluate_classifier(model, held_out, threshold)
        flagged = sum(score >= threshold for score in wiki_scores) / len(wiki)
        rows.append({"threshold": threshold, "precision": report.precision, "recall": report.recall,
                     "accuracy": report.accuracy, "wikipedia_flagged": flagged})
        print(f"| {threshold} | {report.precision:.3f} | {report.recall:.3f} | {report.accuracy:.3f} | {flagged:.1%} |")
    pairwise = evaluate_classifier(model, held_out).pairwise_accuracy
    blocklist = Blocklist()
    hh_hits = [bool(blocklist.hits(text)) for text, _ in held_out]
    rejected_flagged = sum(hit for hit, (_, label) in zip(hh_hits, held_out) if label) / (len(held_out) // 2)
    chosen_flagged = sum(hit for hit, (_, label) in zip(hh_hits, held_out) if not label) / (len(held_out) // 2)
    wiki_blocked = sum(bool(blocklist.hits(text)) for text in wiki) / len(wiki)
    print(f"\npairwise accuracy (rejected reply scored above its chosen twin): {pairwise:.3f}")
    print(f"block list: flags {rejected_flagged:.1%} of rejected replies, {chosen_flagged:.1%} of chosen ones, "
          f"{wiki_blocked:.1%} of Wikipedia summaries")
    if args.json:
        Path(args.json).write_text(json.dumps({"classifier": rows, "pairwise_accuracy": pairwise,
                                               "blocklist": {"rejected_flagged": rejected_flagged,
                                                             "chosen_flagged": chosen_flagged,
                                                             "wikipedia_flagged": wiki_blocked}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
