"""`peer-sweeps eval`: score a finished trial again from its final checkpoint, a user's check of any number
in a report.

The model is rebuilt from the trial's `config.json` and loaded from the module weights DeepSpeed saved at
the trial's last step (`trials/<id>/checkpoint_step<steps>_*/engine/`; ZeRO-3 shards are gathered by
DeepSpeed's zero_to_fp32). By default every evaluation set is scored as the trial scored it: the same
tokens (`evaluation_sample` with the study's data.eval_tokens) in batches of the same size (MoE's expert
choice depends on the batch), so the numbers agree with trials.parquet up to float summation order on the
same kind of device. `tokens` overrides the sample size ("all": the whole split).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .plan import Trial
from .results import ResultsDirError
from .trial import CONFIG_FILE, eval_batch_size, evaluate_sets, evaluation_sets, trial_dir

ENGINE_TAG = "engine"  # cluster.checkpointing's tag (not imported: that module needs a Ray Train worker)


def reevaluate(results_dir: str | Path, trial_id: str, set_name: str | None = None,
               tokens: int | str | None = None) -> dict[str, dict[str, float]]:
    """{set: {"ppl", "bpb", "tokens"}} for every evaluation set (or only `set_name`), primary first."""
    import torch

    from model import build_model

    from .data import default_root, load_suite

    trial = _finished_trial(Path(results_dir), trial_id)
    data = load_suite(trial.data["suite"], trial.data["root"] or default_root(), trial.data["vocab_size"])
    if set_name is not None and set_name not in data.eval_sets:
        raise ResultsDirError(f"--set: {set_name!r} is not an evaluation set of suite {data.name!r} "
                              f"({', '.join(data.eval_sets)})")
    model = build_model(trial.model_config)
    model.load_state_dict(_final_weights(Path(results_dir), trial))
    sets = evaluation_sets(data, trial.data["eval_tokens"] if tokens is None else tokens, trial.seq_len)
    if set_name is not None:
        sets = {set_name: sets[set_name]}
    too_short = [name for name, scored in sets.items() if len(scored) < trial.seq_len + 1]
    if too_short:
        raise ResultsDirError(f"--tokens: {tokens} tokens are fewer than one window of seq_len + 1 = "
                              f"{trial.seq_len + 1} tokens")
    with torch.no_grad():
        out = evaluate_sets(model, sets, data, trial.seq_len, eval_batch_size(trial), "cpu")
    return {name: {"ppl": out[f"ppl_{name}"], "bpb": out[f"bpb_{name}"], "tokens": out[f"eval_tokens_{name}"]}
            for name in sets}


def _finished_trial(results_dir: Path, trial_id: str) -> Trial:
    import json

    if not results_dir.is_dir():
        raise ResultsDirError(f"{results_dir}: {'not a directory' if results_dir.exists() else 'no such'} "
                              "results directory")
    config = trial_dir(results_dir, trial_id) / CONFIG_FILE
    if not trial_id or "/" in trial_id or not config.is_file():
        raise ResultsDirError(f"{results_dir}: no trial {trial_id!r} (trials/{trial_id}/{CONFIG_FILE} is missing)")
    return Trial.from_json(json.loads(config.read_text()))


def _final_weights(results_dir: Path, trial: Trial) -> dict[str, Any]:
    import torch

    directory = trial_dir(results_dir, trial.trial_id)
    finals = sorted(directory.glob(f"checkpoint_step{trial.steps:08d}_*/{ENGINE_TAG}"))
    if not finals:
        raise ResultsDirError(f"{results_dir}: trial {trial.trial_id} has no final checkpoint (step {trial.steps}):"
                              " it has not finished")
    engine_dir = finals[-1]
    if trial.training["zero_stage"] == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(engine_dir.parent), tag=ENGINE_TAG)
    states = torch.load(engine_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in states["module"].items()}
