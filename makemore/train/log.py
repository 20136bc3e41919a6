"""What a run reports: metrics.jsonl (one JSON record per line, rank 0) and the progress bar, which
counts steps, or seconds when the run has a time budget (--max-seconds)."""

import json
from pathlib import Path

from tqdm import tqdm

from .config import TrainConfig


class Log:
    def __init__(self, path: Path, config: TrainConfig, *, writer: bool, append: bool, bar: bool, step: int, elapsed: float):
        self.file = open(path, "a" if append else "w") if writer else None  # a fresh run (--force) starts a fresh log
        self.seconds = bool(config.max_seconds)
        total, self.shown, unit = (config.max_seconds, elapsed, "s") if self.seconds else (config.max_steps, step, "step")
        seconds_format = "{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]" if self.seconds else None
        self.bar = tqdm(
            total=total, initial=self.shown, unit=unit, bar_format=seconds_format, disable=not (bar and writer), mininterval=1.0, dynamic_ncols=True
        )

    def record(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def progress(self, step: int, elapsed: float, **postfix) -> None:
        now = min(elapsed, self.bar.total) if self.seconds else step
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(now - self.shown)
        self.shown = now

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
