"""Shared fixtures: a prepared copy of the tiny `fixture` data suite, and small study files.

`small_study(path, **sections)` writes a study of dense d16 L1 trials on that data (one trial per budget,
a few dozen steps each, one evaluation, one checkpoint, no W&B, no worker retries): the cheapest real
study, for tests that run trials. `sections` replace or extend the YAML sections (`training={...}` is
merged into the default training section; `design=...` replaces it).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

VOCAB_SIZE = 512


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A data root holding the `fixture` suite prepared with a 512-token vocabulary (0.1 s)."""
    from peer_sweeps.data import prepare_suite

    root = tmp_path_factory.mktemp("data")
    prepare_suite("fixture", root, VOCAB_SIZE)
    return root


def study_dict(data_root: Path, budgets=(1.0e9, 2.0e9), **sections) -> dict:
    study = {
        "name": "tiny",
        "data": {"suite": "fixture", "vocab_size": VOCAB_SIZE, "root": str(data_root)},
        "training": {"seq_len": 32, "batch_tokens": 256, "lr": 3.0e-3, "evals": 1, "checkpoints": 1,
                     "zero_stage": 2, "max_failures": 0},
        "model": {"head_dim": 16},
        "methods": {"dense": {}},
        "design": {"kind": "isoflop", "budgets": list(budgets), "sizes": [{"d_model": 16, "n_layers": 1}]},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
        "tracking": {"wandb_mode": "disabled"},
    }
    study = copy.deepcopy(study)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(study.get(key), dict) and key != "design":
            study[key] = {**study[key], **value}
        else:
            study[key] = value
    return study


@pytest.fixture
def small_study(data_root):
    def write(path: Path, budgets=(1.0e9, 2.0e9), **sections) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(study_dict(data_root, budgets, **sections), sort_keys=False))
        return path

    return write


@pytest.fixture(scope="module")
def few_bootstraps():
    """Approach 3's starts and bootstrap refits take most of a report's time; a few exercise them in a module
    that asks for this (`pytestmark = pytest.mark.usefixtures("few_bootstraps")`)."""
    from peer_sweeps.report import parametric

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(parametric, "NUM_BOOTSTRAPS", 3)
        mp.setattr(parametric, "NUM_STARTS", 2)
        yield
