"""Start a command under torchrun's launcher, ending as the command ends: its exit code, its one error line.

    encoderfit launch --nproc_per_node=2 train --epochs 3
    encoderfit launch --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 --nproc_per_node=8 train ...

Everything before the command (train or sweep) is torchrun's own options, passed to PyTorch's launcher
(torch.distributed.run) unchanged; without rendezvous options it runs --standalone on this machine. It is
``torchrun [options] -m encoderfit COMMAND [flags]``, except at the end: where a process fails, torchrun
prints its ChildFailedError report, a Python traceback, and exits 1; here the failing process's own
``error:`` line stands alone and the exit code is that process's (2 for bad input).
"""
from __future__ import annotations

import sys

LAUNCHED = ("train", "sweep")  # the commands that run one process per GPU
_RENDEZVOUS = ("--standalone", "--rdzv", "--rdzv_endpoint", "--rdzv-endpoint", "--master_addr", "--master-addr",
               "--nnodes")


class _BadOptions(Exception):
    pass


def usage() -> str:
    return ("usage: encoderfit launch [torchrun options] {train,sweep} [flags]\n\n" + __doc__.split("\n\n", 1)[1]
            + "\ntorchrun's options: torchrun --help. The command's flags: encoderfit train --help.\n")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    at = next((i for i, a in enumerate(argv) if a in LAUNCHED), None)
    if at is None:
        if any(a in ("-h", "--help") for a in argv):
            print(usage(), end="")
            return 0
        print(f"error: encoderfit launch needs a command to start, one of: {', '.join(LAUNCHED)} (e.g. encoderfit "
              f"launch --nproc_per_node=2 train --epochs 3)", file=sys.stderr)
        return 2
    options, command = argv[:at], argv[at:]
    if any(a in ("-h", "--help") for a in command[1:]):  # the command's help, once, not once per process
        from encoderfit.cli import main as encoderfit

        return encoderfit(command)
    if not any(o.split("=")[0].startswith(_RENDEZVOUS) for o in options):
        options = ["--standalone", *options]

    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    parser = get_args_parser()

    def refuse(message):  # one line, not argparse's usage dump
        raise _BadOptions(message)

    parser.error = refuse
    try:
        args = parser.parse_args([*options, "--module", "encoderfit", *command])
    except _BadOptions as exc:
        print(f"error: {exc} (the options before {command[0]} are torchrun's: see torchrun --help)", file=sys.stderr)
        return 2
    # the launcher's own log lines (a banner, "Sending process ... SIGTERM", "failed (exitcode: 2)") would bury
    # the error line the failing process printed
    for name in ("torch.distributed.run", "torch.distributed.elastic", "torch.distributed.elastic.agent.server.api",
                 "torch.distributed.elastic.multiprocessing.api"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
        if code != 2:  # 2: the process printed its own error line (bad input); anything else, say which failed
            how = f"exit code {failure.exitcode}" if failure.exitcode >= 0 else f"signal {-failure.exitcode}"
            print(f"error: rank {rank} of encoderfit {command[0]} failed ({how}); its output is above",
                  file=sys.stderr, flush=True)
        return code
    except SignalException as exc:  # Ctrl-C or SIGTERM: the launcher passed it on to the processes, which stopped
        return 128 + int(exc.sigval)  # after a checkpoint (and said so); the code a requeue script expects
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    return 0
