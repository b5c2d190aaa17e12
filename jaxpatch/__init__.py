"""jaxpatch: activation patching as compiled, vectorised JAX programs.

The public API, re-exported here; everything else is internal.
"""

from . import compile_cache as compile_cache; compile_cache.setup()  # noqa: E702  (persistent XLA cache; see compile_cache.py)
from . import precision as precision; precision.ensure_full_float32()  # noqa: E702  (float32 matmuls stay float32 on GPU/TPU)
from ._errors import (
    CheckpointError as CheckpointError,
    InputError as InputError,
    JaxpatchError as JaxpatchError,
    NonFiniteError as NonFiniteError,
    UnknownSiteError as UnknownSiteError,
    UnsupportedArchitectureError as UnsupportedArchitectureError,
)
from .cache import ActivationCache as ActivationCache
from .config import ModelConfig as ModelConfig
from .interventions import (
    Edit as Edit,
    Interventions as Interventions,
    add as add,
    combine as combine,
    edit as edit,
    replace as replace,
    zero as zero,
)
from .loading import load_pretrained as load_pretrained, save_pretrained as save_pretrained
from .model import HookedModel as HookedModel
from .sites import SITES as SITES, parse as parse_site  # noqa: F401  (public: parse a full site name)

__version__ = "0.1.0"
from . import metrics as metrics, sweep as sweep  # noqa: E402
from .patching import activation_patch as activation_patch  # noqa: E402
from .results import PatchResult as PatchResult  # noqa: E402
from .attribution import attribution_patch as attribution_patch  # noqa: E402
from . import compare as compare, edges as edges  # noqa: E402
from . import byo as byo  # noqa: E402  (bring your own Flax / Equinox / plain-JAX model)
from .byo import Patchable as Patchable, patchable as patchable, scan as scan, site as site  # noqa: E402
from . import circuits as circuits  # noqa: E402
from .circuits import evaluate_circuit as evaluate_circuit, path_patch as path_patch  # noqa: E402
from .reporting import Report as Report, report as report  # noqa: E402
from . import partitioning as partitioning  # noqa: E402  (sharded parameters on a ("sweep", "model") mesh)
