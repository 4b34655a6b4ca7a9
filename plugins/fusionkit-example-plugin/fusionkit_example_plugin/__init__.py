"""An example fusionkit plugin: one scorer, one fusion and one training strategy, registered on import.

Installed, it is found through the ``fusionkit.plugins`` entry point; otherwise load it with
``fusionkit --plugins fusionkit_example_plugin ...`` (or the path of this file).
"""

from fusionkit_example_plugin.logit_penalty import LogitPenalty
from fusionkit_example_plugin.margin import MarginScorer
from fusionkit_example_plugin.top1 import Top1Fusion

__all__ = ["LogitPenalty", "MarginScorer", "Top1Fusion"]
