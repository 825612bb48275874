"""Shared test set-up: the helpers beside this file (tiny models, tokenizer, workers) import from any
test folder, and Triton kernels run in the interpreter when there is no GPU (before triton imports)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
