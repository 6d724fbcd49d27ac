"Gated Linear Attention of flash-linear-attention in pure PyTorch."
__version__ = "0.1.0"

from .utils import *
from .testing import (DEFAULT_RATIO, assert_close, check_devices, check_dtypes, fla_available, get_abs_err,
                      get_err_ratio, random_gla_inputs)
from .ops.recurrent import *
from .ops.chunk import *
from .modules.convolution import *
from .modules.norms import *
from .cache import *
from .layers.gla import *
from .models.gla import *
from .ops.cp import FLACPContext, build_cp_context
