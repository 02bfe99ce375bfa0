# ruff: noqa: B023  (each lambda is timed at once, inside the loop iteration that defines it)
"""The kernel paths of llmkit.quant.linear.QuantLinear, side by side on SmolLM2-135M shapes (what the table in
llmkit/quant/linear.py's docstring records), ms per call, best of 5 rounds:

    fp32            F.linear on the fp32 weight (the reference)
    int8 aten       torch._weight_int8pack_mm, bf16 activations (int8, one scale per row)
    int4 aten       aten._weight_int4pack_mm_for_cpu, bf16 activations (q4_0; q4_k takes the same call)
    q8_0 split      q8_0 as two 4-bit pieces in one int4 call with the width doubled (quant/tinygemm.py): the path
    q8_0 loop       the previous q8_0 path: one _weight_int8pack_mm per 32-wide block column, summed
    q8_0 masked     one _weight_int8pack_mm with the activations spread over n_blocks masked rows (block scales
                    applied to its (n_blocks, out) result): folds the block scales out of the weight
    q8_0 compiled   torch.compile (inductor) of the fused dequantize-GEMV sum_k x_k q_ok d_o,k/32 (--compile only:
                    needs a C++ compiler and tens of seconds per shape)
    q8_0 deq        dequantize then F.linear (what many-row calls do)

    python benchmarks/quant_linear.py [--compile]     (2 threads, as the reference figures in DESIGN.md)
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from llmkit.quant.formats import get_format
from llmkit.quant.linear import QuantLinear

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576)]  # (out, in): q/o, gate/up, down, LM head
ROWS = (1, 16)


def best_ms(fn, reps: int) -> float:  # noqa: ANN001
    fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - start) / reps)
    return best * 1e3


def q8_0_fields(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes (out, n_blocks, 32) and fp32 scales (out, n_blocks) of a q8_0 layer."""
    from llmkit.quant.gguf_blocks import block_fields

    d, codes, _ = block_fields(layer.packed)
    return codes, d


def q8_0_loop(x: torch.Tensor, by_block: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """sum_b x_b Q_b^T diag(d_b), one int8 kernel call per block column; by_block (n_blocks, out, 32)."""
    blocks = x.view(x.shape[0], -1, 32)
    y = torch.zeros(x.shape[0], by_block.shape[1])
    for b in range(blocks.shape[1]):
        y += torch._weight_int8pack_mm(blocks[:, b], by_block[b], scales[b])
    return y


def q8_0_masked(x: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor, d_t: torch.Tensor) -> torch.Tensor:
    """One row: P = (mask * x) Q^T gives each block's partial dot product (n_blocks, out); y = sum_b d_b P_b."""
    ones = torch.ones(codes.shape[0], dtype=torch.bfloat16)
    partial = torch._weight_int8pack_mm(mask * x, codes, ones)
    return (partial.float() * d_t).sum(0, keepdim=True)


def fused_gemv(x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    w = codes.float() * d[..., None]  # (out, n_blocks, 32), fused into the reduction by inductor
    return (x.view(x.shape[0], 1, *codes.shape[1:]) * w[None]).sum((-1, -2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd fused GEMV")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    torch.manual_seed(0)
    compiled = torch.compile(fused_gemv, dynamic=False) if args.compile else None
    print(f"load average {os.getloadavg()[0]:.2f}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    names = ["fp32", "int8 aten", "int4 aten", "q8_0 split", "q8_0 loop", "q8_0 masked",
             *(["q8_0 compiled"] if compiled else []), "q8_0 deq"]
    print("| out x in | rows | " + " | ".join(names) + " |\n|" + "---|" * (len(names) + 2))
    with torch.no_grad():
        for out_features, in_features in SHAPES:
            weight = torch.randn(out_features, in_features) * 0.02
            i8 = QuantLinear(get_format("int8").quantize(weight, None))
            q4, q8 = QuantLinear(get_format("q4_0").quantize(weight, None)), QuantLinear(
                get_format("q8_0").quantize(weight, None))
            codes, d = q8_0_fields(q8)
            by_block, block_scales = codes.transpose(0, 1).contiguous(), d.t().contiguous().bfloat16()
            flat_codes, d_t = codes.reshape(out_features, in_features).contiguous(), d.t().contiguous()
            mask = torch.eye(in_features // 32, dtype=torch.bfloat16).repeat_interleave(32, dim=1)  # (n_blocks, in)
            for rows in ROWS:
                x = torch.randn(rows, in_features)
                xb = x.bfloat16()
                reps = 3 if out_features > 10000 else 20
                cells = [
                    best_ms(lambda: F.linear(x, weight), reps),
                    best_ms(lambda: i8(x), reps),
                    best_ms(lambda: q4(x), reps),
                    best_ms(lambda: q8(x), reps),
                    best_ms(lambda: q8_0_loop(xb, by_block, block_scales), reps),
                    best_ms(lambda: q8_0_masked(xb, flat_codes, mask, d_t), reps) if rows == 1 else float("nan"),
                    *([best_ms(lambda: compiled(x, codes, d), reps)] if compiled else []),
                    best_ms(lambda: F.linear(x, q8.dequantized_weight()), reps),
                ]
                print(f"| {out_features} x {in_features} | {rows} | " + " | ".join(f"{c:.3f}" for c in cells) + " |",
                      flush=True)


if __name__ == "__main__":
    main()
