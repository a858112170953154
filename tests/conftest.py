"""Shared test setup."""

import torch

# The tests run tiny tensors: one intra-op thread avoids OpenMP barrier costs that dominate at
# these sizes (and on a loaded 2-core machine make a batch norm 70x slower).
torch.set_num_threads(1)
