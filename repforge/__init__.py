"""The entry point: the `repforge` command line (cli.py, `python -m repforge`) and the quickstart.

The only package that imports system, tune and serve together.
"""
