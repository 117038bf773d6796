"""Embed stage: batch embedding of a dataset with Ray Data, and the embeddings contract."""

from system.embed.batch import (
    EmbedError,
    embed_images,
    embeddings_metadata,
    embeddings_table,
    read_embeddings,
    run_embed,
)

__all__ = [
    "EmbedError",
    "embed_images",
    "embeddings_metadata",
    "embeddings_table",
    "read_embeddings",
    "run_embed",
]
