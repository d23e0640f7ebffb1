"""run.sh's launcher: `python -m qwen_moe_ft.launch torchrun|accelerate [the launcher's options] SCRIPT [args]` runs
torchrun's or `accelerate launch`'s own code in this process. Where a training process fails, or a signal stops the
run, it exits with that process's status (128 + the signal's number for a signal) and leaves out the launcher's
traceback and failure report: the training process has already said why, on a line of its own (`error: ...`, or
the step to resume from)."""
from __future__ import annotations

import subprocess
import sys

USAGE = "usage: python -m qwen_moe_ft.launch torchrun|accelerate [the launcher's options] SCRIPT [args]"


def _launch(launcher: str, argv: list[str]) -> None:
    if launcher == "torchrun":
        from torch.distributed.run import parse_args, run

        run(parse_args(argv))
    elif launcher == "accelerate":
        from accelerate.commands.launch import launch_command, launch_command_parser

        launch_command(launch_command_parser().parse_args(argv))
    else:
        raise SystemExit(f"{USAGE}; got {launcher!r}")


def _status(exitcode: int) -> int:
    """A shell's exit status for a process's: a negative one is the signal that killed it."""
    return exitcode if exitcode > 0 else 128 - exitcode if exitcode < 0 else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit(USAGE)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        _launch(argv[0], argv[1:])
    except ChildFailedError as failed:  # torchrun, and accelerate's launch of several processes
        _, first = failed.get_first_failure()
        return _status(first.exitcode)
    except SignalException as stopped:  # the processes got the signal too, and said where to resume
        return 128 + int(stopped.sigval)
    except subprocess.CalledProcessError as failed:  # accelerate's launch of one process
        return _status(failed.returncode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
