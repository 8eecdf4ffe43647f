import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: model.py, data.py, stages


import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():  # tiny tensors: a second intra-op thread only adds overhead on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
