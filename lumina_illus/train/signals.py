"""Preemption signals: SIGTERM (Slurm, Kubernetes) and SIGUSR1 (Slurm's --signal warning) set a flag;
the loop finishes the current step, agrees with the other ranks, checkpoints and exits 0."""

from __future__ import annotations

import signal


class StopFlag:
    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.received: str | None = None
        for s in signals:
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum).name

    def __bool__(self) -> bool:
        return self.received is not None
