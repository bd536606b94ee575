"""``optbrain export`` / ``optbrain bench`` (``optbrain.app.deploy``) on a digits-mlp GPTQ 4-bit
run: the files load (optbrain.load, ONNX Runtime) to the compressed model, sizes and timings go
into report.json and ``optbrain report``, bad input is an error before any work."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from optbrain.app import deploy, zoo
from optbrain.app.cli import main
from optbrain.io import load


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("optbrain-cache")


@pytest.fixture(autouse=True)
def _env(cache, monkeypatch):
    monkeypatch.setenv("OPTBRAIN_CACHE", str(cache))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache) -> Path:
    """``optbrain compress --model digits-mlp --method gptq --bits 4``, once."""
    out = tmp_path_factory.mktemp("deploy") / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("OPTBRAIN_CACHE", str(cache))
    try:
        code, _, err = _main(
            ["compress", "--model", "digits-mlp", "--method", "gptq", "--bits", 4, "--quiet",
             "--samples", 64, "--out", out]
        )  # fmt: skip
    finally:
        mp.undo()
    assert code == 0, err
    return out


def _deployment(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())["metadata"]["deployment"]


def test_export_safetensors_loads_to_the_same_model(run, tmp_path):
    code, out, err = _main(["export", run, "--format", "safetensors", "--out", tmp_path / "p"])
    assert code == 0, err
    entry = zoo.get("digits-mlp")
    dense = entry.load()
    a = load(copy.deepcopy(dense), run)
    b = load(copy.deepcopy(dense), tmp_path / "p")
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    info = _deployment(run)["exports"]["safetensors"]
    assert info["layer_fp32_bytes"] == 4 * sum(
        m.weight.numel() for m in dense.modules() if isinstance(m, nn.Linear)
    )
    assert 0.125 < info["ratio"] <= 0.14
    assert f"= {info['ratio']:.4f}x" in out
    packed = (tmp_path / "p" / "compressed.safetensors").stat().st_size
    assert packed < 0.2 * (run / "compressed.safetensors").stat().st_size


def test_export_onnx_runs_in_onnxruntime_like_torch(run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "m.onnx"
    code, _, err = _main(["export", run, "--format", "onnx", "--out", path])
    assert code == 0, err
    entry = zoo.get("digits-mlp")
    model = load(entry.load(), run)
    x = deploy.example_batch(entry, 16, seed=3)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    info = _deployment(run)["exports"]["onnx"]
    assert info["dense"] == {} and info["ratio"] <= 0.14
    assert info["total_bytes"] == path.stat().st_size


def test_export_onnx_int8_activations_runs_close_to_torch(run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "q.onnx"
    argv = ["export", run, "--format", "onnx", "--activations", "int8", "--samples", 64]
    code, out, err = _main([*argv, "--out", path])
    assert code == 0, err
    info = _deployment(run)["exports"]["onnx-int8"]
    assert info["info"]["activations"] == "int8" and info["info"]["calibration_batches"] >= 1
    assert info["info"]["calibration_agreement"] >= 95.0
    assert "top-1 agreement" in out
    entry = zoo.get("digits-mlp")
    model = load(entry.load(), run)
    x = deploy.example_batch(entry, 64, seed=3)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert np.linalg.norm(got - want) < 0.05 * np.linalg.norm(want)
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9


def test_export_onnx_matmul_nbits_runs_like_torch(run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "n.onnx"
    code, out, err = _main(["export", run, "--format", "onnx", "--matmul-nbits", "--out", path])
    assert code == 0, err
    info = _deployment(run)["exports"]["onnx-nbits0"]
    assert info["info"]["matmul_nbits"] and info["info"]["dequantize_linear"] == {}
    assert info["ratio"] <= 0.15
    entry = zoo.get("digits-mlp")
    model = load(entry.load(), run)
    x = deploy.example_batch(entry, 16, seed=3)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "MatMulNBits" in ops and "DequantizeLinear" not in ops
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bench_matmul_nbits(run):
    pytest.importorskip("onnxruntime")
    argv = ["bench", run, "--matmul-nbits", "--accuracy-level", 4, "--batch", 8, "--repeats", 3]
    code, out, err = _main([*argv, "--warmup", 1])
    assert code == 0, err
    b = _deployment(run)["bench"]["onnxruntime-b8-t1-nbits4"]
    assert b["accuracy_level"] == 4 and b["matmul_nbits"] >= 1
    assert b["dense"]["median_ms"] > 0 and b["compressed"]["median_ms"] > 0
    assert "| onnxruntime MatMulNBits (accuracy level 4) | 8 | 1 |" in out
    with pytest.raises(ValueError, match="--matmul-nbits needs --runtime onnxruntime"):
        deploy.bench(run, "torch", 1, 1, 1, 0, matmul_nbits=True)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--format", "compressed-tensors"], "'digits-mlp' is not one"),
        (["--format", "onnx", "--model", "digits-cnn"], "written for model 'digits-mlp'"),
        (["--format", "safetensors", "--activations", "int8"], "activations= applies to"),
        (["--format", "onnx", "--dtype", "float16"], "dtype= applies to format='compressed"),
        (["--format", "onnx", "--activations", "int8", "--samples", 0], "--samples must be"),
        (["--format", "safetensors", "--matmul-nbits"], "matmul_nbits= applies to format="),
        (["--format", "onnx", "--accuracy-level", 4], "pass matmul_nbits=True"),
        (["--format", "onnx", "--matmul-nbits", "--accuracy-level", 9], "accuracy_level must"),
        (["--format", "onnx", "--matmul-nbits", "--activations", "int8"], "weight-only graph"),
    ],
)
def test_export_bad_input_is_an_error_before_work(run, tmp_path, argv, message):
    t0 = time.perf_counter()
    code, _, err = _main(["export", run, *argv, "--out", tmp_path / "x"])
    assert code == 2 and message in err
    assert time.perf_counter() - t0 < 2.0  # nothing loaded
    assert not (tmp_path / "x").exists()


def test_export_of_a_directory_that_is_not_a_run(tmp_path):
    code, _, err = _main(["export", tmp_path, "--format", "onnx", "--out", tmp_path / "x"])
    assert code == 2 and "manifest.json" in err


def test_unknown_format_is_refused_by_the_parser(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", str(run), "--format", "gguf", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "invalid choice: 'gguf'" in capsys.readouterr().err


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_bench_writes_the_deployment_section(run, runtime):
    if runtime == "onnxruntime":
        pytest.importorskip("onnxruntime")
    argv = ["bench", run, "--runtime", runtime, "--batch", 8, "--repeats", 5, "--warmup", 1]
    code, out, err = _main(argv)
    assert code == 0, err
    b = _deployment(run)["bench"][f"{runtime}-b8-t1"]
    assert (b["batch"], b["threads"], b["repeats"]) == (8, 1, 5)
    d, c = b["dense"], b["compressed"]
    assert d["median_ms"] > 0 and c["median_ms"] > 0
    assert b["speedup"] == pytest.approx(d["median_ms"] / c["median_ms"])
    assert d["throughput"] == pytest.approx(8e3 / d["median_ms"])
    if runtime == "onnxruntime":  # int4 codes: the compressed file is far smaller
        assert b["bytes"]["compressed"] < 0.4 * b["bytes"]["dense"]
    else:  # torch holds the compressed weights as float tensors
        assert b["bytes"]["compressed"] == b["bytes"]["dense"]
    assert f"| {runtime} | 8 | 1 |" in out
    code, out, _ = _main(["report", run, "--html", run / "r.html"])
    assert code == 0 and f"| {runtime} | 8 | 1 | {d['median_ms']:.3f} |" in out


def test_bench_int8_activations(run):
    pytest.importorskip("onnxruntime")
    argv = ["bench", run, "--activations", "int8", "--samples", 32, "--batch", 8, "--repeats", 3]
    code, out, err = _main([*argv, "--warmup", 1])
    assert code == 0, err
    b = _deployment(run)["bench"]["onnxruntime-b8-t1-int8"]
    assert b["activations"] == "int8" and b["calibration_agreement"] >= 95.0
    assert b["dense"]["median_ms"] > 0 and b["compressed"]["median_ms"] > 0
    assert "| onnxruntime int8 activations | 8 | 1 |" in out


def test_bench_bad_runtime_and_batch(run):
    with pytest.raises(ValueError, match="unknown runtime 'tvm'"):
        deploy.bench(run, "tvm", 1, 1, 1, 0)
    with pytest.raises(ValueError, match="at least 1"):
        deploy.bench(run, "torch", 0, 1, 1, 0)
    with pytest.raises(ValueError, match="needs --runtime onnxruntime"):
        deploy.bench(run, "torch", 1, 1, 1, 0, activations="int8")
    with pytest.raises(ValueError, match="unknown activations 'int4'"):
        deploy.bench(run, "onnxruntime", 1, 1, 1, 0, activations="int4")


class _Forward(nn.Module):
    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        return input_ids


def test_positional_lays_a_dict_out_in_forward_order():
    ids, tt = torch.zeros(1, 3), torch.ones(1, 3)
    assert deploy.positional(_Forward(), {"token_type_ids": tt, "input_ids": ids}) == (
        ids,
        None,
        tt,
    )
    with pytest.raises(ValueError, match="pixel_values"):
        deploy.positional(_Forward(), {"pixel_values": ids})


def test_onnx_inputs_add_an_all_ones_mask_to_token_ids_only():
    ids = torch.tensor([[5, 6, 7]])
    got = deploy.onnx_inputs(_Forward(), {"input_ids": ids})
    assert len(got) == 2 and got[0] is ids and torch.equal(got[1], torch.ones_like(ids))
    mask = torch.tensor([[1, 1, 0]])
    assert deploy.onnx_inputs(_Forward(), {"input_ids": ids, "attention_mask": mask})[1] is mask
    x = torch.randn(2, 4)
    assert deploy.onnx_inputs(nn.Linear(4, 2), x) == (x,)  # tensors as they are


def test_ort_model_scores_the_exported_graph_like_torch(run, tmp_path):
    """``deploy.ort_model``: the zoo entry's ``evaluate`` on the ONNX graph run by ONNX Runtime
    gives the torch compressed model's metrics (the graph's outputs are within 1e-5)."""
    pytest.importorskip("onnxruntime")
    from optbrain.io import export

    entry = zoo.get("digits-mlp")
    model = load(entry.load(), run)
    path = tmp_path / "m.onnx"
    export(model, path, format="onnx", example_inputs=deploy.example_batch(entry, 1))
    ort_model = deploy.ort_model(path, model, qdq=False)
    x = deploy.example_batch(entry, 16, seed=3)
    with torch.no_grad():
        np.testing.assert_allclose(ort_model(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)
    assert entry.evaluate(ort_model) == entry.evaluate(model)


def test_ort_model_of_a_hugging_face_encoder_takes_its_keywords(tmp_path):
    pytest.importorskip("onnxruntime")
    transformers = pytest.importorskip("transformers")
    from optbrain.io.onnx import export_dense_onnx

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32,
    )  # fmt: skip
    bert = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(1, 50, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    x = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    path = export_dense_onnx(bert, tmp_path / "b.onnx", example_inputs=tuple(x.values()))
    m = deploy.ort_model(path, bert, qdq=False)
    assert m.config is bert.config
    with torch.no_grad():
        want = bert(**x).last_hidden_state
    got = m(ids, attention_mask=mask, token_type_ids=x["token_type_ids"]).last_hidden_state
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


class _Tokens:
    name = "toks"

    @staticmethod
    def calibration(n, seed):
        ids = torch.arange(n * 4).reshape(n, 4)
        return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


def test_ort_model_of_a_causal_lm_called_with_ids_alone(tmp_path):
    """A causal LM is traced with an all-ones mask (``onnx_inputs``); its ``ort_model``, called
    as the zoo's perplexity calls it (``input_ids=``, ``use_cache=False``), adds the mask the
    graph takes and feeds the inputs by name."""
    pytest.importorskip("onnxruntime")
    transformers = pytest.importorskip("transformers")
    from optbrain.io.onnx import export_dense_onnx

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    lm = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (1, 9))
    example = deploy.onnx_inputs(lm, {"input_ids": ids})
    path = export_dense_onnx(lm, tmp_path / "lm.onnx", example_inputs=example)
    m = deploy.ort_model(path, lm, qdq=False)
    x = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        want = lm(input_ids=x, use_cache=False).logits
    got = m(input_ids=x, use_cache=False).logits
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def test_example_batch_seq_len_lays_windows_along_the_sequence():
    x = deploy.example_batch(_Tokens(), 2, seq_len=10)
    assert x["input_ids"].shape == x["attention_mask"].shape == (2, 10)
    # row 0 = windows 0, 2, 4 (cut): calibration rows laid after each other
    assert x["input_ids"][0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17]
    assert deploy.example_batch(_Tokens(), 2)["input_ids"].shape == (2, 4)
    with pytest.raises(ValueError, match="token models"):
        deploy.example_batch(zoo.get("digits-mlp"), 2, seq_len=10)


def test_bench_int8_dynamic_activations(run):
    pytest.importorskip("onnxruntime")
    argv = ["bench", run, "--activations", "int8-dynamic", "--batch", 4, "--repeats", 3]
    code, out, err = _main([*argv, "--warmup", 1])
    assert code == 0, err
    b = _deployment(run)["bench"]["onnxruntime-b4-t1-int8-dynamic"]
    assert b["activations"] == "int8-dynamic" and b["calibration_agreement"] >= 95.0
    assert "| onnxruntime int8-dynamic activations | 4 | 1 |" in out


def test_bench_of_a_zoo_run_refuses_own_model_flags(run, tmp_path):
    """--calibration / --weights are for runs of your own model: on a zoo run, an error, not
    silently ignored."""
    np = pytest.importorskip("numpy")
    np.save(tmp_path / "x.npy", np.zeros((4, 64), dtype=np.float32))
    code, _, err = _main(["bench", run, "--runtime", "torch", "--calibration", tmp_path / "x.npy"])
    assert code == 2 and "--calibration is for runs of your own model" in err, err
