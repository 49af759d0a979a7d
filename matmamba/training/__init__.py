"""Training MatMamba models with Lightning: modules that train the nested widths jointly,
data modules, callbacks, and the run pipeline behind ``train.py`` (configured by Hydra, ``conf/``).

Nothing here is imported by ``matmamba`` itself: the library stays free of Lightning and Hydra.
"""

from matmamba.training.modules import LanguageModelModule, NestedWidthModule, VisionClassificationModule

__all__ = ["LanguageModelModule", "NestedWidthModule", "VisionClassificationModule"]
