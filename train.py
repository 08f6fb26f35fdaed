"""DS_ACCELERATOR=cpu deepspeed --num_gpus 2 train.py configs/toy_lu.yaml [--override key=value ...]

Python entry of a training run (`launch/train_lu.sh` / `launch/train_sdxl.sh` run this file):
parse, build, train, close. Works under any launcher (deepspeed, srun, torchrun) and alone
(`python train.py CONFIG` trains on one local rank). Exit status 0 on success and after a
preemption signal (SIGTERM/SIGUSR1: the step finishes and a checkpoint is written first); 2 on a
config error (also: a rank whose config or git revision differs from rank 0's, refused at start on
every rank); 3 when the run stopped itself with a checkpoint (train.max_bad_steps non-finite steps in a
row, or more bad samples than data.max_skip_fraction); 4 when other ranks died or stopped answering
(the message names them; train.collective_timeout_s bounds the wait).
"""

from __future__ import annotations

import argparse
import os
import sys

# keep CPU runs from oversubscribing the cores: one thread per rank unless the user says otherwise
os.environ.setdefault("OMP_NUM_THREADS", "1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train (or resume) the run described by one YAML config.",
        epilog="example: DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/train_lu.sh configs/toy_lu.yaml "
        "--override train.max_steps=20",
    )
    p.add_argument("config", help="run config YAML (configs/lu2b_768.yaml, configs/toy_lu.yaml, ...)")
    p.add_argument("--override", "-o", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="set config keys, values parsed as YAML, e.g. train.max_steps=20 run.name=try2")
    p.add_argument("--family", default=None,
                   help="fail unless the config's family is this one (used by launch/train_*.sh)")
    # the deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from lumina_illus.config import ConfigError, ConfigErrorOnEveryRank, load_config

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        cfg = load_config(args.config, args.override)
        if args.family is not None and cfg.family != args.family:
            raise ConfigError(f"{args.config}: family is {cfg.family!r} but this launcher trains "
                              f"{args.family!r} (use launch/train_{'lu' if cfg.family == 'lumina2' else cfg.family}.sh)")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import torch.distributed as dist

    from lumina_illus.train import train
    from lumina_illus.train.cluster import PeerLost
    from lumina_illus.train.data_health import TooManyBadSamples
    from lumina_illus.train.loop import TooManyBadSteps

    try:
        state = train(cfg)
        if dist.get_rank() == 0:
            print(f"done: step {state.step}, {state.samples_seen} samples seen, {state.skipped_steps} skipped steps")
    except ConfigError as e:  # checks that need the world size (batch arithmetic) fail on every rank
        print(f"error: {e}", file=sys.stderr, flush=True)
        if isinstance(e, ConfigErrorOnEveryRank) and dist.is_initialized():
            dist.barrier()  # every rank has printed before any exits (the launcher kills the rest on the first exit)
        return 2
    except (TooManyBadSamples, TooManyBadSteps) as e:  # every rank stops at the same step, checkpoint written
        if dist.get_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return 3
    except PeerLost as e:  # on every surviving rank: its own view of who is gone
        print(f"error: {e}", file=sys.stderr)
        return 4
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
