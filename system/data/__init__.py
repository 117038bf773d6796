"""Data stage: the dataset contract (Parquet images), ingest, and image transforms.

dataset.py     the contract: schema, checks, ingest, reading, the bundled digits
transforms.py  timm preprocessing as batch functions (eval and SSL views)
"""

from system.data.dataset import (
    DataError,
    check_dataset,
    check_image,
    count_rows,
    digits_dataset,
    info,
    ingest,
    read_classes,
    read_dataset,
)

__all__ = [
    "DataError",
    "check_dataset",
    "check_image",
    "count_rows",
    "digits_dataset",
    "info",
    "ingest",
    "read_classes",
    "read_dataset",
]
