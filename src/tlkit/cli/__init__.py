"""The ``tlkit`` command line (also ``python -m tlkit``).

One module per group of commands: `tlkit.cli._train` (train, config, lr-find, rank),
`tlkit.cli._use` (evaluate, predict, demo, soup), `tlkit.cli._export`, `tlkit.cli._machine`
(env, shards, backbones); `tlkit.cli._parser` builds the parser and `tlkit.cli._args` holds what
they share. Only `main` is public.
"""

from __future__ import annotations

import sys

from tlkit._text import escape_control
from tlkit.cli._parser import build_parser

__all__ = ["main", "build_parser"]


def _one_line(errors: list[dict], root: type | None = None) -> str:
    """pydantic's errors as ``field: message (got value)``, joined by ``; `` (its str is 4 lines each).

    An unknown key of ``root`` (the model validated) gets the closest field names.
    """
    from tlkit._strict import close_keys

    parts = []
    for err in errors:
        field = ".".join(str(x) for x in err["loc"]) or "config"
        message, value = err["msg"].removeprefix("Value error, "), err.get("input")
        close = close_keys(root, tuple(err["loc"])) if root is not None and err["type"] == "extra_forbidden" else []
        if close:
            message = f"unknown key, did you mean {' or '.join(repr(c) for c in close)}?"
        # The value, unless the message quotes it already or it is a long section.
        quiet = "got " in message or isinstance(value, (dict, list)) and len(repr(value)) > 60
        parts.append(f"{field}: {message}" + ("" if quiet else f" (got {repr(value)[:60]})"))
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 on bad input, with the reason on stderr)."""
    args = build_parser().parse_args(argv)  # before the heavy imports: --help and --version stay fast
    from pydantic import ValidationError

    from tlkit._fs import SymlinkRefused
    from tlkit._runfiles import RunFileError
    from tlkit.backbone import HubDownloadError
    from tlkit.checkpoint import CheckpointError
    from tlkit.distributed import destroy_distributed
    from tlkit.runlock import OutputDirError, RunLockedError

    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError, CheckpointError, ValidationError, RunLockedError,
            OutputDirError, HubDownloadError, SymlinkRefused) as e:
        if isinstance(e, ValidationError):
            from tlkit.config import RunConfig

            message = _one_line(e.errors(include_url=False), RunConfig if e.title == "RunConfig" else None)
        else:
            message = str(e)
        # Messages quote file names, class names and config values: never raw control characters.
        print(f"tlkit {args.command}: error: {escape_control(message, keep=chr(10))}", file=sys.stderr)
        return 2
    except (RunFileError, FloatingPointError) as e:  # the run's state is known; no traceback helps
        print(f"tlkit {args.command}: error: {e}", file=sys.stderr)
        return 1
    finally:
        destroy_distributed()  # under torchrun; a no-op in one process

