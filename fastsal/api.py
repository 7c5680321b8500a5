"""The attribution API in one place: what ``import fastsal`` exports from it."""

from fastsal import viz
from fastsal.attribution import (
    Deconvolution,
    GuidedBackprop,
    NeuronDeconvolution,
    NeuronGradient,
    NeuronGuidedBackprop,
    Saliency,
)
from fastsal.explainer import Explainer, Explanation
from fastsal.features import visualize_feature
from fastsal.saliency import saliency

__all__ = [
    "Saliency",
    "Deconvolution",
    "GuidedBackprop",
    "NeuronGradient",
    "NeuronDeconvolution",
    "NeuronGuidedBackprop",
    "saliency",
    "Explainer",
    "Explanation",
    "visualize_feature",
    "viz",
]
