"""Benchmarks of lightning-adamw: what the monitor and the grouping cost, next to the alternatives.

``python -m benchmarks`` runs the CPU set (under ten minutes on 2 cores), prints a table and rewrites
``benchmarks/RESULTS.md``. ``python -m benchmarks.gpu`` is the GPU set (run on a CUDA machine; it writes a
JSON file that ``python -m benchmarks --merge-gpu FILE`` folds into RESULTS.md).

This package imports nothing heavy at import time, so ``python -m benchmarks.gpu`` works on a machine that has
torch and lightning but neither jsonargparse nor wandb.
"""
