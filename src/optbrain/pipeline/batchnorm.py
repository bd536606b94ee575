"""Batch-norm re-calibration: re-estimate running statistics after the weights changed.

Every ``_BatchNorm`` module with ``track_running_stats`` gets its running statistics reset and
re-estimated as a cumulative average over the calibration batches (``momentum=None``)::

    running_mean = (1/B) Σ_b mean_b          running_var = (1/B) Σ_b var_b (unbiased)

with ``mean_b`` / ``var_b`` the per-channel statistics of batch ``b`` (PyTorch's train-mode
semantics: each batch weighs the same whatever its size, and during the pass every batch norm
normalises with the current batch's statistics). Only the batch norms are in train mode;
dropout and the rest stay in eval mode (``calibration_mode``). Momenta and modes are restored
afterwards; if anything fails, the old running statistics are put back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .data import Forward, calibration_mode, check_inputs_option, forward_batches


def recalibrate_batchnorm(
    model: nn.Module,
    calibration: Any,
    forward: Forward | None = None,
    *,
    inputs: str = "all",
) -> int:
    """Re-estimate the running statistics of every batch norm in ``model``; returns how many.

    calibration / forward / inputs: the batch convention of ``optbrain.pipeline.data``.
    Raises ``ValueError`` on empty calibration and ``CalibrationError`` naming the batch
    when a forward fails; in both cases the statistics are left as they were.
    """
    check_inputs_option(inputs)
    bns = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not bns:
        return 0
    saved = [
        (
            m,
            m.momentum,
            m.running_mean.clone(),
            m.running_var.clone(),
            m.num_batches_tracked.clone(),
        )
        for m in bns
    ]
    ok = False
    try:
        with calibration_mode(model):  # eval mode and no grad, modes restored on exit
            for m in bns:
                m.reset_running_stats()
                m.momentum = None
                m.train()
            forward_batches(model, calibration, forward, inputs)
        ok = True
    finally:
        for m, momentum, mean, var, nbt in saved:
            m.momentum = momentum
            if not ok:
                with torch.no_grad():
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
                    m.num_batches_tracked.copy_(nbt)
    return len(bns)
