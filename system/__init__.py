"""The core library, one subpackage per stage of the pipeline (DESIGN.md):

    data -> models -> adapters, objectives -> train -> embed -> index

A module imports only stages to its left; storage, config, ray_env and metrics are
shared by all. Nothing here imports tune, serve or repforge.
"""
