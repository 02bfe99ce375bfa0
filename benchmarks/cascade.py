"""Cascade and router, measured: cheap model vs strong model vs the fitted FrugalGPT cascade vs the embedding router
on held-out SST-2 rows; the cost-accuracy frontier, APGR and the cost to recover 50% / 80% / 100% of the gap.
Writes docs/cascade.json and docs/cascade.png.

    python benchmarks/cascade.py                        # SmolLM2-135M-Instruct -> Gemma 3 270M, first 200 dev rows
    python benchmarks/cascade.py --limit 400 --scorer trained

Costs are not wall-clock: each model's price per token (input and output alike) is its parameter count in millions
(SmolLM2 134.5M, Gemma 3 270M 268.1M), so a query's cost is tokens x parameters, the compute it takes; the
router's embedding (all-MiniLM-L6-v2, 22.7M) is priced the same way. Each model's answers are cached under
--cache (keyed by prompt), so a re-run only refits. Goals (issue 16): APGR >= 0.5, and the strong model's held-out
accuracy at <= 60% of its cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from llmkit.commands.cascade import default_models, run_cascade_task
from llmkit.io import atomic_write_text
from llmkit.serve.cascade_task import plot_report, report_table

OUT_JSON, OUT_PNG = Path("docs/cascade.json"), Path("docs/cascade.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=200, help="first N SST-2 dev rows (half fit, half held out)")
    parser.add_argument("--num_fewshot", type=int, default=0)
    parser.add_argument("--scorer", choices=["mean_logprob", "trained"], default="mean_logprob")
    parser.add_argument("--budget", default=None, help="default: 60%% of the strong model's mean cost")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "llmkit" / "cascade_bench"))
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()

    started = time.time()
    report, _ = run_cascade_task(default_models(), None, "sst2", None, args.budget, args.scorer, args.limit,
                                 args.num_fewshot, 0.5, 0, None, Path(args.cache), 8, args.progress, "float32", "cpu")
    strong = report["held_out"][1]  # weak, strong, cascade, router
    cascade = report["summary"]["cascade"]
    report["goals"] = {
        "apgr_at_least_0.5": cascade["apgr"] is not None and cascade["apgr"] >= 0.5,
        "strong_accuracy_at_most_60pct_cost": cascade["cost_to_recover_100"] is not None
        and cascade["cost_to_recover_100"] <= 0.6 * strong["cost"],
    }
    report["machine"] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "platform": platform.platform(),
                         "load_average": os.getloadavg(), "seconds": round(time.time() - started, 1)}
    atomic_write_text(OUT_JSON, json.dumps(report, indent=1) + "\n")
    plot_report(report, OUT_PNG)
    print(report_table(report))
    print(f"\ngoals: {report['goals']}; fitted thresholds {report['thresholds']} at budget {report['budget']:.4g}; "
          f"router threshold {report['router_threshold']}; wrote {OUT_JSON}, {OUT_PNG}")


if __name__ == "__main__":
    main()
