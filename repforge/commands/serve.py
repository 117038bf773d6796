"""`repforge serve`: the Ray Serve app (/v1/embed, /v1/classify, /v1/search) until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse

# The flags below are AppArgs' URIs; its scalar settings (limits, batching, replicas)
# become flags from the model itself, so a new field needs no CLI edit.
SERVE_URI_ARGS = {"model", "index", "classifier", "classes", "token_file", "compat"}


def register(commands) -> dict:
    srv = commands.add_parser("serve", help="serve /v1/embed, /v1/classify, /v1/search (Ray Serve)")
    srv.add_argument("--model", required=True, help="model artifact folder")
    srv.add_argument("--index", nargs="+", help="index folder for /v1/search (several: one shard each)")
    srv.add_argument("--classifier", help="model artifact with a head (default: --model if it has one)")
    srv.add_argument("--classes", help="JSON file where live classes (POST /v1/classes) persist")
    srv.add_argument("--token-file", help="API token file (default: $REPFORGE_API_TOKEN; neither: no auth)")
    srv.add_argument("--compat", help="passing `repforge compat check` report: serve another model's index")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on")
    add_app_limits(srv)
    return {"serve": run_serve}


def add_app_limits(parser: argparse.ArgumentParser) -> None:
    from serve.schemas import AppArgs  # pydantic only: no Ray import when the parser is built

    for name, field in AppArgs.model_fields.items():
        if name in SERVE_URI_ARGS:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} (default: {field.default})"
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=field.annotation, default=None, help=help_text)


def app_settings(args) -> dict:
    """The AppArgs settings given on the command line (the others keep AppArgs' defaults)."""
    from serve.schemas import AppArgs

    names = [name for name in AppArgs.model_fields if name not in SERVE_URI_ARGS]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def run_serve(args) -> str:
    import signal
    import time

    from serve.control import start_app, stop_app

    index = args.index[0] if args.index and len(args.index) == 1 else args.index
    serve_args = {"model": args.model, "index": index, "classifier": args.classifier, "classes": args.classes}
    serve_args["compat"] = args.compat
    url = start_app(
        {**serve_args, "token_file": args.token_file, **app_settings(args)}, host=args.host, port=args.port
    )
    print(f"serving on {url} (OpenAPI at {url}/docs); Ctrl-C stops", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    try:
        while not stop:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    stop_app()
    return url
