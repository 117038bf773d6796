"""`repforge data ingest|info`: write images as canonical sharded Parquet, and inspect a dataset."""

from __future__ import annotations

import json

from repforge.commands.common import positive_int


def register(commands) -> dict:
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
    return {"data": run_data}


def run_data(args) -> str:
    from system import storage
    from system.data import dataset

    if args.data_command == "ingest":
        summary = dataset.ingest(
            args.src, args.out, args.image_col, args.label_col, args.id_col, args.shard_rows, args.overwrite
        )
        print(
            f"ingested {summary['rows']} rows in {summary['shards']} shards, "
            f"{summary['rejected']} rejected, classes: {','.join(summary['classes']) or '-'}"
        )
        return summary["out"]
    print(json.dumps(dataset.info(args.dataset), indent=2))
    return storage.normalize(args.dataset)
