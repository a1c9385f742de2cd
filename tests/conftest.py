"""Test setup: Triton runs in interpreter mode where there is no GPU (set before anything imports triton)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
