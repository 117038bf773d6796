"""`repforge compat fit|check`: upgrade a model without re-indexing first (docs/upgrades.md).

    repforge compat fit --old OLD --new NEW --data DATASET --out DIR           # prints the adapter URI
    repforge compat check --old OLD --new NEW [--adapter DIR] --gallery G --queries Q [--k 10]

`check` prints the report's URI last and exits 0 when the pair is compatible, 1 when it is
not, 2 on bad input (one line, as every command).
"""

from __future__ import annotations

import argparse

from repforge.commands.common import positive_int

KINDS = ("procrustes", "affine", "lowrank", "mlp")  # system.compat.maps.KINDS, without importing torch


class ExitWith(str):
    """A URI that main() prints last, with the exit code it returns."""

    exit_code = 0


def kinds_list(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(
            f"unknown map kind {unknown[0] if unknown else text!r} (known: {', '.join(KINDS)})"
        )
    return kinds


def margin(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def register(commands) -> dict:
    compat = commands.add_parser("compat", help="serve a new model against an old model's index (fit, check)")
    sub = compat.add_subparsers(dest="compat_command", required=True, metavar="SUBCOMMAND")
    fit = sub.add_parser(
        "fit", help="fit a map from the new model's space into the old one's; prints its URI"
    )
    fit.add_argument("--old", required=True, help="model artifact whose embeddings are indexed")
    fit.add_argument("--new", required=True, help="model artifact that will embed queries")
    fit.add_argument("--data", required=True, help="dataset whose images both models embed to fit the map")
    fit.add_argument("--out", required=True, help="adapter artifact folder to write")
    fit.add_argument("--limit", type=positive_int, default=10_000, help="rows of --data to embed (sample)")
    fit.add_argument(
        "--kinds", type=kinds_list, default=list(KINDS), help="map kinds to try, comma-separated"
    )
    fit.add_argument("--overwrite", action="store_true", help="replace an existing adapter")
    check = sub.add_parser(
        "check", help="the gate: old/old, new/old, new/new retrieval; exit 0 compatible, 1 not"
    )
    check.add_argument("--old", required=True, help="model artifact whose embeddings are indexed")
    check.add_argument("--new", required=True, help="model artifact that will embed queries")
    check.add_argument("--adapter", help="adapter artifact (repforge compat fit) the new queries go through")
    check.add_argument("--gallery", required=True, help="labelled dataset standing in for the indexed items")
    check.add_argument("--queries", required=True, help="labelled dataset of queries")
    check.add_argument("--k", type=positive_int, default=10, help="depth of mAP@k")
    check.add_argument("--limit", type=positive_int, help="embed only the first N rows of each dataset")
    check.add_argument(
        "--margin", type=margin, default=0.0, help="compatible when new_old >= old_old - margin"
    )
    check.add_argument("--out", help="report JSON URI (default: STORAGE/compat/OLD-NEW[-ADAPTER].json)")
    check.add_argument("--storage", default="runs", help="storage root of the default report URI")
    return {"compat": run_compat}


def run_compat(args) -> str:
    from system.compat import run_check, run_fit

    if args.compat_command == "fit":
        return run_fit(args.old, args.new, args.data, args.out, args.limit, args.kinds, args.overwrite)
    uri, report = run_check(
        args.old,
        args.new,
        args.gallery,
        args.queries,
        args.adapter,
        args.k,
        args.out,
        args.storage,
        args.limit,
        args.margin,
    )
    result = ExitWith(uri)
    result.exit_code = 0 if report["compatible"] else 1
    return result
