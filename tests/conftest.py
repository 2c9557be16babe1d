"""Without a GPU, Triton kernels run through Triton's interpreter; it must be chosen before triton is
first imported, by whichever test module comes first."""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))
