"""Repository tooling run from the repository root (`python -m scripts.<...>`); not installed.

A regular package (not a namespace package) so that `python -m scripts.demo.train` from the
root finds this folder even when some installed distribution ships a top-level `scripts`."""
