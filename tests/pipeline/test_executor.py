"""Executors: the option's validation (no Ray needed), then a local Ray head on 127.0.0.1 with 2
workers: the same weights, report, database and allocation as the local executor, and a worker
killed mid-run is retried."""

from __future__ import annotations

import copy
import os
import signal
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from optbrain.pipeline.executor import LocalExecutor, RayExecutor, make_executor, using_executor


# ------------------------------------------------------------------------------ validation ----
def test_unknown_executor_is_an_error_before_any_work():
    import optbrain

    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"executor must be one of \('local', 'ray'\)"):
        optbrain.compress(model, [torch.randn(4, 8)], {"sparsity": 0.5}, executor="dask")
    with pytest.raises(ValueError, match="need executor 'ray'"):
        make_executor("local", address="127.0.0.1:6379")
    assert isinstance(make_executor(None), LocalExecutor)


def test_missing_ray_names_the_extra(monkeypatch, tmp_path):
    from optbrain.budget import build_database

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(ImportError, match=r"pip install optbrain\[ray\]"):
        optbrain_compress(model, executor="ray")
    with pytest.raises(ImportError, match=r"pip install optbrain\[ray\]"):
        build_database(model, [torch.randn(4, 8)], tmp_path / "db", ["s0.5"], executor="ray")
    assert not (tmp_path / "db").exists()  # refused before anything was written


def optbrain_compress(model, **kw):
    import optbrain

    return optbrain.compress(model, [torch.randn(4, 8)], {"sparsity": 0.5}, quiet=True, **kw)


def test_ray_refused_in_sequential_mode():
    pytest.importorskip("ray")
    model = nn.Sequential(nn.Linear(8, 4))
    rec = {"sparsity": 0.5, "calibration": {"mode": "sequential"}}
    import optbrain

    with pytest.raises(ValueError, match="independent"):
        optbrain.compress(model, [torch.randn(4, 8)], rec, executor="ray")


def test_ray_options_are_checked():
    pytest.importorskip("ray")
    with pytest.raises(ValueError, match="HOST:PORT"):
        RayExecutor(address="not an address")
    with pytest.raises(ValueError, match="one or the other"):
        RayExecutor(address="127.0.0.1:6379", workers=2)
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        RayExecutor(workers=0)


# ------------------------------------------------------------------------------ on a Ray ----
@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray head (127.0.0.1, 2 CPUs: 2 one-thread workers) for this module."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ex = RayExecutor(workers=2, object_store_memory=200 * 1024 * 1024).start()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # test helpers by value
    yield ex
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ex.close()


class Small(nn.Module):
    """conv 3→6 (3×3) → grouped conv 6→6 (groups 2) → Linear 96→16 → Linear 16→5."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(96, 16)
        self.out = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.out(torch.relu(self.fc(x.flatten(1))))


def _small():
    torch.manual_seed(0)
    model = Small().eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(16, 3, 8, 8, generator=g) for _ in range(3)]
    return model, calib


def test_compress_on_ray_equals_local(ray_cluster):
    import optbrain

    model, calib = _small()
    other = copy.deepcopy(model)
    recipe = {"rules": [{"method": "obc", "sparsity": 0.5, "bits": 4}]}
    local = optbrain.compress(model, calib, recipe, quiet=True)
    remote = optbrain.compress(other, calib, recipe, quiet=True, executor=ray_cluster)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert len(local.layers) == len(remote.layers) == 5  # c2 has 2 groups
    for x, y in zip(local.layers, remote.layers, strict=True):
        assert (x.name, x.group, x.method, x.sparsity) == (y.name, y.group, y.method, y.sparsity)
        assert x.predicted_loss == y.predicted_loss and x.measured_loss == y.measured_loss
    sa, sb = optbrain.api.compressed_state(model), optbrain.api.compressed_state(other)
    assert list(sa.layers) == list(sb.layers)


def _db_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.*"))}


def test_budget_on_ray_equals_local(ray_cluster, tmp_path):
    from optbrain.budget.api import compress_to_budget

    model, calib = _small()
    other = copy.deepcopy(model)
    levels = ["s0.5", "s0.75", "2:4", "b4", "s0.5+b4"]
    kw = dict(levels=levels, quiet=True, solver="obc")
    a = compress_to_budget(model, calib, "flops=0.25", db_dir=tmp_path / "a", **kw)
    b = compress_to_budget(
        other, calib, "flops=0.25", db_dir=tmp_path / "b", executor=ray_cluster, **kw
    )
    assert a.metadata["allocation"]["levels"] == b.metadata["allocation"]["levels"]
    assert set(b.metadata["database_layer_seconds"]) == {"c1", "c2", "fc", "out"}
    fa, fb = _db_files(tmp_path / "a"), _db_files(tmp_path / "b")
    assert fa.keys() == fb.keys() and len(fa) == 9  # fingerprint + 4 layers × (json, tensors)
    for k in fa:
        assert fa[k] == fb[k], k  # the same bytes
    for (k, x), y in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(x, y), k


def _die_once(marker: str, fn, *args):
    """Kill this worker process the first time (``marker`` absent), else run ``fn(*args)``."""
    if not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return fn(*args)


class KillingRay(RayExecutor):
    """A RayExecutor whose first unit kills its worker mid-run (then Ray retries it)."""

    def __init__(self, inner: RayExecutor, marker: Path) -> None:
        self.__dict__.update(inner.__dict__)
        self._owned = False
        self.marker = str(marker)

    def map(self, fn, jobs, around=None):
        return super().map(partial(_die_once, self.marker, fn), jobs, around)


def test_worker_killed_mid_build_is_retried(ray_cluster, tmp_path):
    from optbrain.budget import DbSettings, build_database

    model, calib = _small()
    levels = ["s0.5", "b4"]
    st = DbSettings(solver="obc")
    ref = build_database(model, calib, tmp_path / "local", levels, settings=st)
    killer = KillingRay(ray_cluster, tmp_path / "killed")
    got = build_database(model, calib, tmp_path / "ray", levels, settings=st, executor=killer)
    assert (tmp_path / "killed").exists()  # a worker did die
    assert got.layers == ref.layers
    fa, fb = _db_files(tmp_path / "local"), _db_files(tmp_path / "ray")
    assert fa == fb


def test_map_yields_every_unit_once(ray_cluster):
    got = dict(ray_cluster.map(pow, [(i, 2) for i in range(7)]))
    assert got == {i: i * i for i in range(7)}
    with using_executor(ray_cluster) as ex:  # an executor passed in is not closed
        assert ex is ray_cluster
    assert ray_cluster.ray.is_initialized()


def test_interrupted_ray_build_resumes_from_the_finished_layers(ray_cluster, tmp_path):
    from optbrain.budget import DbSettings, build_database

    model, calib = _small()
    levels, st = ["s0.5", "b4"], DbSettings(solver="obc")
    ref = tmp_path / "local"
    build_database(model, calib, ref, levels, settings=st)
    written = []

    def stop_after_two(name):
        written.append(name)
        if len(written) == 2:
            raise KeyboardInterrupt("interrupted")

    root = tmp_path / "ray"
    with pytest.raises(KeyboardInterrupt):
        build_database(
            model, calib, root, levels, settings=st, executor=ray_cluster, on_layer=stop_after_two
        )
    again = []
    build_database(
        model, calib, root, levels, settings=st, executor=ray_cluster, on_layer=again.append
    )
    assert sorted(again) == sorted({"c1", "c2", "fc", "out"} - set(written))
    assert _db_files(ref) == _db_files(root)
