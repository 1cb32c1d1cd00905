"""Benchmarks, each a script: ``python -m benchmarks.<name>`` from the checkout (``make bench``, ``make bench-e2e``).

They import the node and the real-peer harness (`peers`) as packages, never ``tests/``.
"""
