"""Adding and removing a seed's parameters from a live optimizer."""

from __future__ import annotations

from torch import nn
from torch.optim import Optimizer

__all__ = ("add_module_params", "remove_module_params")


def add_module_params(optimizer: Optimizer, module: nn.Module) -> None:
    """Give ``module``'s trainable parameters to ``optimizer`` as a new parameter group.

    The group inherits the defaults of the first group (learning rate, betas, weight decay).
    """
    params = [p for p in module.parameters() if p.requires_grad]
    if params:
        base = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        optimizer.add_param_group({**base, "params": params})


def remove_module_params(optimizer: Optimizer, module: nn.Module) -> None:
    """Take ``module``'s parameters and their state (moments) out of ``optimizer``."""
    ids = {id(p) for p in module.parameters()}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    for p in list(optimizer.state):
        if id(p) in ids:
            del optimizer.state[p]
