"""``accelerate launch`` whose failure is the launched script's: its exit status and its one line.

    python -m fpo_diffusion.launcher [accelerate launch options] launch/train.py [train.py arguments]

takes exactly ``accelerate launch``'s arguments and runs it in-process. What differs is only how a
failed script ends: ``accelerate launch`` itself raises after the script's own one-line error
(``subprocess.CalledProcessError`` for one process, torch elastic's ``ChildFailedError`` box and
its log lines for several) and exits 1; here the script's line is the last thing printed and the
exit status is the script's (the first failed rank's; ``128 + N`` for a rank killed by signal N).

Plain ``accelerate launch`` stays supported (the README's commands use it): its exit status is 1 on
any failure, with ``-q`` (one process) it prints no traceback of its own.
"""
from __future__ import annotations

import logging
import subprocess
import sys


def _status(code: int | None) -> int:
    if code is None:
        return 1
    return 128 - code if code < 0 else (code or 1)


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser

    args = launch_command_parser().parse_args(sys.argv[1:] if argv is None else argv)
    # torch elastic logs each failed rank and every SIGTERM it sends the others: the script said why already
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        launch_command(args)
    except subprocess.CalledProcessError as e:  # one process: the script printed its line
        return _status(e.returncode)
    except Exception as e:
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

        if not isinstance(e, ChildFailedError):
            raise
        _, failure = e.get_first_failure()
        return _status(failure.exitcode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
