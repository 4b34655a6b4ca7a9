"""An example fusionkit plugin: one scorer and one fusion, registered on import.

Installed, it is found through the ``fusionkit.plugins`` entry point; otherwise load it with
``fusionkit --plugins fusionkit_example_plugin ...`` (or the path of this file).
"""

from fusionkit_example_plugin.margin import MarginScorer
from fusionkit_example_plugin.top1 import Top1Fusion

__all__ = ["MarginScorer", "Top1Fusion"]
