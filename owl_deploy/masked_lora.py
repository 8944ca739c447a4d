"""Masked LoRA: a low-rank update confined to the weights pruning kept, so training sees the function that deploys.

Plain LoRA trains ``W + s·BA``; the merge then zeroes ``BA`` where pruning removed a weight, so the model that
deploys (``W + s·BA ⊙ keep``) is not the one that was trained (issue 16: on the 1.5B model at 50% the adapter
model scored 19.88 and its merged, re-masked self 19.34 — different functions). Here the weight *is*
``W + s·(BA ⊙ keep)`` from the first step (a ``torch.nn.utils.parametrize`` parametrization of each block linear),
so the adapters learn only what survives the mask and the merge changes no number.

Cost: the update is a full-size matrix per linear, so its gradient is one more weight-sized product per linear per
step than LoRA's, and the bf16 effective weights are kept for the backward pass (two bytes per block weight) beside
the masks (one byte).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from owl_deploy.model import named_block_linears


class MaskedLowRank(nn.Module):
    """``weight -> weight + scale·(B @ A)`` where ``keep``, ``weight`` elsewhere (there it is zero: pruned).

    Under bf16 autocast the frozen weight enters as its bf16 rounding whatever it is stored in, so keeping it in
    bf16 while training (owl_deploy.recover.lean) changes no number."""

    def __init__(self, keep: torch.Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        out_features, in_features = keep.shape
        self.register_buffer("keep", keep, persistent=False)
        self.scale = alpha / rank
        # PEFT's initialisation: A Kaiming-uniform, B zero, so training starts from the pruned model itself
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        return torch.where(self.keep, (self.lora_B @ self.lora_A) * self.scale, 0.0)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
            # a bf16 sum (computed in fp32, rounded once): what autocast would make of the fp32 sum, without the
            # two full-size fp32 temporaries
            return weight.to(torch.bfloat16) + self.delta().to(torch.bfloat16)
        return weight + self.delta()


def add_masked_adapters(model: nn.Module, masks: dict[str, torch.Tensor], rank: int, alpha: float) -> dict:
    """Parametrize every block linear's weight (``masks``: True = pruned, by module name); returns the adapters'
    parameters by name."""
    for name, lin in named_block_linears(model).items():
        parametrize.register_parametrization(lin, "weight", MaskedLowRank(~masks[name], rank, alpha))
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def masked_linears(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if parametrize.is_parametrized(m, "weight")
            and isinstance(m.parametrizations.weight[0], MaskedLowRank)]  # fmt: skip


@torch.no_grad()
def merge_masked(model: nn.Module) -> nn.Module:
    """Fold each update into its weight (fp32: outside autocast) and drop the parametrizations."""
    with torch.autocast("cpu", enabled=False):
        for lin in masked_linears(model):
            parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
    return model
