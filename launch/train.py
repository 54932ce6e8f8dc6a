"""The `deepspeed` entry point: a script for the launcher, a shim over `dsdpo train`.

    deepspeed launch/train.py --ds_config ds_configs/rtx4080.json --model DIR --data FILE --output DIR
    deepspeed --num_gpus 8 launch/train.py ...          # several GPUs: the same command
    python launch/train.py --demo                        # tiny model, built-in data, CPU, a minute

Every option is `dsdpo train`'s (dsdpo/cli/train.py, built from the settings in dsdpo/config/).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from dsdpo.cli.train import train_command
    from dsdpo.runtime.engine import finish_distributed

    try:
        train_command.main(args=argv, prog_name="launch/train.py")
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
    else:
        code = 0
    if code == 0:  # a failed rank may have left: no barrier to wait on then
        finish_distributed()
    return code


if __name__ == "__main__":
    sys.exit(main())
