"""What every command module shares: the usage error, argument types, config arguments."""

from __future__ import annotations

import argparse

from system.config import JobConfig


class CliError(ValueError):
    """A usage error found by the CLI itself (one line, exit 2)."""


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (argparse then exits 2 with one line)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def config_help() -> str:
    """Every config key with its description: the epilog of the jobs that take --config/--set."""
    lines = ["config keys (set with --set key=value):"]
    for section, field in JobConfig.model_fields.items():
        model = field.annotation
        if hasattr(model, "model_fields"):
            for name, sub in model.model_fields.items():
                lines.append(f"  {section}.{name}: {sub.description}")
        else:
            lines.append(f"  {section}: {field.description or ''}")
    return "\n".join(lines)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML preset (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set train.lr=3e-4 (repeatable)",
    )


def job_parser(commands, name: str, text: str) -> argparse.ArgumentParser:
    """A job configured by --config and --set, with every config key in its --help."""
    parser = commands.add_parser(
        name, help=text, epilog=config_help(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser)
    return parser


def job_config(args) -> JobConfig:
    from system.config import load_config

    return load_config(args.config, args.overrides)
