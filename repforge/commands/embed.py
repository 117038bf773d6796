"""`repforge embed`: embed a dataset with a model artifact (Ray Data), resumable."""

from __future__ import annotations

from repforge.commands.common import positive_int


def register(commands) -> dict:
    embed = commands.add_parser("embed", help="embed a dataset with a model artifact (Ray Data)")
    embed.add_argument("--model", required=True, help="model artifact folder")
    embed.add_argument("--data", required=True, help="dataset folder or Parquet file")
    embed.add_argument("--out", required=True, help="output embeddings folder")
    embed.add_argument("--batch-size", type=positive_int, default=128, help="images per model call")
    embed.add_argument("--concurrency", type=positive_int, help="model replicas (default: GPUs, or CPUs - 1)")
    embed.add_argument("--limit", type=positive_int, help="embed only the first N rows")
    embed.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return {"embed": run_embed}


def run_embed(args) -> str:
    from system.embed import run_embed as embed

    return embed(
        args.model, args.data, args.out, args.batch_size, args.concurrency, args.limit, args.overwrite
    )
