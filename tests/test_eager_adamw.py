"""EagerAdamW is torch.optim.AdamW to the bit, and never imports torch._dynamo."""

import copy
import subprocess
import sys

import torch

from cluster.eager_adamw import EagerAdamW


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))


def _groups(model: torch.nn.Module) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]


def _train(optimizer_cls, steps: int, state: dict | None = None):
    model = _model(0)
    opt = optimizer_cls(_groups(model), lr=3e-2, betas=(0.9, 0.95), eps=1e-8)
    if state is not None:
        state = copy.deepcopy(state)  # loading shares the tensors, and training would change the caller's
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def test_updates_and_state_equal_torch_adamw_bit_for_bit():
    eager, eager_opt = _train(EagerAdamW, 5)
    reference, reference_opt = _train(torch.optim.AdamW, 5)
    for a, b in zip(eager.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    eager_state, reference_state = eager_opt.state_dict(), reference_opt.state_dict()
    assert eager_state["param_groups"] == reference_state["param_groups"]
    for key, value in reference_state["state"].items():
        for name, tensor in value.items():
            assert torch.equal(eager_state["state"][key][name], tensor), (key, name)


def test_resumes_from_a_torch_adamw_state_dict():
    reference, reference_opt = _train(torch.optim.AdamW, 3)
    state = {"model": reference.state_dict(), "optimizer": reference_opt.state_dict()}
    resumed, _ = _train(EagerAdamW, 2, state)
    continued, _ = _train(torch.optim.AdamW, 2, state)
    for a, b in zip(resumed.parameters(), continued.parameters()):
        assert torch.equal(a, b)


def test_never_imports_torch_dynamo():
    script = (
        "import sys, torch\n"
        "from cluster.eager_adamw import EagerAdamW\n"
        "m = torch.nn.Linear(4, 2)\n"
        "opt = EagerAdamW(m.parameters(), lr=0.1)\n"
        "m(torch.randn(3, 4)).sum().backward(); opt.step(); opt.zero_grad()\n"
        "opt.load_state_dict(opt.state_dict())\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
