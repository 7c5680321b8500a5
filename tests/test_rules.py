import pytest
import torch

import fastsal
from fastsal.rules import Rule, apply_rule, as_rule


def test_rule_values_and_strings():
    assert [r.value for r in Rule] == ["gradient", "deconvnet", "guided"]
    assert as_rule("guided") is Rule.GUIDED
    assert as_rule("Guided-Backprop") is Rule.GUIDED
    assert as_rule(Rule.DECONVNET) is Rule.DECONVNET
    assert Rule.GUIDED == "guided" and str(Rule.GRADIENT) == "gradient"
    assert fastsal.Rule is Rule


@pytest.mark.parametrize("bad", ["smoothgrad", "", None, 3])
def test_unknown_rule_lists_the_valid_ones(bad):
    with pytest.raises(ValueError, match="'gradient', 'deconvnet', 'guided'"):
        as_rule(bad)


def test_apply_rule_formulas():
    f = torch.tensor([1.0, 1.0, -1.0, -1.0])
    r = torch.tensor([2.0, -2.0, 2.0, -2.0])
    pos = f > 0
    assert apply_rule(r, pos, "gradient").tolist() == [2.0, -2.0, 0.0, 0.0]
    assert apply_rule(r, None, "deconvnet").tolist() == [2.0, 0.0, 2.0, 0.0]
    assert apply_rule(r, pos, "guided").tolist() == [2.0, 0.0, 0.0, 0.0]
