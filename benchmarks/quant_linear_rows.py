"""Where QuantLinear's kernel path stops paying: the aten weight-only kernel (`QuantLinear.kernel_forward`) against
dequantize + F.linear (`QuantLinear.dequantize_forward`) at 16..512 rows, on SmolLM2-135M's shapes and formats (the
Q4_1 GGUF: q4_1 matrices, q8_0 split for the tied embedding / LM head), ms per call.

The two paths run interleaved (kernel, dequantize, kernel, ... for each row count in each round), so a burst of load
from another process lands on both; each figure is the median over rounds of the best of a few calls. The last
column is the whole layer stack of one SmolLM2 block (q, k, v, o, gate, up, down) for each path. The crossover it
prints is the largest row count at which the kernel is still faster for every matrix of the block: what
llmkit.quant.linear.KERNEL_MAX_ROWS is set from.

    python benchmarks/quant_linear_rows.py [--rounds 7] [--rows 16,32,64,...]     (THREADS=2 by default)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from llmkit.quant.linear import QuantLinear

BLOCK_SHAPES = {"q/o": (576, 576), "k/v": (192, 576), "gate/up": (1536, 576), "down": (576, 1536)}
BLOCK_COUNTS = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1}  # matrices of each shape in one block
ROWS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def best_ms(fn, calls: int = 3) -> float:  # noqa: ANN001 (a callable)
    fn()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def layers(scheme: str) -> dict[str, QuantLinear]:
    torch.manual_seed(0)
    return {name: QuantLinear.from_linear(torch.nn.Linear(n_in, n_out, bias=False), scheme)
            for name, (n_out, n_in) in BLOCK_SHAPES.items()}


def measure(scheme: str, rows: tuple[int, ...], rounds: int) -> dict[tuple[str, int, str], float]:
    """Median over `rounds` of best-of-3 ms for (shape name, rows, "kernel" | "dequantize")."""
    mods = layers(scheme)
    samples: dict[tuple[str, int, str], list[float]] = {}
    with torch.inference_mode():
        for _ in range(rounds):
            for n in rows:
                for name, layer in mods.items():
                    x = torch.randn(n, layer.in_features)
                    for path, fn in (("kernel", layer.kernel_forward), ("dequantize", layer.dequantize_forward)):
                        samples.setdefault((name, n, path), []).append(best_ms(lambda fn=fn, x=x: fn(x)))
    return {key: statistics.median(values) for key, values in samples.items()}


def report(scheme: str, rows: tuple[int, ...], figures: dict[tuple[str, int, str], float]) -> int:
    """Print the table of one format; return the crossover (largest row count where the kernel wins everywhere)."""
    names = list(BLOCK_SHAPES)
    print(f"\n{scheme}: ms per call, kernel / dequantize (median of rounds)")
    print("| rows | " + " | ".join(f"{name} {BLOCK_SHAPES[name][0]}x{BLOCK_SHAPES[name][1]}" for name in names)
          + " | one block |")
    print("| --- " * (len(names) + 2) + "|")
    crossover, still_winning = 0, True
    for n in rows:
        cells, block = [], {"kernel": 0.0, "dequantize": 0.0}
        for name in names:
            kernel, dequant = figures[(name, n, "kernel")], figures[(name, n, "dequantize")]
            cells.append(f"{kernel:.3f} / {dequant:.3f}")
            block["kernel"] += BLOCK_COUNTS[name] * kernel
            block["dequantize"] += BLOCK_COUNTS[name] * dequant
        wins = all(figures[(name, n, "kernel")] < figures[(name, n, "dequantize")] for name in names)
        still_winning = still_winning and wins
        crossover = n if still_winning else crossover
        print(f"| {n} | " + " | ".join(cells) + f" | {block['kernel']:.2f} / {block['dequantize']:.2f} |")
    print(f"{scheme}: the kernel is faster for every matrix up to {crossover} rows")
    return crossover


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--schemes", default="q4_1,q8_0")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    rows = tuple(int(n) for n in args.rows.split(","))
    print(f"load average {os.getloadavg()[0]:.2f}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.rounds} rounds")
    for scheme in args.schemes.split(","):
        report(scheme, rows, measure(scheme, rows, args.rounds))


if __name__ == "__main__":
    main()
