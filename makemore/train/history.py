"""Every step's loss and clock time, kept on the device for the whole run:
the host reads them only when logging or saving."""

import torch

from . import distributed


class History:
    def __init__(self, max_steps: int, device: torch.device):
        self.losses = torch.zeros(max_steps, device=device)  # per step; under DDP each rank's own until averaged
        self.times = torch.zeros(max_steps, dtype=torch.float64)  # the training clock at the end of each step
        self.step, self.elapsed = 0, 0.0
        self.averaged = 0  # losses[:averaged] are means over the ranks

    def restore(self, state: dict) -> None:
        self.step, self.elapsed = state["step"], state["elapsed"]
        kept = min(self.step, len(self.losses))
        self.losses[:kept], self.times[:kept] = state["losses"][:kept].to(self.losses.device), state["times"][:kept]
        self.averaged = self.step

    def progress(self, max_steps: int, max_seconds: float) -> float:
        """How far the run is, 0 to 1: by steps, or by time if it has a time budget and that is further."""
        return max(self.step / max_steps, self.elapsed / max_seconds if max_seconds else 0.0)

    def end_step(self, elapsed: float) -> None:
        self.times[self.step] = elapsed
        self.step, self.elapsed = self.step + 1, elapsed

    def average(self) -> None:
        """Under DDP, replace each rank's step losses since the last call by their mean over the ranks
        (at logging and checkpoints only)."""
        if self.averaged < self.step:
            distributed.mean_(self.losses[self.averaged : self.step])
        self.averaged = self.step

    def mean_since(self, start: int) -> float:
        return self.losses[start : self.step].mean().item()
