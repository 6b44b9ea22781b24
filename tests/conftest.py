import os

# aqlm's numba CPU kernel races across threads and gives wrong numbers; pin it to one thread
# before numba is imported anywhere (tests that run aqlm's own layer rely on this).
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
