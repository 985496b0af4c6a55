"""pytest-benchmark suite: ``pytest benchmarks --benchmark-only`` (not part of CI's tests/)."""

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402

# One intra-op thread: on the 2-core CI machine two threads gave 10-20x
# outliers (measured); one thread gives stable medians.
torch.set_num_threads(1)
