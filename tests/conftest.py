"""Shared test setup: keep torch to two threads."""

import torch

torch.set_num_threads(2)
