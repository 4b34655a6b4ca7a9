"""Test-time input corruptions (registry kind ``corruptions``), one module per modality kind.

The components are registered in their own modules, which the registry imports on first use
(``fusionkit.registry.CORE_MODULES``); importing this package registers nothing.
"""

from fusionkit.corruptions.base import (
    Corruption,
    CorruptionConfig,
    apply_corruption,
    corruption_rng,
    parse_corruption_spec,
)

__all__ = [
    "Corruption",
    "CorruptionConfig",
    "apply_corruption",
    "corruption_rng",
    "parse_corruption_spec",
]
