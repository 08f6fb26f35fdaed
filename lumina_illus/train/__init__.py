"""DeepSpeed trainer: engine setup, loop, EMA, checkpoints, telemetry, signals.

    from lumina_illus.train import train
    state = train(load_config("configs/toy_lu.yaml"))
"""

from lumina_illus.train.loop import TooManyBadSteps, train

__all__ = ["TooManyBadSteps", "train"]
