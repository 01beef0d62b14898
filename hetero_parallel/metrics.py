"""Per-step metrics to CSV and TensorBoard, one row (and one event per tag) per step.

Resuming at step ``s`` truncates both to the steps before ``s``: the CSV keeps its rows of steps
``< s`` (rewritten atomically) and TensorBoard events from ``s`` on are purged (``purge_step``), so
steps redone after a crash appear once. Only the rank that is given ``enabled=True`` writes
(rank 0 by convention); the others accept calls and do nothing.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping
from pathlib import Path


class MetricsLogger:
    """``log(step, values)`` appends one CSV row and one TensorBoard scalar per value.

    The CSV columns are fixed by the first row written (or found, when resuming); later rows must
    have the same keys.
    """

    def __init__(self, folder: str | os.PathLike[str], *, enabled: bool, start_step: int = 0,
                 tensorboard: bool = True) -> None:
        self.enabled = enabled
        self._columns: list[str] | None = None
        self._file = None
        self._writer = None
        self._tb = None
        if not enabled:
            return
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.folder / "metrics.csv"
        rows: list[list[str]] = []
        if self.csv_path.exists():
            with open(self.csv_path, newline="") as f:
                reader = csv.reader(f)
                header = next(reader, None)
                if header and header[0] == "step":
                    self._columns = header[1:]
                    rows = [r for r in reader if r and r[0].isdigit() and int(r[0]) < start_step]
        tmp = self.csv_path.with_name(".metrics.csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            if self._columns is not None:
                writer.writerow(["step", *self._columns])
                writer.writerows(rows)
        os.replace(tmp, self.csv_path)
        self._file = open(self.csv_path, "a", newline="")  # noqa: SIM115 - closed in close()
        self._writer = csv.writer(self._file)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.folder / "tensorboard"),
                                     purge_step=start_step if start_step > 0 else None)

    def log(self, step: int, values: Mapping[str, float | int]) -> None:
        if not self.enabled:
            return
        if self._columns is None:
            self._columns = list(values)
            self._writer.writerow(["step", *self._columns])
        elif list(values) != self._columns:
            raise ValueError(f"metrics of step {step} have keys {sorted(values)}, the file "
                             f"{self.csv_path} has columns {self._columns}")
        self._writer.writerow([step, *(_fmt(values[k]) for k in self._columns)])
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _fmt(v: float | int) -> str:
    return str(v) if isinstance(v, int) else f"{v:.6g}"
