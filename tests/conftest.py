"""Test-wide settings: nothing touches the network or a display."""

from __future__ import annotations

import os

# W&B and Hugging Face stay offline; matplotlib draws to files only.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
