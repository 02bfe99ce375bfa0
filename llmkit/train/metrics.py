"""Training metrics: one JSON line per logged step (appended as they happen, so a killed run keeps them),
a CSV and a loss-curve PNG at the end, and TensorBoard events when `tensorboard` is installed."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from llmkit.io import atomic_write, atomic_write_text

CROSS_ENTROPY = "cross-entropy (nats/token)"  # what a language-model loss is; other objectives name theirs

METRICS_FILE = "metrics.jsonl"
CSV_FILE = "metrics.csv"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"


class MetricsLog:
    """Writes rows like {"kind": "train", "step": 10, "loss": 3.2, ...} for rank 0 (other ranks write nothing)."""

    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.rows: list[dict] = []
        self.tensorboard = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        if path.is_file():
            # A resumed run repeats the steps after its checkpoint: drop the killed run's rows for them.
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self.rows = [row for row in rows if row.get("step", 0) <= resume_step] if resume_step else []
            atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in self.rows))
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=resume_step or None)
        except ImportError:
            self.tensorboard = None

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tensorboard.add_scalar(f"{row['kind']}/{key}", value, row["step"])

    def close(self, plot_title: str = "loss", ylabel: str = CROSS_ENTROPY) -> Path | None:
        """Write the CSV and the loss PNG; returns the PNG's path (None when there is nothing to plot)."""
        if not self.enabled:
            return None
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        write_csv(self.rows, self.run_dir / CSV_FILE)
        return plot_losses(self.rows, self.run_dir / PLOT_FILE, plot_title, ylabel)


def write_csv(rows: list[dict], path: Path) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def plot_losses(rows: list[dict], path: Path, title: str = "loss", ylabel: str = CROSS_ENTROPY
                ) -> Path | None:
    """Training and validation loss against steps, as a PNG; `ylabel` says what the loss is."""
    train = [(row["step"], row["loss"]) for row in rows if row.get("kind") == "train" and "loss" in row]
    val = [(row["step"], row["val_loss"]) for row in rows if row.get("kind") == "eval"]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2))
    if train:
        axes.plot(*zip(*train), label="train", linewidth=1)
    if val:
        axes.plot(*zip(*val), "o-", label="validation", linewidth=1.5, markersize=4)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
    plt.close(figure)
    return path
