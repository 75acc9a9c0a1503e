"""What the example CLIs share: logging set up once per process (INFO from dclip on the main process, warnings
only elsewhere), for the library's loggers and those of transformers and datasets; exit statuses; and the end of a
distributed launch (`leave_together`), or the refusal of one (`require_one_process`)."""

from __future__ import annotations

import logging
import os
import sys


PUSH_FAILED = 3  # the exit status of a CLI whose work is done and saved but whose push to the Hub failed
REFUSED = 4  # the exit status of a CLI that stopped before keeping a result that needs the user's confirmation


def setup_logging(process_index: int = 0, level: int = logging.INFO) -> None:
    """Log dclip's messages at `level` on the main process and warnings only on the others, one handler on stderr;
    transformers and datasets keep their own verbosity (warnings) so progress bars and reports are not doubled."""
    import datasets
    import transformers

    own_level = level if process_index == 0 else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, level=logging.WARNING, force=True)
    logging.getLogger("dclip").setLevel(own_level)
    transformers.utils.logging.set_verbosity(logging.WARNING if process_index == 0 else logging.ERROR)
    datasets.utils.logging.set_verbosity(logging.WARNING if process_index == 0 else logging.ERROR)


def leave_together() -> None:
    """The end of a distributed launch: every process waits for the others, then closes the process group. A process
    that exits while another still talks to it kills that one, and a group left open to the interpreter's shutdown can
    abort the process itself (gloo's threads: "terminate called without an active exception"). Nothing in a single
    process."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # torch's own calls: whoever started the group
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()
        dist.destroy_process_group()


def require_one_process(parser, script: str) -> None:
    """Stop a CLI that runs in one process when it was launched as several (`accelerate launch --num_processes N`,
    torchrun; any launcher that sets `WORLD_SIZE`): each process would repeat the whole job and write the same
    files. Exits with status 2 and one line, as `parser.error` does without the usage."""
    launched = int(os.environ.get("WORLD_SIZE") or 1)
    if launched > 1:
        parser.exit(2, f"{parser.prog}: error: {script} runs in one process, but was launched as {launched} "
                       f"(WORLD_SIZE={launched}): each would repeat the whole job and write the same files. Run it "
                       f"as `python {script} ...`, or unset WORLD_SIZE where no launcher started this process\n")
