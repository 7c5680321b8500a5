"""``fastsal.evaluate``: sanity checks, localization and faithfulness metrics for saliency maps."""

from fastsal.evaluate.faithfulness import CurveResult, auc, deletion_insertion
from fastsal.evaluate.localization import (
    BoxIoUResult,
    MassResult,
    PointingResult,
    mass_in_box,
    pointing_game,
    pointing_game_maps,
    weak_box_iou,
)
from fastsal.evaluate.randomization import SanityResult, data_randomization, mprt, random_logit
from fastsal.evaluate.similarity import SIMILARITIES, compare
