"""What a run reports: metrics.jsonl (one JSON record per line, rank 0) and the progress bar, which
counts steps, or seconds when the run has a time budget (--max-seconds)."""

import json

from tqdm import tqdm

from .run import METRICS


class Log:
    """Rank 0 writes; a fresh run (--force) starts a fresh log, a resumed one appends; fitted models show no bar."""

    def __init__(self, run, *, append: bool, bar: bool):
        config, writer = run.config, run.master_process
        self.file = open(run.path(METRICS), "a" if append else "w") if writer else None
        self.seconds = bool(config.max_seconds)
        if self.seconds:
            total, self.shown, unit = config.max_seconds, run.history.elapsed, "s"
        else:
            total, self.shown, unit = config.max_steps, run.history.step, "step"
        seconds_format = (
            "{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]" if self.seconds else None
        )
        self.bar = tqdm(
            total=total,
            initial=self.shown,
            unit=unit,
            bar_format=seconds_format,
            mininterval=1.0,
            dynamic_ncols=True,
            disable=not (bar and writer and not run.model.fitted),
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

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
