"""Running a command line the same way wherever it starts: `minaf3 ...` (cli.py), `python -m minaf3.batch`
and `python -m minaf3.evaluate` (what torchrun runs with -m).

    run(parser, argv)    parse, log warnings as `minaf3: warning: ...`, run the command, return its status

Errors minaf3 raises on purpose print as one `minaf3: error: ...` line with status EXIT_ERROR, like
argparse's own usage errors; Ctrl-C ends with EXIT_INTERRUPTED and no traceback; anything else is a bug and
keeps its traceback.
"""

import argparse
import logging
import sys

from minaf3.errors import Minaf3Error

EXIT_ERROR = 2  # argparse's status for usage errors; minaf3 errors share it
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


class StderrHandler(logging.Handler):
    """Log records as `minaf3: warning: ...` on whatever sys.stderr is at the time (tests replace it)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"minaf3: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse `argv` (default sys.argv[1:]) with `parser`, whose commands set `run`, and run the command."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error argparse has already printed
        return exit_.code if isinstance(exit_.code, int) else EXIT_ERROR
    logger = logging.getLogger("minaf3")
    if not any(isinstance(h, StderrHandler) for h in logger.handlers):
        logger.addHandler(StderrHandler(logging.WARNING))
    try:
        return args.run(args)
    except Minaf3Error as error:
        print(f"minaf3: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
