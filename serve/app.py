"""The repforge Ray Serve application graph: `build_app(args)`, the import path of deploy.yaml.

    serve run deploy.yaml                                   # the config file
    repforge serve --model runs/quickstart/finetune/model --index runs/quickstart/index

The HTTP ingress (serve.ingress) over a batched embedder (serve.embedder), an optional
separate classifier, one retriever per index shard (serve.retriever) and the live classes
store (serve.classes). Which model and index each replica serves is its `user_config`, so a
swap is a config update (serve.control.swap_versions, or `serve deploy` with a new
user_config). Running, swapping and stopping from a driver: serve.control.
"""

from __future__ import annotations

import ray
from ray import serve

from serve.args import index_shards, resolve_args, retriever_name, search_in_ingress, user_configs
from serve.auth import token_sha256
from serve.classes import ClassesDeployment
from serve.embedder import EmbedderDeployment
from serve.ingress import RepforgeIngress
from serve.retriever import RetrieverDeployment
from serve.schemas import AppArgs


def build_app(args: AppArgs | dict) -> serve.Application:
    """The application graph: ingress -> embedder (+ classifier), retriever per shard, classes."""
    cfg, _, classifier_uri = resolve_args(args)
    versions = user_configs(cfg, classifier_uri)
    # Ask for a GPU only where the cluster has one; otherwise the replica would never be placed.
    has_gpu = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    # A separate classifier model shares the GPU with the embedder (both fit on one-GPU nodes).
    gpu_share = 0.5 if classifier_uri and classifier_uri != cfg.model else 1
    # Bounded queues: an overloaded model or index answers 503 at once instead of timing out.
    limits = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
    }
    model_options = {
        **limits,
        "health_check_period_s": 2,  # a dead replica is noticed and replaced within seconds
        "num_replicas": cfg.embedder_replicas,
        "ray_actor_options": {"num_cpus": cfg.replica_cpus, **({"num_gpus": gpu_share} if has_gpu else {})},
    }
    batching = {"max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s}
    embedder = EmbedderDeployment.options(user_config=versions["EmbedderDeployment"], **model_options).bind(
        **batching
    )
    classifier = None
    if classifier_uri == cfg.model:
        classifier = embedder
    elif classifier_uri:
        classifier = EmbedderDeployment.options(
            name="ClassifierDeployment", user_config=versions["ClassifierDeployment"], **model_options
        ).bind(**batching)
    shards = index_shards(cfg)
    # One replica per retriever: it is its index's one writer (live items); reads are
    # replicated by the ingress replicas' copies when the index fits them.
    retrievers = [
        RetrieverDeployment.options(
            name=retriever_name(i, len(shards)),
            user_config=versions[retriever_name(i, len(shards))],
            **limits,
        ).bind(cfg.persist_items)
        for i in range(len(shards))
    ]
    classes = ClassesDeployment.bind(cfg.classes)
    # The ingress keeps its own, larger queue (serve.ingress): it only parses and waits, and
    # a request it sheds gets Serve's plain-text 503, while the deployments above shed with
    # the JSON `overloaded` error.
    ingress = RepforgeIngress.options(num_replicas=cfg.ingress_replicas, health_check_period_s=2)
    return ingress.bind(
        embedder,
        classifier,
        retrievers,
        classes,
        cfg.model_dump(),
        token_sha256(cfg.token_file),
        search_in_ingress(cfg),
    )
