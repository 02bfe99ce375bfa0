"""`llmkit convert --to gguf --quant q4_k_m` against llama.cpp's own llama-quantize on the same model: SmolLM2-135M-
Instruct exported at F32 by llmkit, then quantized to Q4_K_M twice, by llama.cpp (`llama_model_quantize` through
llama-cpp-python, the `bench` extra) and by llmkit from the same weights. Prints, per tensor type, how many tensors
each file holds and whether their types and bytes are equal, then llama.cpp's greedy tokens on llmkit's file against
llmkit's own on it (packed load), and both files' sizes.

    pip install -e ".[bench]"
    python benchmarks/gguf_q4_k_m.py [--workdir DIR] [--tokens 32]
"""

from __future__ import annotations

import argparse
import ctypes
import tempfile
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch
from quant import agreement, run_engine  # benchmarks/quant.py: llama.cpp in a fresh process, token agreement

from llmkit.checkpoints import default_model_path, load_model, load_tokenizer
from llmkit.checkpoints.gguf_export import export_gguf
from llmkit.commands.common import load_decoder
from llmkit.generate.decode import generate_tokens
from llmkit.generate.sampling import SamplingSettings
from llmkit.quant import pack_gguf

LLAMA_FTYPE_MOSTLY_Q4_K_M = 15
PROMPT = "The capital of France is"


def llama_quantize(source: Path, target: Path) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize failed on {source}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="llmkit-q4km-"))
    workdir.mkdir(parents=True, exist_ok=True)
    source = default_model_path()
    model, tokenizer = load_model(source), load_tokenizer(source)
    f32 = export_gguf(model, workdir / "smollm2.F32.gguf", tokenizer, "f32")
    theirs_path, ours_path = workdir / "smollm2.Q4_K_M.llama-quantize.gguf", workdir / "smollm2.Q4_K_M.llmkit.gguf"
    llama_quantize(f32, theirs_path)
    export_gguf(load_model(f32), ours_path, load_tokenizer(f32), "q4_k_m", pack=pack_gguf)

    theirs = {t.name: t for t in gguf.GGUFReader(theirs_path).tensors}
    ours = {t.name: t for t in gguf.GGUFReader(ours_path).tensors}
    print(f"SmolLM2-135M-Instruct -> Q4_K_M; files in {workdir}")
    print("| type | tensors (llama-quantize) | tensors (llmkit) | same type | same bytes |")
    print("| --- | ---: | ---: | ---: | ---: |")
    counts_theirs = Counter(t.tensor_type.name for t in theirs.values())
    counts_ours = Counter(t.tensor_type.name for t in ours.values())
    for name in sorted(counts_theirs | counts_ours):
        names = [n for n, t in theirs.items() if t.tensor_type.name == name and n in ours]
        same_type = sum(ours[n].tensor_type == theirs[n].tensor_type for n in names)
        same_bytes = sum(ours[n].tensor_type == theirs[n].tensor_type
                         and np.array_equal(np.asarray(ours[n].data), np.asarray(theirs[n].data)) for n in names)
        print(f"| {name} | {counts_theirs[name]} | {counts_ours[name]} | {same_type} | {same_bytes} |")
    print(f"tensor names equal: {set(theirs) == set(ours)}; sizes: llama-quantize {theirs_path.stat().st_size:,} "
          f"bytes, llmkit {ours_path.stat().st_size:,} bytes")

    prompt = load_tokenizer(ours_path).encode(PROMPT)
    packed = load_decoder(str(ours_path), "float32", "cpu")
    with torch.no_grad():
        llmkit_tokens = [step[0] for step in generate_tokens(packed, prompt, args.tokens,
                                                             SamplingSettings(temperature=0.0))]
    llama_tokens = run_engine("llama.cpp", str(ours_path), 2, prompt, args.tokens)["tokens"]
    print(f"greedy tokens, llama.cpp on llmkit's file vs llmkit (packed load): {agreement(llmkit_tokens, llama_tokens)}")


if __name__ == "__main__":
    main()
