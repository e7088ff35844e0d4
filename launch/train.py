"""Train a LoRA with FPO.

    accelerate launch launch/train.py [--config launch/configs/<name>.yaml] [--resume latest|PATH] [a.b=value ...]

With no arguments it trains the embedded shapes model (see README).

--resume continues the run's own saved config (<output_dir>/config.yaml): settings given with it must
equal the saved ones (one line naming each that differs). To change one deliberately, e.g. train longer:

    accelerate launch launch/train.py output_dir=runs/x --resume latest --allow-change train.iterations=40

(train.iterations, train.collective_timeout_s, log.*, checkpoint.*, eval.*); config.yaml records the change.
"""
from __future__ import annotations

import argparse
import sys

from fpo_diffusion.cli import ArgumentParser, int_at_least, run_cli


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (fields of fpo_diffusion.config.Config)")
    parser.add_argument("--resume", help="'latest' or a checkpoint folder of this run's output_dir")
    parser.add_argument("--stop-after", type=int_at_least(1), metavar="N",
                        help="stop after N iterations of this invocation (checkpointed; continue with --resume latest)")
    parser.add_argument("--allow-change", action="append", default=[], metavar="KEY=VALUE",
                        help="with --resume: change a setting of the run deliberately (repeatable; train.iterations, "
                             "train.collective_timeout_s, log.*, checkpoint.*, eval.*); config.yaml records it")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 fpo.beta=5 (before or after "
                                                     "the options)")
    args = parser.parse_args(argv)

    import os

    from fpo_diffusion.config_io import load_config
    from fpo_diffusion.distributed import collective_failure
    from fpo_diffusion.trainer import TrainingError, run

    if args.allow_change and not args.resume:
        parser.error("--allow-change changes a resumed run: use it with --resume (a new run takes plain overrides)")
    if args.resume:  # the run's own saved config, not the defaults
        from fpo_diffusion.run_state import resume_config

        cfg = resume_config(args.config, args.overrides, args.allow_change)
    else:
        cfg = load_config(args.config, args.overrides)
    try:
        run(cfg, resume=args.resume, stop_after=args.stop_after)
    except TrainingError as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # torch.distributed: DistBackendError and gloo's errors are RuntimeErrors
        why = collective_failure(e)
        if why is None:
            raise
        print(f"train: error: rank {os.environ.get('RANK', '0')}: {why}; stopping (the last checkpoint is intact: "
              f"--resume latest)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="train"))
