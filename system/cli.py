"""The `repforge` command line (also `python -m system.cli`, as `ray job submit` runs it).

    repforge --help
    repforge quickstart
    ray job submit -- python -m system.cli pretrain --config configs/cifar10.yaml

Every job prints, as the last line of its standard output, the URI of what it wrote.
A user error (bad config, missing input, existing output) is one line on stderr and
exit code 2, with no traceback; REPFORGE_DEBUG=1 shows the traceback.

This module is the composition root: the only place in system/ that reaches into tune/
and serve/ (imported lazily inside their commands).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from system.config import JobConfig

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


class CliError(ValueError):
    """A usage error found by the CLI itself."""


def _config_help() -> str:
    lines = ["config keys (set with --set key=value):"]
    for section, field in JobConfig.model_fields.items():
        model = field.annotation
        if hasattr(model, "model_fields"):
            for name, sub in model.model_fields.items():
                lines.append(f"  {section}.{name}: {sub.description}")
        else:
            lines.append(f"  {section}: {field.description or ''}")
    return "\n".join(lines)


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (argparse then exits 2 with one line)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML preset (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set train.lr=3e-4 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repforge", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    data = commands.add_parser("data", help="ingest and inspect datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    ingest = data_commands.add_parser("ingest", help="write images as canonical sharded Parquet")
    ingest.add_argument("src", help="an ImageFolder tree, a flat folder of images, or Parquet")
    ingest.add_argument("--out", required=True, help="output dataset folder")
    ingest.add_argument("--image-col", default="image", help="image column of a Parquet source")
    ingest.add_argument("--label-col", help="label column of a Parquet source (default: label, if present)")
    ingest.add_argument("--id-col", help="id column of a Parquet source (default: id, if present)")
    ingest.add_argument(
        "--shard-rows", type=positive_int, default=10_000, help="rows per output Parquet file"
    )
    ingest.add_argument("--overwrite", action="store_true", help="replace an existing output")
    info = data_commands.add_parser("info", help="rows, classes, image sizes and bytes of a dataset")
    info.add_argument("dataset", help="dataset folder or Parquet file")

    for job, text in (
        ("pretrain", "self-supervised pretraining (Ray Train)"),
        ("finetune", "PEFT fine-tuning with a linear head (Ray Train)"),
    ):
        sub = commands.add_parser(job, help=text, epilog=_config_help(), formatter_class=raw)
        _add_config_args(sub)

    sweep = commands.add_parser(
        "sweep", help="hyperparameter and rank search (Ray Tune)", epilog=_config_help(), formatter_class=raw
    )
    _add_config_args(sweep)
    sweep.add_argument(
        "--job", choices=["finetune", "pretrain"], default="finetune", help="what each trial runs"
    )
    sweep.add_argument(
        "--resume", action="store_true", help="continue an interrupted sweep of the same run.name"
    )

    embed = commands.add_parser("embed", help="embed a dataset with a model artifact (Ray Data)")
    embed.add_argument("--model", required=True, help="model artifact folder")
    embed.add_argument("--data", required=True, help="dataset folder or Parquet file")
    embed.add_argument("--out", required=True, help="output embeddings folder")
    embed.add_argument("--batch-size", type=positive_int, default=128, help="images per model call")
    embed.add_argument("--concurrency", type=positive_int, help="model replicas (default: GPUs, or CPUs - 1)")
    embed.add_argument("--limit", type=positive_int, help="embed only the first N rows")
    embed.add_argument("--overwrite", action="store_true", help="replace an existing output")

    index = commands.add_parser("index", help="build, query and evaluate FAISS indexes")
    index_commands = index.add_subparsers(dest="index_command", required=True, metavar="SUBCOMMAND")
    build = index_commands.add_parser("build", help="index an embeddings folder")
    build.add_argument("--embeddings", required=True, help="embeddings folder")
    build.add_argument("--out", required=True, help="output index folder")
    build.add_argument("--factory", default="auto", help="'auto' or any FAISS index_factory string")
    build.add_argument("--metric", choices=["ip", "l2"], help="default: ip for normalised vectors, else l2")
    build.add_argument("--overwrite", action="store_true", help="replace an existing output")
    build.add_argument("--shards", type=positive_int, default=1, help="sub-indexes by id hash (Ray tasks)")
    build.add_argument("--memory-budget", help="RAM per shard for auto, e.g. 8G (default: RAM/2)")
    build.add_argument("--on-disk", action="store_true", help="IVF inverted lists memory-mapped from disk")
    build.add_argument(
        "--prefix-dim", type=int, help="coarse search on the first D dims, re-rank (0 off, default auto)"
    )
    build.add_argument("--target-recall", type=float, default=0.95, help="recall@10 to tune for")
    search = index_commands.add_parser("search", help="nearest neighbours of stored items or images")
    search.add_argument("--index", required=True, help="index folder")
    search.add_argument(
        "--id", dest="ids", action="append", default=[], help="query by a stored id (repeatable)"
    )
    search.add_argument("--image", dest="images", action="append", default=[], help="query by an image file")
    search.add_argument("--model", help="model artifact that embeds --image queries")
    search.add_argument("--k", type=positive_int, default=10, help="neighbours per query")
    search.add_argument("--target-recall", type=float, help="operating point (default: the build's)")
    evaluate = index_commands.add_parser("eval", help="recall against exact search, QPS, latency (JSON)")
    evaluate.add_argument("--index", required=True, help="index folder")
    evaluate.add_argument("--k", type=positive_int, default=10, help="recall@k and search k")
    evaluate.add_argument(
        "--queries", type=positive_int, default=200, help="number of stored vectors used as queries"
    )
    evaluate.add_argument("--target-recall", type=float, help="operating point (default: the build's)")

    srv = commands.add_parser("serve", help="serve /v1/embed, /v1/classify, /v1/search (Ray Serve)")
    srv.add_argument("--model", required=True, help="model artifact folder")
    srv.add_argument("--index", nargs="+", help="index folder for /v1/search (several: one shard each)")
    srv.add_argument("--classifier", help="model artifact with a head (default: --model if it has one)")
    srv.add_argument("--classes", help="JSON file where live classes (POST /v1/classes) persist")
    srv.add_argument("--token-file", help="API token file (default: $REPFORGE_API_TOKEN; neither: no auth)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on")
    add_app_limits(srv)

    runs = commands.add_parser("runs", help="inspect training runs")
    runs_commands = runs.add_subparsers(dest="runs_command", required=True, metavar="SUBCOMMAND")
    show = runs_commands.add_parser("show", help="print a run's metrics; write curves.png beside them")
    show.add_argument("run", help="run folder, or a run name under --storage")
    show.add_argument("--storage", default="runs", help="storage root of bare run names")

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
    return parser


def _job_config(args) -> JobConfig:
    from system.config import load_config

    return load_config(args.config, args.overrides)


def cmd_data(args) -> str:
    from system import data

    if args.data_command == "ingest":
        summary = data.ingest(
            args.src, args.out, args.image_col, args.label_col, args.id_col, args.shard_rows, args.overwrite
        )
        print(
            f"ingested {summary['rows']} rows in {summary['shards']} shards, "
            f"{summary['rejected']} rejected, classes: {','.join(summary['classes']) or '-'}"
        )
        return summary["out"]
    print(json.dumps(data.info(args.dataset), indent=2))
    return data.storage.normalize(args.dataset)


def cmd_train(args) -> str:
    from system.train import run_training

    published = run_training(_job_config(args), args.command)
    for name, uri in published.items():
        print(f"{name}: {uri}")
    return published["model"]


def cmd_sweep(args) -> str:
    from tune.sweep import run_sweep

    return run_sweep(_job_config(args), job=args.job, resume=args.resume)


def cmd_embed(args) -> str:
    from system.embed import run_embed

    return run_embed(
        args.model, args.data, args.out, args.batch_size, args.concurrency, args.limit, args.overwrite
    )


def cmd_index(args) -> str:
    from system import index

    if args.index_command == "build":
        manifest = index.build_index(
            args.embeddings,
            args.out,
            args.factory,
            args.metric,
            args.overwrite,
            shards=args.shards,
            memory_budget=args.memory_budget,
            on_disk=args.on_disk,
            prefix_dim=args.prefix_dim,
            target_recall=args.target_recall,
        )
        print(f"indexed {manifest['count']} vectors ({manifest['factory']}: {manifest['reason']})")
        print(f"search params {manifest['search_params']} for recall@10 >= {manifest['target_recall']}")
        return index.storage.normalize(args.out)
    if args.index_command == "eval":
        report = index.evaluate_index(
            args.index, k=args.k, num_queries=args.queries, target_recall=args.target_recall
        )
        print(json.dumps(report, indent=2))
        return index.storage.normalize(args.index)
    return search_index(args, index)


def search_index(args, index) -> str:
    if bool(args.ids) == bool(args.images):
        raise CliError("index search: give --id or --image (one kind of query)")
    if args.images and not args.model:
        raise CliError("index search: --image needs --model to embed it")
    vindex = index.open_index(args.index, args.target_recall)
    if args.ids:
        queries, (found, scores) = args.ids, vindex.search_by_id(args.ids, args.k)
    else:
        from pathlib import Path

        from system.embed import embed_images
        from system.models import load_artifact

        model, meta = load_artifact(args.model)
        index.check_fingerprint(vindex, meta["fingerprint"])
        images = [Path(p).read_bytes() for p in args.images]
        from system.data import check_image

        for path, image in zip(args.images, images):
            if (reason := check_image(image)) is not None:
                raise CliError(f"--image {path}: {reason}")
        queries, (found, scores) = (
            args.images,
            vindex.search(embed_images(model, meta["preprocessing"], images), args.k),
        )
    for query, ids, row in zip(queries, found, scores):
        hits = [
            {"id": i, "score": round(float(s), 5), "metadata": m}
            for i, s, m in zip(ids, row, vindex.metadata(ids))
        ]
        print(json.dumps({"query": query, "hits": hits}))
    return index.storage.normalize(args.index)


# The serve flags above are AppArgs' URIs; its scalar settings (limits, batching,
# replicas) become flags here, from the model itself, so a new field needs no CLI edit.
SERVE_URI_ARGS = {"model", "index", "classifier", "classes", "token_file"}


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


def cmd_serve(args) -> str:
    import signal
    import time

    from serve.app import start_app, stop_app

    index = args.index[0] if args.index and len(args.index) == 1 else args.index
    serve_args = {"model": args.model, "index": index, "classifier": args.classifier, "classes": args.classes}
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


def cmd_runs(args) -> str:
    from system.runs import show_run

    return show_run(args.run, args.storage)


def cmd_quickstart(args) -> str:
    from system.quickstart import run_quickstart

    return run_quickstart(args.storage, args.port, args.keep_serving, args.overrides)


COMMANDS = {
    "data": cmd_data,
    "pretrain": cmd_train,
    "finetune": cmd_train,
    "sweep": cmd_sweep,
    "embed": cmd_embed,
    "index": cmd_index,
    "serve": cmd_serve,
    "runs": cmd_runs,
    "quickstart": cmd_quickstart,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    connected_before = _ray_connected()  # a caller's Ray connection (main called in-process) stays
    try:
        uri = COMMANDS[args.command](args)
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
    return 0


def _ray_connected() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _shutdown_ray() -> None:
    """Disconnect (or stop the local instance this job started) so no log line follows the URI."""
    if _ray_connected():
        sys.modules["ray"].shutdown()


if __name__ == "__main__":
    sys.exit(main())
