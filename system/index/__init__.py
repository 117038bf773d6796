"""Index stage: FAISS indexes over an embeddings dataset (the Index contract in DESIGN.md).

recipes.py  which FAISS recipe for a size, metric and memory budget
build.py    build_index: embeddings folder -> index folder (sharded, Ray tasks)
tune.py     operating points: search parameters against measured recall and QPS
api.py      VectorIndex / open_index: search, update, evaluate
files.py    the files of an index folder
"""

from system.index.api import VectorIndex, check_fingerprint, evaluate_index, open_index
from system.index.build import build_index
from system.index.files import IDS_FILE, MANIFEST_FILE
from system.index.recipes import IndexInputError, choose_factory, new_index

__all__ = [
    "IDS_FILE",
    "MANIFEST_FILE",
    "IndexInputError",
    "VectorIndex",
    "build_index",
    "check_fingerprint",
    "choose_factory",
    "evaluate_index",
    "new_index",
    "open_index",
]
