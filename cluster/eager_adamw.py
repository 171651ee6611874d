"""`EagerAdamW`: torch.optim.AdamW without its import of torch._dynamo.

torch's optimizers import torch._dynamo (about 1.5 s of CPU here) on their first `add_param_group` and
`step`, only so that torch.compile can leave them untraced. Nothing in a trial compiles, and every trial's
worker is a fresh process, so a sweep pays that second and a half once per trial. `EagerAdamW` runs
torch's own methods from under those decorators: the same update and the same state dict
(tests/test_eager_adamw.py checks both against torch.optim.AdamW, bit for bit). Under torch.compile use
torch.optim.AdamW instead: these methods would be traced like any other code.
"""

import inspect

import torch

_Optimizer = torch.optim.Optimizer
_undecorated = inspect.unwrap  # the function under torch's decorators (functools.wraps keeps it)


class EagerAdamW(torch.optim.AdamW):
    def add_param_group(self, param_group: dict) -> None:
        _undecorated(_Optimizer.add_param_group)(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _undecorated(_Optimizer.zero_grad)(self, set_to_none)

    def state_dict(self) -> dict:
        return _undecorated(_Optimizer.state_dict)(self)

    def load_state_dict(self, state_dict: dict) -> None:
        _undecorated(_Optimizer.load_state_dict)(self, state_dict)

    def step(self, closure=None):
        # what torch's decorator does around the update, less its graph breaks
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            return _undecorated(torch.optim.Adam.step)(self, closure)
