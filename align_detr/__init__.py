"""align-detr: Align-DETR and SD-DETR on a DINO-style deformable DETR, for detectron2.

Importing the package loads the compiled ops and registers the meta-architecture, backbones
and datasets with detectron2.
"""

from . import _ext  # loads align_detr._C and registers fake kernels / autograd
from . import layers  # noqa: F401
from . import matching  # noqa: F401
from . import modeling  # noqa: F401  (registers AlignDETR)
from . import data, engine  # noqa: F401
from .config import add_align_detr_config  # noqa: F401

__version__ = "0.1.0"
