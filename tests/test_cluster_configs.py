"""DeepSpeed ZeRO templates (cluster/configs/zero{0,1,2,3}.json) and cluster.deepspeed_config.

Every shipped template must parse, be the stage its name says, and give a config that DeepSpeed's own
parser (`DeepSpeedConfig`, the one `deepspeed.initialize` uses) accepts with the batch geometry we set.
No process group, no engine: fast.
"""

import json

import pytest

from cluster.deepspeed_config import CONFIG_DIR, ZERO_STAGES, deepspeed_config, load_template


def test_every_stage_has_a_template_and_nothing_else_is_shipped():
    assert sorted(p.name for p in CONFIG_DIR.glob("*.json")) == [f"zero{s}.json" for s in ZERO_STAGES]


@pytest.mark.parametrize("stage", ZERO_STAGES)
def test_template_parses_with_required_fields(stage):
    raw = json.loads((CONFIG_DIR / f"zero{stage}.json").read_text())
    assert raw["zero_optimization"]["stage"] == stage
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "bf16"):
        assert key in raw, key
    assert raw["zero_allow_untested_optimizer"] is True  # the lead may pass any torch optimizer


@pytest.mark.parametrize("stage", ZERO_STAGES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deepspeed_accepts_the_config(stage, precision):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = deepspeed_config(stage, micro_batch_per_rank=4, grad_accum_steps=3, grad_clip=1.0,
                           precision=precision, world_size=1)
    parsed = DeepSpeedConfig(cfg)  # no process group: DeepSpeed takes world size 1
    assert parsed.train_batch_size == 12
    assert parsed.train_micro_batch_size_per_gpu == 4
    assert parsed.gradient_accumulation_steps == 3
    assert parsed.gradient_clipping == 1.0
    assert parsed.zero_optimization_stage == stage
    assert parsed.bfloat16_config.enabled == (precision == "bf16")


def test_global_batch_counts_every_rank():
    cfg = deepspeed_config(2, micro_batch_per_rank=4, grad_accum_steps=2, grad_clip=None, precision="fp32",
                           world_size=8, on_gpu=True)
    assert cfg["train_batch_size"] == 64
    assert cfg["gradient_clipping"] == 0.0
    assert cfg["zero_optimization"]["overlap_comm"] is True
    assert load_template(2)["zero_optimization"]["overlap_comm"] is False  # the template is not mutated


@pytest.mark.parametrize("kwargs, match", [
    ({"zero_stage": 4}, "zero_stage"),
    ({"micro_batch_per_rank": 0}, "micro_batch_per_rank"),
    ({"precision": "fp16"}, "precision"),
])
def test_invalid_arguments_raise_value_error(kwargs, match):
    args = {"zero_stage": 1, "micro_batch_per_rank": 1, "grad_accum_steps": 1, "grad_clip": 1.0,
            "precision": "fp32", "world_size": 1} | kwargs
    with pytest.raises(ValueError, match=match):
        deepspeed_config(**args)
