"""optbrain._files.batches_sha256: the calibration hash behind the journal, budget database and
offload fingerprints tells apart batches that differ in one value, whatever their container."""

import dataclasses

import numpy as np
import pytest
import torch

from optbrain._files import batches_sha256


@dataclasses.dataclass
class Batch:
    ids: torch.Tensor
    note: str = "x"


def _pairs():
    t = torch.zeros(1, 4000, dtype=torch.long)
    u = t.clone()
    u[0, 2000] = 1
    a = np.zeros(4000)
    b = a.copy()
    b[2000] = 1.0
    return [
        ([t], [u]),
        ([{"input_ids": t}], [{"input_ids": u}]),
        ([(t, t)], [(t, u)]),
        ([Batch(t)], [Batch(u)]),  # repr would truncate the tensor: equal before
        ([a], [b]),  # numpy's repr elides the middle: equal before
        ([t.float()], [t.double()]),  # same values, other dtype
        ([t], [t.view(4000, 1)]),  # same bytes, other shape
    ]


@pytest.mark.parametrize("x, y", _pairs())
def test_one_value_apart_hashes_apart(x, y):
    assert batches_sha256(x) != batches_sha256(y)
    assert batches_sha256(x) == batches_sha256([v for v in x])  # deterministic
