# ruff: noqa: B023  (each lambda is timed at once, inside the loop iteration that defines it)
"""The kernel paths of llmkit.quant.linear.QuantLinear, side by side on SmolLM2-135M shapes: fp32 F.linear, each
format's dequantize-then-F.linear, and the aten weight-only kernels with fp32 and bf16 activations (what the table
in llmkit/quant/linear.py's docstring records). ms per call, best of 5 rounds.

    python benchmarks/quant_linear.py            (2 threads, as the reference figures in DESIGN.md)
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from llmkit.quant.formats import get_format
from llmkit.quant.linear import QuantLinear

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576)]  # (out, in): q/o, gate/up, down, LM head
ROWS = (1, 16, 512)


def best_ms(fn, reps: int) -> float:  # noqa: ANN001
    fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - start) / reps)
    return best * 1e3


def main() -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    torch.manual_seed(0)
    print(f"load average {os.getloadavg()[0]:.2f}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| out x in | rows | fp32 | int8 deq | int8 aten fp32 x | int8 aten bf16 x | int4 g32 deq | "
          "int4 aten fp32 x | int4 aten bf16 x | q8_0 deq | nf4 deq |")
    print("|---" * 11 + "|")
    with torch.no_grad():
        for out_features, in_features in SHAPES:
            weight = torch.randn(out_features, in_features) * 0.02
            i8, i4 = QuantLinear(get_format("int8").quantize(weight, None)), QuantLinear(
                get_format("int4").quantize(weight, 32))
            q8, nf = QuantLinear(get_format("q8_0").quantize(weight, None)), QuantLinear(
                get_format("nf4").quantize(weight, None))
            for rows in ROWS:
                x = torch.randn(rows, in_features)
                reps = max(1, int(2e7 / (rows * out_features * in_features) * 10)) if rows > 1 else 20
                reps = min(reps, 50)
                xb = x.bfloat16()
                cells = [
                    best_ms(lambda: F.linear(x, weight), reps),
                    best_ms(lambda: F.linear(x, i8.dequantized_weight()), reps),
                    best_ms(lambda: torch._weight_int8pack_mm(x, i8.weight_qweight, i8.weight_scale), reps),
                    best_ms(lambda: torch._weight_int8pack_mm(xb, i8.weight_qweight, i8.kernel_scales), reps),
                    best_ms(lambda: F.linear(x, i4.dequantized_weight()), reps),
                    best_ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                        x, i4.weight_int4pack, 32, i4.kernel_scales.float()), reps),
                    best_ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                        xb, i4.weight_int4pack, 32, i4.kernel_scales), reps),
                    best_ms(lambda: F.linear(x, q8.dequantized_weight()), reps),
                    best_ms(lambda: F.linear(x, nf.dequantized_weight()), reps),
                ]
                print(f"| {out_features} x {in_features} | {rows} | " + " | ".join(f"{c:.3f}" for c in cells) + " |",
                      flush=True)


if __name__ == "__main__":
    main()
