"Gated Linear Attention of flash-linear-attention in pure PyTorch."
__version__ = "0.1.0"

# `python -m myfla_gla[.bench]`: --help printed, and the benchmark's OpenMP settings made, before torch is imported
from .cli import before_torch as _before_torch
_before_torch()

from .utils import *
from .ops.recurrent import *
from .ops.chunk import *
from .modules.convolution import *
from .modules.norms import *
from .modules.rotary import *
from .cache import *
from .layers.gla import *
from .layers.attn import *
from .models.gla import *
from .layers.hgrn2 import *
from .models.hgrn2 import *
from .ops.cp import FLACPContext, build_cp_context
# the harness last: it imports the library (`testing` sits above it)
from .testing import check_devices, check_dtypes, fla_available, random_gla_inputs
