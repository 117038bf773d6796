"""`repforge index build|search|eval`: FAISS indexes over an embeddings folder."""

from __future__ import annotations

import json

from repforge.commands.common import CliError, positive_int


def register(commands) -> dict:
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
    build.add_argument(
        "--tune-seconds", type=float, help="time auto may spend measuring candidate recipes (default 120)"
    )
    search = index_commands.add_parser("search", help="nearest neighbours of stored items or images")
    search.add_argument("--index", required=True, help="index folder")
    search.add_argument(
        "--id", dest="ids", action="append", default=[], help="query by a stored id (repeatable)"
    )
    search.add_argument("--image", dest="images", action="append", default=[], help="query by an image file")
    search.add_argument("--model", help="model artifact that embeds --image queries")
    search.add_argument("--k", type=positive_int, default=10, help="neighbours per query")
    search.add_argument("--target-recall", type=float, help="operating point (default: the build's)")
    search.add_argument("--filter", help="metadata filter (JSON), e.g. '{\"label\": 3}'; see README")
    evaluate = index_commands.add_parser("eval", help="recall against exact search, QPS, latency (JSON)")
    evaluate.add_argument("--index", required=True, help="index folder")
    evaluate.add_argument("--k", type=positive_int, default=10, help="recall@k and search k")
    evaluate.add_argument(
        "--queries", type=positive_int, default=200, help="number of stored vectors used as queries"
    )
    evaluate.add_argument("--target-recall", type=float, help="operating point (default: the build's)")
    evaluate.add_argument("--filter", help="metadata filter (JSON): recall against the exact filtered answer")
    info = index_commands.add_parser(
        "info", help="recipe, operating points, filterable columns, devices (JSON)"
    )
    info.add_argument("--index", required=True, help="index folder")
    return {"index": run_index}


def run_index(args) -> str:
    from system import index, storage

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
            tune_seconds=args.tune_seconds,
        )
        print(f"indexed {manifest['count']} vectors ({manifest['factory']}: {manifest['reason']})")
        print(f"search params {manifest['search_params']} for recall@10 >= {manifest['target_recall']}")
        return storage.normalize(args.out)
    if args.index_command == "eval":
        report = index.evaluate_index(
            args.index,
            k=args.k,
            num_queries=args.queries,
            target_recall=args.target_recall,
            filter=_filter(args.filter),
        )
        print(json.dumps(report, indent=2))
        return storage.normalize(args.index)
    if args.index_command == "info":
        print(json.dumps(index.open_index(args.index).describe(), indent=2, default=str))
        return storage.normalize(args.index)
    return search_index(args)


def _filter(text: str | None) -> dict | None:
    """The --filter JSON as a dict; a malformed one fails (exit 2) before any index loads."""
    from system.index import parse_filter

    parse_filter(text)
    return json.loads(text) if text else None


def search_index(args) -> str:
    from pathlib import Path

    from system import index, storage

    if bool(args.ids) == bool(args.images):
        raise CliError("index search: give --id or --image (one kind of query)")
    if args.images and not args.model:
        raise CliError("index search: --image needs --model to embed it")
    flt = _filter(args.filter)
    vindex = index.open_index(args.index, args.target_recall)
    if args.ids:
        queries, (found, scores) = args.ids, vindex.search_by_id(args.ids, args.k, flt)
    else:
        from system.data import check_image
        from system.embed import embed_images
        from system.models import load_artifact

        model, meta = load_artifact(args.model)
        index.check_fingerprint(vindex, meta["fingerprint"])
        images = [Path(p).read_bytes() for p in args.images]
        for path, image in zip(args.images, images):
            if (reason := check_image(image)) is not None:
                raise CliError(f"--image {path}: {reason}")
        queries = args.images
        found, scores = vindex.search(embed_images(model, meta["preprocessing"], images), args.k, flt)
    for query, ids, row in zip(queries, found, scores):
        hits = [
            {"id": i, "score": round(float(s), 5), "metadata": m}
            for i, s, m in zip(ids, row, vindex.metadata(ids))
        ]
        print(json.dumps({"query": query, "hits": hits}))
    return storage.normalize(args.index)
