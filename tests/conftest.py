import os
import sys
from pathlib import Path

import pytest
import torch

# Tests import helpers that live beside them (e.g. published_reference.py).
sys.path.insert(0, str(Path(__file__).parent))
# Nothing in the tests may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _fresh_seed():
    torch.manual_seed(0)
    yield
