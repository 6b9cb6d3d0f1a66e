import os

# Triton reads this flag when kernels are decorated: set it before any d2c import.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Never more torch threads than cores (DESIGN.md section 6: oversubscription is 3-10x slower).
# D2C_TEST_THREADS sets another count: float reductions split differently across threads, and
# the suite must hold for any count (`make test-numerics` runs it with 1).
torch.set_num_threads(int(os.environ.get("D2C_TEST_THREADS") or max(1, min(2, os.cpu_count() or 1))))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
