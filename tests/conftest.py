import os

# Triton reads this flag when kernels are decorated: set it before any d2c import.
os.environ.setdefault("TRITON_INTERPRET", "1")

import tempfile  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# torch.compile's on-disk cache (default /tmp/torchinductor_<user>) reuses kernels built for
# another vector ISA after ATEN_CPU_CAPABILITY changes: measured here, compiled samples turned
# NaN under avx2 after an AVX-512 run, and matched eager with a fresh cache.  One cache per
# capability keeps the suite right under every variant.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"torchinductor_d2c_tests_{torch.backends.cpu.get_cpu_capability().lower()}"))

# Never more torch threads than cores (docs/design.md section 6: oversubscription is 3-10x slower).
# D2C_TEST_THREADS sets another count: float reductions split differently across threads, and
# the suite must hold for any count (`make test-numerics` runs it with 1).
torch.set_num_threads(int(os.environ.get("D2C_TEST_THREADS") or max(1, min(2, os.cpu_count() or 1))))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
