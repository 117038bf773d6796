"""Index stage: FAISS indexes over an embeddings dataset (the Index contract in DESIGN.md).

recipes.py  which FAISS recipe for a size, metric and memory budget
build.py    build_index: embeddings folder -> index folder (sharded, Ray tasks)
reading.py  streaming reads of the embeddings (footers, batches, samples, id map)
partition.py  a sharded build's one read: rows to per-shard staging files (Ray tasks)
tune.py     operating points: search parameters against measured recall and QPS
api.py      VectorIndex / open_index: search (filtered too), update
filters.py  metadata filters: parse_filter (FilterError), masks over the attribute columns
filtered.py filtered search strategies (exact over matches, FAISS IDSelector) and their tuning
auto.py     --factory auto: candidates built and measured, the fastest at the target recall wins
evaluate.py evaluate_index: recall against exact search, QPS, latency
files.py    the files of an index folder
"""

from system.index.api import VectorIndex, check_fingerprint, open_index
from system.index.build import build_index
from system.index.evaluate import evaluate_index
from system.index.files import IDS_FILE, MANIFEST_FILE
from system.index.filters import FilterError, parse_filter
from system.index.recipes import IndexInputError, choose_factory, new_index

__all__ = [
    "IDS_FILE",
    "MANIFEST_FILE",
    "FilterError",
    "IndexInputError",
    "VectorIndex",
    "build_index",
    "check_fingerprint",
    "choose_factory",
    "evaluate_index",
    "new_index",
    "open_index",
    "parse_filter",
]
