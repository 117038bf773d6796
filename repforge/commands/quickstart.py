"""`repforge quickstart`: the whole pipeline on the bundled digits, in minutes."""

from __future__ import annotations


def register(commands) -> dict:
    quick = commands.add_parser("quickstart", help="the whole pipeline on bundled digits, in minutes")
    quick.add_argument("--storage", default="runs", help="root folder for everything it writes")
    quick.add_argument("--port", type=int, default=8000, help="port of the demo app on 127.0.0.1")
    quick.add_argument("--keep-serving", action="store_true", help="leave the app up and print curl examples")
    quick.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of configs/quickstart.yaml for pretrain/finetune/sweep",
    )
    return {"quickstart": run_quickstart}


def run_quickstart(args) -> str:
    from repforge.quickstart import run_quickstart as quickstart

    return quickstart(args.storage, args.port, args.keep_serving, args.overrides)
