"""Progress reporting and cancellation shared by every pipeline (CLI bar, server jobs, Slicer panel)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from ..errors import Cancelled


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class ProgressInfo:
    step: int
    total: int
    elapsed_s: float
    eta_s: Optional[float]
    stage: str = "sampling"

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0


ProgressCallback = Callable[[ProgressInfo], None]


def check_cancel(cancel: Optional[CancelFlag]) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled by the user")


class ProgressTracker:
    """Counts steps of one stage, estimates the ETA from the mean step time, and honours cancel."""

    def __init__(self, total: int, callback: Optional[ProgressCallback], cancel: Optional[CancelFlag],
                 stage: str = "sampling") -> None:
        self.total = max(int(total), 1)
        self.callback = callback
        self.cancel = cancel
        self.stage = stage
        self.start = time.perf_counter()
        self.step = 0

    def begin(self) -> None:
        check_cancel(self.cancel)
        self._emit()

    def advance(self, n: int = 1) -> None:
        self.step = min(self.step + n, self.total)
        self._emit()
        check_cancel(self.cancel)

    def _emit(self) -> None:
        if self.callback is None:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.step * (self.total - self.step) if self.step else None
        self.callback(ProgressInfo(self.step, self.total, elapsed, eta, self.stage))
