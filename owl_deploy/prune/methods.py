"""The registry of pruning methods: what each needs from calibration and how it prunes one linear.

Each entry adapts one pure per-layer function (``magnitude.py``, ``wanda.py``, ``sparsegpt.py``) to an
``nn.Linear`` in place. A new method is a pure function beside those and one entry here (and its name
in ``configs.METHODS``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from owl_deploy.calibrate import LayerStats
from owl_deploy.configs import METHODS as METHOD_NAMES
from owl_deploy.prune.magnitude import magnitude_mask
from owl_deploy.prune.sparsegpt import sparsegpt_prune
from owl_deploy.prune.wanda import wanda_mask

NM = tuple[int, int]


def _prune_magnitude(linear: nn.Linear, stats: LayerStats | None, sparsity: float, nm: NM | None) -> None:
    linear.weight.data[magnitude_mask(linear.weight, sparsity, nm)] = 0


def _prune_wanda(linear: nn.Linear, stats: LayerStats | None, sparsity: float, nm: NM | None) -> None:
    assert stats is not None
    linear.weight.data[wanda_mask(linear.weight, stats.sq_norm, sparsity, nm)] = 0


def _prune_sparsegpt(linear: nn.Linear, stats: LayerStats | None, sparsity: float, nm: NM | None) -> None:
    assert stats is not None
    linear.weight.data.copy_(sparsegpt_prune(linear.weight, stats.hessian, sparsity, nm))


@dataclass(frozen=True)
class Method:
    """A pruning method: what it needs from calibration and how it prunes one linear in place."""

    name: str
    needs_calibration: bool
    needs_hessian: bool
    prune: Callable[[nn.Linear, LayerStats | None, float, NM | None], None]


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("magnitude", needs_calibration=False, needs_hessian=False, prune=_prune_magnitude),
        Method("wanda", needs_calibration=True, needs_hessian=False, prune=_prune_wanda),
        Method("sparsegpt", needs_calibration=True, needs_hessian=True, prune=_prune_sparsegpt),
    )
}
if tuple(METHODS) != METHOD_NAMES:  # the config's choices are this registry's names
    raise ImportError(f"configs.METHODS {METHOD_NAMES} and the registry {tuple(METHODS)} differ")
