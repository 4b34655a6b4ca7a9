"""fusionkit: fuse any number of modalities with weights chosen per sample.

Public API::

    from fusionkit import DMSFusion, build, register, registry
"""

__version__ = "0.1.0"

from fusionkit.fusions.base import Fusion, FusionOutput  # noqa: E402
from fusionkit.fusions.dms import DMSFusion  # noqa: E402
from fusionkit.registry import build, register, registry  # noqa: E402

__all__ = ["DMSFusion", "Fusion", "FusionOutput", "build", "register", "registry", "__version__"]
