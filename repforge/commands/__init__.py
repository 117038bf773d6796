"""The `repforge` jobs, one module per command group; each has `register(commands) -> {name: handler}`.

A handler takes the parsed arguments and returns the URI of what the job wrote (the last
line the CLI prints).
"""
