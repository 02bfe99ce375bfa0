"""Spoken-digit recognition on speakers never heard in training: llmkit's Whisper-style model (`llmkit speech train`)
vs pocketsphinx 5 (CMU Sphinx, its bundled en-us acoustic model), on the same recordings.

    nice python benchmarks/speech_digits.py                                  # trains the default model first
    nice python benchmarks/speech_digits.py --model runs/speech-digits/checkpoints/step-00001200
    nice python benchmarks/speech_digits.py --model runs/d5/member-*/checkpoints/step-00002000   # an ensemble
    nice python benchmarks/speech_digits.py --model ... --speeds 0.85 0.925 1.0 1.075 1.15      # test-time speeds

Data: the Free Spoken Digit Dataset's 1,000 recordings by the two held-out speakers (lucas, theo; llmkit.data.fsdd),
8 kHz resampled to 16 kHz (what both recognisers' models expect). A transcript counts when it is exactly the digit's
word ("seven"), case and surrounding space aside. pocketsphinx runs twice, so the comparison is fair both ways:

- free: its default search, the general English trigram LM (en-us.lm.bin) -- what an off-the-shelf recogniser does.
  It takes ~1-2 s per recording here, so it runs on an evenly spaced subset (--free_subset, 200 by default), and
  its ratio compares llmkit's accuracy on that same subset;
- digits: restricted to the ten words by a JSGF grammar (`<digit> = zero | one | ... | nine`), a closed vocabulary
  like llmkit's digit model has.

With several --model directories (`llmkit speech train --ensemble K`) llmkit's row is their ensemble (the mean of
their log-probabilities per token) and each model alone gets a row too. With several --speeds (test-time
augmentation, `llmkit speech transcribe --speeds`) llmkit's row reads every clip at each speed, and a row reading
the clips as recorded is added.

Columns: accuracy overall and per speaker, milliseconds per recording (one thread each, batch of 64 for llmkit,
one utterance at a time for pocketsphinx), and llmkit's accuracy over each pocketsphinx variant's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from llmkit.checkpoints import load_model, load_tokenizer
from llmkit.commands.speech import speech_train, transcribe
from llmkit.data.fsdd import DIGIT_WORDS, HELD_OUT_SPEAKERS, load_recordings

DIGIT_GRAMMAR = "#JSGF V1.0;\ngrammar digits;\npublic <digit> = " + " | ".join(DIGIT_WORDS) + " ;\n"


def pocketsphinx_transcripts(clips: list[torch.Tensor], search: str) -> list[str]:
    """pocketsphinx's hypothesis for each 16 kHz clip, with its default LM ("free") or the digit grammar ("digits")."""
    from pocketsphinx import Decoder

    decoder = Decoder(samprate=16000, loglevel="FATAL")
    decoder.add_jsgf_string("digits", DIGIT_GRAMMAR)
    decoder.activate_search("digits" if search == "digits" else "_default")
    texts = []
    for clip in clips:
        pcm = (clip.clamp(-1, 32767 / 32768) * 32768).numpy().astype(np.int16).tobytes()
        decoder.start_utt()
        decoder.process_raw(pcm, full_utt=True)
        decoder.end_utt()
        hypothesis = decoder.hyp()
        texts.append(hypothesis.hypstr if hypothesis is not None else "")
    return texts


def score(texts: list[str], recordings: list, seconds: float) -> dict:  # noqa: ANN001
    right = [text.strip().lower() == DIGIT_WORDS[r.digit] for text, r in zip(texts, recordings, strict=True)]
    row = {"accuracy": sum(right) / len(right), "ms_per_recording": 1000 * seconds / len(right)}
    for speaker in HELD_OUT_SPEAKERS:
        mine = [ok for ok, r in zip(right, recordings, strict=True) if r.speaker == speaker]
        row[speaker] = sum(mine) / len(mine)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", help="trained speech model directories, several for an ensemble "
                        "(default: train one with the defaults)")
    parser.add_argument("--output", help="write the rows as JSON here too")
    parser.add_argument("--free_subset", type=int, default=200, help="recordings for pocketsphinx with its free LM")
    parser.add_argument("--speeds", nargs="+", type=float, default=[1.0],
                        help="test-time speeds for llmkit's row (default: 1.0, the clips as recorded)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_dirs = args.model or [str(speech_train(output="runs/speech-digits")["checkpoint"])]
    members = [load_model(model_dir, arch="speech") for model_dir in model_dirs]
    model, tokenizer = members[0], load_tokenizer(model_dirs[0])
    recordings = load_recordings(HELD_OUT_SPEAKERS)
    clips = [r.samples for r in recordings]

    rows = {}
    started = time.perf_counter()
    ours = transcribe(members, tokenizer, clips, max_new_tokens=4, speeds=args.speeds)  # a list of one: that model
    name = "llmkit (Whisper-style, trained here)" if len(members) == 1 else f"llmkit, ensemble of {len(members)}"
    tta = f", at speeds {', '.join(f'{speed:g}' for speed in args.speeds)}" if args.speeds != [1.0] else ""
    rows[name + tta] = score(ours, recordings, time.perf_counter() - started)
    if tta:
        started = time.perf_counter()
        recorded = transcribe(members, tokenizer, clips, max_new_tokens=4)
        rows[f"{name}, clips as recorded"] = score(recorded, recordings, time.perf_counter() - started)
    for index, member in enumerate(members if len(members) > 1 else []):
        started = time.perf_counter()
        alone = transcribe(member, tokenizer, clips, max_new_tokens=4)
        rows[f"llmkit, model {index + 1} alone"] = score(alone, recordings, time.perf_counter() - started)
    started = time.perf_counter()
    texts = pocketsphinx_transcripts(clips, "digits")
    rows["pocketsphinx, digit grammar"] = score(texts, recordings, time.perf_counter() - started)
    step = max(1, len(recordings) // args.free_subset)
    subset = recordings[::step][: args.free_subset]
    started = time.perf_counter()
    texts = pocketsphinx_transcripts([r.samples for r in subset], "free")
    rows["pocketsphinx, free (en-us LM)"] = score(texts, subset, time.perf_counter() - started)
    print("pocketsphinx free, first transcripts:", texts[:8])
    ours_on_subset = score(ours[::step][: args.free_subset], subset, 0.0)["accuracy"]

    print(f"\nheld-out speakers {', '.join(HELD_OUT_SPEAKERS)}; model {', '.join(model_dirs)} "
          f"({len(members)} x {model.num_parameters():,} parameters); {platform.machine()}, 1 thread, "
          f"load {os.getloadavg()[0]:.2f}\n")
    print("| recogniser | recordings | accuracy | lucas | theo | ms / recording | llmkit / this |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        n, mine = (len(subset), ours_on_subset) if "free" in name else (len(recordings), rows[next(iter(rows))]["accuracy"])
        ratio = f"{mine / row['accuracy']:.2f}x" if row["accuracy"] else "inf"
        print(f"| {name} | {n:,} | {row['accuracy']:.1%} | {row['lucas']:.1%} | {row['theo']:.1%} | "
              f"{row['ms_per_recording']:.1f} | {ratio} |")
    print(f"(llmkit on the free LM's {len(subset)} recordings: {ours_on_subset:.1%})")
    if args.output:
        run = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_1min": round(os.getloadavg()[0], 2),
               "machine": platform.machine(), "threads": 1, "speeds": args.speeds}
        Path(args.output).write_text(json.dumps({"model": model_dirs, "feature_norm": model.config.feature_norm,
                                                 "parameters": model.num_parameters(), **run, "rows": rows},
                                                indent=2) + "\n")


if __name__ == "__main__":
    main()
