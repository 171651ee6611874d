"""Ray Train + DeepSpeed runtime (cluster/) on a toy loop: multi-rank worker death, errors, nested sessions.

All jobs run cluster.smoke's MLP regression loop on one embedded Ray instance (2 CPUs). The reference is an
uninterrupted 1-worker ZeRO-2 run. 2 workers where rank 1 SIGKILLs itself after step 3 (checkpoint at step
2): Ray Train restarts the group, the job continues from step 2 with both ranks' ZeRO shards, and the curve
matches the reference to 1e-4. (Data parallelism and resume with the real model: tests/test_trial.py.)
"""

import math

import pytest

ray = pytest.importorskip("ray")

from cluster.runtime import current_node_id, ray_session  # noqa: E402
from cluster.smoke import mlp_regression_loop  # noqa: E402
from cluster.train_job import TrainJobError, run_train_job  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STEPS = 6
LOOP = {"steps": STEPS, "global_batch": 8, "zero_stage": 2, "seed": 3, "lr": 2e-2, "grad_clip": 0.5}


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    with ray_session(None, num_cpus=2, storage_path=tmp_path_factory.mktemp("ray-storage")) as s:
        yield s


@pytest.fixture(scope="module")
def reference(session):
    """Uninterrupted 1-worker run."""
    result = run_train_job(mlp_regression_loop, LOOP, run_name="reference", storage_path=session.storage_path,
                           num_workers=1)
    return result.return_value


def assert_same_losses(got: dict, want: dict, steps=range(STEPS)):
    for step in steps:
        assert math.isclose(got[step], want[step], rel_tol=1e-4), (step, got[step], want[step])


def test_sigkilled_worker_restarts_from_checkpoint(session, reference, tmp_path):
    marker = tmp_path / "killed"
    loop = {**LOOP, "checkpoint_every": 2, "kill_at_step": 3, "kill_rank": 1, "kill_marker": str(marker),
            "kill_delay_s": 1.0}
    result = run_train_job(mlp_regression_loop, loop, run_name="sigkill", storage_path=session.storage_path,
                           num_workers=2, max_failures=1)
    assert marker.exists()  # the first attempt did die
    got = result.return_value
    assert got["start_step"] == 2  # the second attempt started from the step-2 checkpoint, not from 0
    assert_same_losses(got["losses"], reference["losses"])


def test_worker_error_is_raised_with_its_message(session):
    with pytest.raises(TrainJobError) as info:
        run_train_job(mlp_regression_loop, {**LOOP, "raise_at_step": 1}, run_name="raises",
                      storage_path=session.storage_path, num_workers=1, max_failures=0)
    assert "injected failure at step 1 on rank 0" in str(info.value)
    assert "injected failure" in info.value.worker_errors[0]


def test_error_that_will_recur_fails_the_job_without_retries(session, tmp_path):
    """A ValueError on every rank (as a TypeError or a dtype mismatch would) is the job's own code: with
    max_failures=2 Ray Train would start the group three times; the job fails after the first."""
    attempts = tmp_path / "attempts"
    with pytest.raises(TrainJobError) as info:
        run_train_job(mlp_regression_loop, {**LOOP, "raise_at_step": 1, "attempts_file": str(attempts)},
                      run_name="recurs", storage_path=session.storage_path, num_workers=1, max_failures=2)
    assert attempts.read_text().count("start") == 1
    assert "ValueError: injected failure at step 1 on rank 0" in info.value.worker_errors[0]


def test_nested_session_reuses_ray_and_leaves_it_running(session, tmp_path):
    with ray_session("auto", storage_path=tmp_path / "runs") as inner:
        assert not inner.owns_cluster and inner.num_cpus == 2
        assert inner.storage_path == str((tmp_path / "runs").resolve())
    assert ray.is_initialized()
