"""The `repforge` command line (also `python -m repforge`, as `ray job submit` runs it).

    repforge --help
    repforge quickstart
    ray job submit -- python -m repforge pretrain --config configs/cifar10.yaml

Every job prints, as the last line of its standard output, the URI of what it wrote.
A user error (bad config, missing input, existing output) is one line on stderr and
exit code 2, with no traceback; REPFORGE_DEBUG=1 shows the traceback. Each command group
lives in repforge/commands/ (its arguments and its handler); this module assembles them.
"""

from __future__ import annotations

import argparse
import os
import sys

from repforge.commands import compat, data, embed, index, quickstart, serve, train

# In the order `repforge --help` lists them: the pipeline's order.
COMMAND_MODULES = (data, train, embed, index, serve, compat, quickstart)
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    """The parser; each command's parsed arguments carry its handler (`args.handler`)."""
    parser = argparse.ArgumentParser(prog="repforge", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        for name, handler in module.register(commands).items():
            commands.choices[name].set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    connected_before = _ray_connected()  # a caller's Ray connection (main called in-process) stays
    try:
        uri = args.handler(args)
    except USER_ERRORS as err:
        if os.environ.get("REPFORGE_DEBUG"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"repforge: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("repforge: interrupted", file=sys.stderr)
        return 130
    finally:
        if not connected_before:
            _shutdown_ray()
    print(uri, flush=True)
    return getattr(uri, "exit_code", 0)  # `compat check`: 1 when not compatible


def _ray_connected() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _shutdown_ray() -> None:
    """Disconnect (or stop the local instance this job started) so no log line follows the URI."""
    if _ray_connected():
        sys.modules["ray"].shutdown()


if __name__ == "__main__":
    sys.exit(main())
