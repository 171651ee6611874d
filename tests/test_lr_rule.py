"""Learning rates that fit each size: the default study gives every size its lr by one rule,
lr = training.lr * (params_backbone / reference_params)^(-1/3), the same for every method at a size."""

from pathlib import Path

import pytest

from peer_sweeps.plan import plan_study
from peer_sweeps.study import StudyError, load_study, parse_study


def test_default_study_lr_falls_with_size_alike_for_every_method():
    study = load_study(Path(__file__).parent.parent / "studies" / "isoflop.yaml")
    rule = study.training.lr_scaling
    assert rule is not None and rule.exponent == pytest.approx(-1 / 3)
    by_size: dict[int, set[float]] = {}
    for trial in plan_study(study):
        expected = study.training.lr * (trial.params_backbone / rule.reference_params) ** rule.exponent
        assert trial.training["lr"] == pytest.approx(expected, rel=5e-3)
        by_size.setdefault(trial.params_backbone, set()).add(trial.training["lr"])
    assert all(len(lrs) == 1 for lrs in by_size.values()), by_size  # one lr per size, whatever the method
    lrs = [next(iter(by_size[n])) for n in sorted(by_size)]
    assert lrs == sorted(lrs, reverse=True) and len(set(lrs)) == len(lrs)
    # The largest size trains at well under the shared 1e-2 that collapsed the largest sizes (LOG.md).
    assert lrs[-1] < 0.8e-2


def test_lr_scaling_is_checked():
    raw = {"name": "x", "methods": {"dense": {}}, "training": {"lr_scaling": {"reference_params": 100, "exponent": 1}},
           "design": {"kind": "isoflop", "budgets": [1e12], "sizes": [{"d_model": 64, "n_layers": 2}]}}
    with pytest.raises(StudyError, match="training.lr_scaling.exponent"):
        parse_study(raw)
