"""Regenerates the golden values that the tests compare against (tests/golden/), after a deliberate change
of the computation; review the diff before committing it. The tests themselves never write them.

    make golden                                   # all of them
    python tests/update_golden.py [loss_curves] [evaluation] [trial]

`trial` starts a local Ray instance and trains the smoke study's dense trial (about a minute).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]


def _write(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path}")


def loss_curves(data_root: Path) -> None:
    from test_model_golden import CONFIGS, LOSS_CURVES, train_curve

    _write(LOSS_CURVES, {name: train_curve(cfg) for name, cfg in CONFIGS.items()})


def evaluation(data_root: Path) -> None:
    from test_model_golden import EVALUATION, evaluation_figures

    _write(EVALUATION, evaluation_figures(data_root))


def trial(data_root: Path) -> None:
    from cluster.runtime import ray_session
    from peer_sweeps.trial import run_trial
    from test_trial import GOLDEN_TRIAL, golden_figures, golden_trial

    planned = golden_trial(data_root)
    with tempfile.TemporaryDirectory() as tmp, ray_session(None, num_cpus=2, storage_path=tmp):
        row = run_trial(planned, Path(tmp) / "out", "disabled", data_root=data_root)
        assert row["status"] == "completed", row["error"]
        _write(GOLDEN_TRIAL, golden_figures(planned, row, Path(tmp) / "out"))


UPDATES = {"loss_curves": loss_curves, "evaluation": evaluation, "trial": trial}


def main(names: list[str]) -> int:
    unknown = [name for name in names if name not in UPDATES]
    if unknown:
        print(f"update_golden: unknown {', '.join(unknown)}; choose from {', '.join(UPDATES)}", file=sys.stderr)
        return 2
    from conftest import VOCAB_SIZE
    from peer_sweeps.data import prepare_suite

    with tempfile.TemporaryDirectory() as root:  # the fixture suite, as the tests' data_root fixture has it
        prepare_suite("fixture", root, VOCAB_SIZE)
        for name in names or UPDATES:
            UPDATES[name](Path(root))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
