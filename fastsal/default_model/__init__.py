"""fastsal's embedded default model (a small CNN) and the synthetic data set it is trained on.

``build_default_model()`` returns it with the shipped weights; ``DEFAULT_PREPROCESS`` says what
input it expects; ``synthetic`` generates (and writes) the data set. See README.md here.
"""

from fastsal.default_model.model import DEFAULT_PREPROCESS, DefaultNet, Preprocess, build_default_model
from fastsal.default_model.synthetic import CLASS_NAMES, NUM_CLASSES

__all__ = ["CLASS_NAMES", "DEFAULT_PREPROCESS", "DefaultNet", "NUM_CLASSES", "Preprocess", "build_default_model"]
