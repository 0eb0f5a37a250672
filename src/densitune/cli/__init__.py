"""The ``densitune`` command: train, search, run, report, best, demo, list, ...

:mod:`~densitune.cli.parser` builds the parser and turns parsed arguments into typed options;
:mod:`~densitune.cli.commands` holds one function per command (parse -> one service or API call ->
print); :func:`main` runs one. Bad input (unknown names, ε < 0, D <= 0, missing data or results) is
checked before Ray starts and before anything is written, and ends with one line on stderr and exit
status 2.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Sequence

from densitune.cli.commands import command, error_line
from densitune.cli.parser import ATTACK_NAMES, FORMATS, METRICS, PLOT_FORMATS, VIEWS, build_parser
from densitune.cli.parser import search_values as _search_values
from densitune.errors import DensituneError, StorageError
from densitune.run.console import (
    Interrupted,
    Terminated,
    close_progress,
    resume_command,
    setup_logging,
    sigterm_as_interrupt,
    terminated,
)
from densitune.run.runstore import stuck_calls, use_storage_timeout
from densitune.run.storage import describe, storage_error

__all__ = ("ATTACK_NAMES", "FORMATS", "METRICS", "PLOT_FORMATS", "VIEWS", "_search_values", "build_parser", "main")

#: Commands whose interruption names the command that continues them.
RESUMABLE = ("train", "search", "demo", "run")


#: A write that failed for want of room or permission on the file system: one line naming the folder, never a traceback.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def main(argv: Sequence[str] | None = None) -> int:
    code = _main(argv)
    if stuck_calls():  # a storage call that never answered: exit now, not when the store answers (pyarrow's atexit)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    setup_logging(quiet=getattr(args, "quiet", False), verbose=getattr(args, "verbose", False))
    sigterm_as_interrupt()
    try:
        use_storage_timeout(getattr(args, "storage_timeout", None))
        return command(args.command)(args, argv)
    except (DensituneError, Interrupted) as e:
        close_progress()
        print(error_line(e), file=sys.stderr)
        return e.exit_code if isinstance(e, Interrupted) else 2
    except (OSError, ValueError) as e:
        if (mapped := storage_error(e)) is not None and getattr(e, "errno", None) not in DISK_ERRNOS:
            close_progress()  # wrong credentials, a missing bucket, vanished Tune state, a failed request: one line
            print(error_line(mapped), file=sys.stderr)
            return 2
        if not isinstance(e, OSError) or e.errno not in DISK_ERRNOS:
            raise
        close_progress()  # a full disk (or quota, or a read-only mount) under any write of the driver: one line
        print(error_line(StorageError(describe(e, e.filename or getattr(args, "out", "") or "."))), file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM outside a run's account (densitune.run.console.Terminated)
        close_progress()
        how = f"; continue with: {resume_command(argv)}" if args.command in RESUMABLE else ""
        print(f"densitune: interrupted{how}", file=sys.stderr)
        return Terminated.exit_code if terminated(stop) else 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
