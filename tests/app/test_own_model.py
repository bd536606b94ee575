"""Your own model from the CLI: random-init HF directories (GPT-2, Llama, BERT) with a text file,
a CNN from module:factory + safetensors with an image folder, and every bad input as an error
before any work. No network."""

from __future__ import annotations

import json
import random

import pytest
import torch

from optbrain.app.cli import main

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = "the a model layer weight prune quantize calibrate hessian optimal brain surgeon".split()


def _text(path, n_words=3000, seed=0):
    rng = random.Random(seed)
    sentences = []
    for _ in range(n_words // 8):
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(8)) + ".")
    path.write_text("\n".join(sentences))
    return path


def _tokenizer(text_file):
    """A word-level tokenizer trained offline on the text file (tokenizers library)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]"])
    tok.train([str(text_file)], trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]"
    )


def _hf_model(kind, vocab):
    torch.manual_seed(0)
    small = {"vocab_size": vocab}
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, **small)
        return transformers.GPT2LMHeadModel(cfg)
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=64, **small,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(cfg)
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, **small,
    )  # fmt: skip
    return transformers.BertModel(cfg)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return _text(tmp_path_factory.mktemp("data") / "calib.txt")


def _save(tmp_path, kind, text_file, tokenizer=True):
    d = tmp_path / f"my-{kind}"
    tok = _tokenizer(text_file)
    _hf_model(kind, len(tok)).save_pretrained(d)
    if tokenizer:
        tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_hf_directory_compress_then_eval(tmp_path, text_file, kind, capsys):
    d = _save(tmp_path, kind, text_file)
    run = tmp_path / "run"
    rc = main(["compress", "--model", str(d), "--calibration", str(text_file), "--bits", "4",
               "--samples", "16", "--seq-len", "32", "--out", str(run), "--quiet"])  # fmt: skip
    assert rc == 0
    report = json.loads((run / "report.json").read_text())
    comp = [r for r in report["layers"] if r["status"] != "skipped"]
    assert len(comp) >= 8 and all(r["bits"] == 4 for r in comp)
    assert report["recipe"]["rules"][0]["method"] == "auto"
    capsys.readouterr()
    rc = main(["eval", "--model", str(d), "--compressed", str(run), "--data", str(text_file),
               "--seq-len", "32", "--limit", "8", "--json", "--quiet"])  # fmt: skip
    assert rc == 0
    m = json.loads(capsys.readouterr().out)
    assert m["dense"]["agreement"] == 1.0 and m["dense"]["kl"] == 0.0
    # 4-bit weights change the outputs a little, not completely
    assert 0 < m["compressed"]["rel_error"] < 0.5
    assert 0.3 < m["compressed"]["agreement"] < 1.0 or m["compressed"]["kl"] > 0
    if kind in ("gpt2", "llama"):
        vocab = len(_tokenizer(text_file))
        pd, pc = m["dense"]["perplexity"], m["compressed"]["perplexity"]
        # a random init predicts about uniformly: perplexity near the vocabulary size
        assert 0.5 * vocab < pd < 2 * vocab and 0.5 * vocab < pc < 2 * vocab
        assert pc != pd
    else:
        assert "perplexity" not in m["dense"]


@pytest.mark.parametrize("method", ["obc", "magnitude"])
def test_own_llama_channels_are_shrunk_and_eval_loads_the_shrunk_run(
    tmp_path, text_file, method, capsys
):
    """``--pattern channels`` on your own model: the FFN neurons go for real (as for a zoo
    model), the attention output projections are skipped with the reason (heads are for
    that), ``--method obc`` runs (its cost warning has no model for structured OBS), and
    ``eval`` loads the shrunk run onto the dense directory."""
    d = _save(tmp_path, "llama", text_file)
    run = tmp_path / "run"
    rc = main(["compress", "--model", str(d), "--calibration", str(text_file), "--method",
               method, "--pattern", "channels", "--sparsity", "0.5", "--samples", "16",
               "--seq-len", "32", "--out", str(run), "--quiet"])  # fmt: skip
    assert rc == 0
    shrunk = json.loads((run / "report.json").read_text())["metadata"]["shrink"]
    assert shrunk["params_after"] < shrunk["params_before"]
    assert shrunk["macs_after"] < shrunk["macs_before"]
    assert shrunk["removed"] == {f"model.layers.{i}.mlp.down_proj": 32 for i in range(2)}
    assert "use pattern 'heads'" in shrunk["skipped"]["model.layers.0.self_attn.o_proj"]
    assert shrunk["max_rel_error"] < 1e-5
    capsys.readouterr()
    rc = main(["eval", "--model", str(d), "--compressed", str(run), "--data", str(text_file),
               "--seq-len", "32", "--limit", "4", "--json", "--quiet"])  # fmt: skip
    assert rc == 0
    m = json.loads(capsys.readouterr().out)
    assert 0 < m["compressed"]["rel_error"] < 2


CNN_SOURCE = """
from torch import nn

def make_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(128, 2),
    )
"""


def _image_folder(root, per_class=6, classes=("cat", "dog"), size=20):
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            px = (torch.rand(size, size, 3, generator=g) * 128 + 127 * k).to(torch.uint8)
            Image.fromarray(px.numpy()).save(root / c / f"{i}.png")
    return root


def test_module_factory_safetensors_and_image_folder(tmp_path, monkeypatch, capsys):
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mynet.py").write_text(CNN_SOURCE)
    torch.manual_seed(0)
    exec(compile(CNN_SOURCE, "mynet", "exec"), ns := {})
    net = ns["make_cnn"]()
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    images = _image_folder(tmp_path / "imgs")
    run = tmp_path / "run"
    rc = main(["compress", "--model", "mynet:make_cnn", "--weights", "w.safetensors",
               "--calibration", str(images), "--image-size", "16", "--sparsity", "0.5",
               "--out", str(run), "--quiet"])  # fmt: skip
    assert rc == 0
    report = json.loads((run / "report.json").read_text())
    sp = {r["name"]: r["sparsity"] for r in report["layers"]}
    assert sp["0"] == pytest.approx(0.5, abs=0.02) and sp["4"] == pytest.approx(0.5, abs=0.02)
    capsys.readouterr()
    rc = main(["eval", "--model", "mynet:make_cnn", "--weights", "w.safetensors",
               "--compressed", str(run), "--data", str(images), "--image-size", "16",
               "--json", "--quiet"])  # fmt: skip
    assert rc == 0
    m = json.loads(capsys.readouterr().out)
    # accuracy over the 12 labelled images, in steps of 1/12
    for k in ("dense", "compressed"):
        assert round(m[k]["accuracy"] * 12, 6) == int(round(m[k]["accuracy"] * 12))
    assert 0 < m["compressed"]["rel_error"] < 1
    assert "without --weights" not in capsys.readouterr().err
    # without --weights the factory's own init is used: said, not silent
    rc = main(["compress", "--model", "mynet:make_cnn", "--calibration", str(images),
               "--image-size", "16", "--sparsity", "0.5", "--out", str(tmp_path / "r2"),
               "--quiet"])  # fmt: skip
    assert rc == 0
    assert "without --weights: the model is used as the factory returns it" in (
        capsys.readouterr().err
    )


def _err(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    return err


def test_bad_inputs_are_clear_errors_before_work(tmp_path, text_file, capsys, monkeypatch):
    import optbrain.app.sources as sources

    def no_load(*a, **k):  # every error below must come before the weights are read
        raise AssertionError("the model was loaded")

    d = _save(tmp_path, "gpt2", text_file)
    bare = _save(tmp_path / "bare", "gpt2", text_file, tokenizer=False)
    monkeypatch.setattr(sources, "load_hf", no_load)
    base = ["compress", "--bits", "4", "--quiet"]
    err = _err([*base, "--model", str(tmp_path / "nope"), "--calibration", str(text_file)], capsys)
    assert "unknown model" in err and "no such local directory" in err
    err = _err([*base, "--model", "someorg/somemodel", "--calibration", str(text_file)], capsys)
    assert "downloads nothing" in err and "someorg/somemodel" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.txt").write_text("hi")
    err = _err([*base, "--model", str(empty), "--calibration", str(text_file)], capsys)
    assert "without config.json" in err
    err = _err([*base, "--model", str(bare), "--calibration", str(text_file)], capsys)
    assert "no tokenizer" in err
    noimg = tmp_path / "noimg"
    noimg.mkdir()
    err = _err([*base, "--model", str(d), "--calibration", str(noimg)], capsys)
    assert "no images" in err
    err = _err([*base, "--model", str(d), "--calibration", str(tmp_path / "x.txt")], capsys)
    assert "no such file" in err
    err = _err([*base, "--model", str(d), "--calibration", str(text_file), "--seq-len", "65"],
               capsys)  # fmt: skip
    assert "--seq-len 65" in err and "64 tokens" in err
    err = _err(["eval", "--model", str(d), "--data", str(noimg)], capsys)
    assert "no images" in err
    afile = tmp_path / "afile"
    afile.write_text("x")
    err = _err([*base, "--model", str(d), "--calibration", str(text_file), "--out", str(afile)],
               capsys)  # fmt: skip
    assert f"--out {afile} is an existing file" in err
    err = _err([*base, "--model", str(d), "--calibration", str(text_file), "--out",
                str(afile / "run")], capsys)  # fmt: skip
    assert "cannot be created" in err and "is a file" in err


def test_calibration_from_formats(tmp_path, text_file):
    import numpy as np
    from safetensors.torch import save_file

    import optbrain

    tok = _tokenizer(text_file)
    b = optbrain.calibration_from(text_file, tokenizer=tok, samples=10, seq_len=16, batch_size=4)
    assert [x["input_ids"].shape for x in b] == [(4, 16), (4, 16), (2, 16)]
    again = optbrain.calibration_from(text_file, tokenizer=tok, samples=10, seq_len=16)
    assert torch.equal(b[0]["input_ids"], again[0]["input_ids"][:4])
    other = optbrain.calibration_from(text_file, tokenizer=tok, samples=10, seq_len=16, seed=1)
    assert not torch.equal(again[0]["input_ids"], other[0]["input_ids"])
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"body": "the model " * 20}) for _ in range(5)))
    j = optbrain.calibration_from(jl, tokenizer=tok, samples=3, seq_len=8, text_key="body")
    assert j[0]["input_ids"].shape == (3, 8)
    assert set(tok.convert_ids_to_tokens(j[0]["input_ids"].flatten().tolist())) <= {"the", "model"}
    with pytest.raises(ValueError, match="no key 'text'"):
        optbrain.calibration_from(jl, tokenizer=tok)
    np.save(tmp_path / "x.npy", np.arange(60, dtype=np.float32).reshape(20, 3))
    t = optbrain.calibration_from(tmp_path / "x.npy", samples=5, batch_size=8, key="x")
    assert t[0]["x"].shape == (5, 3) and len(set(t[0]["x"][:, 0].tolist())) == 5
    save_file({"input_ids": torch.arange(40).view(10, 4), "attention_mask": torch.ones(10, 4)},
              str(tmp_path / "t.safetensors"))  # fmt: skip
    s = optbrain.calibration_from(tmp_path / "t.safetensors", samples=4)
    assert set(s[0]) == {"input_ids", "attention_mask"} and s[0]["input_ids"].shape == (4, 4)
    assert torch.equal(s[0]["input_ids"][:, 1] - s[0]["input_ids"][:, 0], torch.ones(4).long())
    imgs = _image_folder(tmp_path / "imgs", per_class=3)
    x = optbrain.calibration_from(imgs, image_size=8, mean=[0.5] * 3, std=[0.25] * 3)
    assert x[0].shape == (6, 3, 8, 8)
    assert float(x[0].min()) >= -2.0 - 1e-6 and float(x[0].max()) <= 2.0 + 1e-6


def test_datasets_save_to_disk(tmp_path, text_file):
    datasets = pytest.importorskip("datasets")
    import optbrain

    tok = _tokenizer(text_file)
    lines = text_file.read_text().splitlines()
    datasets.Dataset.from_dict({"text": lines}).save_to_disk(str(tmp_path / "ds"))
    b = optbrain.calibration_from(tmp_path / "ds", tokenizer=tok, samples=6, seq_len=16)
    assert b[0]["input_ids"].shape == (6, 16)
    datasets.Dataset.from_dict({"other": lines}).save_to_disk(str(tmp_path / "ds2"))
    with pytest.raises(ValueError, match="no 'text' text column"):
        optbrain.calibration_from(tmp_path / "ds2", tokenizer=tok)


def test_obc_over_budget_warns_with_prediction_and_auto_alternative(tmp_path, monkeypatch):
    from torch import nn

    from optbrain.app.own import obc_warnings
    from optbrain.core.methods.auto import estimate_obc_seconds
    from optbrain.core.spec import make_spec
    from optbrain.recipe import Recipe

    model = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 16))
    lines = obc_warnings(model, Recipe.from_dict({"method": "obc", "bits": 4}))
    predicted = estimate_obc_seconds(2048, 2048, make_spec(2048, bits=4))
    assert predicted > 30  # the big layer is over auto's budget, the 16-row one is not
    assert len(lines) == 1 and lines[0].startswith("warning: 0 (2048x2048)")
    assert f"~{predicted:.0f} s" in lines[0] and "would run gptq" in lines[0]
    lines = obc_warnings(model, Recipe.from_dict({"method": "obc", "sparsity": 0.5}))
    assert "would run sparsegpt" in lines[0]
    assert obc_warnings(model, Recipe.from_dict({"method": "auto", "bits": 4})) == []


def test_cli_preset_and_class_name_targets(tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file, save_file

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mynet.py").write_text(CNN_SOURCE)
    exec(compile(CNN_SOURCE, "mynet", "exec"), ns := {})
    save_file(ns["make_cnn"]().state_dict(), str(tmp_path / "w.safetensors"))
    images = _image_folder(tmp_path / "imgs", per_class=2)
    run = tmp_path / "run"
    rc = main(["compress", "--model", "mynet:make_cnn", "--weights", "w.safetensors",
               "--calibration", str(images), "--image-size", "8", "--preset", "2:4",
               "--targets", "Linear", "--out", str(run), "--quiet"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    layers = {r["name"]: r for r in json.loads((run / "report.json").read_text())["layers"]}
    assert layers["4"]["pattern"] == "2:4"
    # 2:4 prunes half; inputs that are always zero on this tiny calibration set (after ReLU)
    # have their weights zeroed too, and the reported sparsity counts them (what happened)
    w4 = load_file(str(run / "compressed.safetensors"))["4.weight"]
    assert layers["4"]["sparsity"] >= 0.5
    assert layers["4"]["sparsity"] == pytest.approx(float((w4 == 0).float().mean()))
    assert layers["0"]["status"] == "skipped"
    rc = main(["compress", "--model", "mynet:make_cnn", "--weights", "missing.safetensors",
               "--calibration", str(images), "--bits", "4"])  # fmt: skip
    assert rc == 2 and "--weights missing.safetensors: no such file" in capsys.readouterr().err


def test_progress_one_line_per_layer_in_logs_and_verbose_adds_the_phases(
    tmp_path, monkeypatch, capsys
):
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mynet.py").write_text(CNN_SOURCE)
    exec(compile(CNN_SOURCE, "mynet", "exec"), ns := {})
    save_file(ns["make_cnn"]().state_dict(), str(tmp_path / "w.safetensors"))
    images = _image_folder(tmp_path / "imgs", per_class=10)
    argv = ["compress", "--model", "mynet:make_cnn", "--weights", "w.safetensors",
            "--calibration", str(images), "--image-size", "8", "--bits", "4",
            "--samples", "16"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err  # stderr is not a terminal under pytest
    lines = [x for x in err.splitlines() if x.startswith("[compress]")]
    assert len(lines) == 2 and lines[0].startswith("[compress] 1/2 0 (")
    assert "[calibration forwards]" not in err
    assert main([*argv, "--out", str(tmp_path / "b"), "--verbose"]) == 0
    err = capsys.readouterr().err
    assert err.count("[calibration forwards]") == 2  # 16 samples = 2 batches of 8, one pass
    assert main([*argv, "--out", str(tmp_path / "c"), "--quiet"]) == 0
    assert "[" not in capsys.readouterr().err


def test_hf_image_model_takes_size_and_normalisation_from_its_preprocessor(tmp_path):
    from torch import nn

    from optbrain.app.own import calibration_for, labelled_images
    from optbrain.app.sources import LoadedModel

    pre = {"image_mean": [0.5] * 3, "image_std": [0.25] * 3, "size": {"height": 8, "width": 8}}
    model = nn.Linear(2, 2)
    model.config = transformers.PretrainedConfig(id2label={0: "dog", 1: "cat"})
    loaded = LoadedModel(model, "hf", "vit", task="image-classification", preprocessor=pre)
    images = _image_folder(tmp_path / "imgs", per_class=3)
    b = calibration_for(loaded, images, samples=6)
    x = b[0]["pixel_values"]  # HF image models take pixel_values=
    assert x.shape == (6, 3, 8, 8)
    raw = calibration_for(
        LoadedModel(nn.Linear(2, 2), "module", "m"), images, samples=6, image_size=8
    )[0]
    assert torch.allclose(x, (raw - 0.5) / 0.25, atol=1e-6)  # same images, same seed
    batches, labels = labelled_images(loaded, images, None, None)
    # folders cat, dog (sorted) map to the model's own ids: cat -> 1, dog -> 0
    assert sorted(torch.cat(labels).tolist()) == [0, 0, 0, 1, 1, 1]
    first = batches[0]["pixel_values"][0]
    is_bright = bool(first.mean() > 0.5)  # the "dog" images are the bright ones
    assert int(labels[0][0]) == (0 if is_bright else 1)


def test_own_model_export_from_the_cli(tmp_path, text_file, capsys):
    """A run of your own HF model exports from the CLI like a zoo run: compressed-tensors that
    plain transformers loads (same logits as optbrain's compressed model), packed safetensors,
    ONNX traced on --calibration inputs (same logits under ONNX Runtime); ONNX without
    --calibration is a clear error; bench times it on --calibration inputs (torch and ONNX
    Runtime), and without them is a clear error."""
    import transformers

    from optbrain.io import load

    d = _save(tmp_path, "llama", text_file)
    run = tmp_path / "run"
    rc = main(["compress", "--model", str(d), "--calibration", str(text_file), "--method",
               "gptq", "--bits", "4", "--samples", "16", "--seq-len", "32", "--out", str(run),
               "--quiet"])  # fmt: skip
    assert rc == 0
    assert json.loads((run / "source.json").read_text())["model"] == str(d.resolve())
    ct = tmp_path / "ct"
    assert main(["export", str(run), "--format", "compressed-tensors", "--out", str(ct)]) == 0
    comp = load(transformers.AutoModelForCausalLM.from_pretrained(d).eval(), run)
    plain = transformers.AutoModelForCausalLM.from_pretrained(ct).eval()
    ids = torch.randint(0, comp.config.vocab_size, (2, 16))
    with torch.no_grad():
        want = comp(input_ids=ids).logits
        got = plain(input_ids=ids).logits
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    assert main(["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "p")]) == 0
    capsys.readouterr()
    err = _err(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")], capsys)
    assert "needs --calibration FILE" in err
    ort = pytest.importorskip("onnxruntime")
    onnx_path = tmp_path / "m.onnx"
    rc = main(["export", str(run), "--format", "onnx", "--calibration", str(text_file),
               "--seq-len", "16", "--out", str(onnx_path)])  # fmt: skip
    assert rc == 0
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    feed = {i.name: (ids if "ids" in i.name else torch.ones_like(ids)).numpy()
            for i in sess.get_inputs()}  # fmt: skip
    out = sess.run(None, feed)[0]
    assert float(abs(out - want.numpy()).max()) <= 1e-4 * float(want.abs().max())
    err = _err(["bench", str(run)], capsys)
    assert "bench of your own model needs --calibration FILE" in err
    for runtime in ("torch", "onnxruntime"):
        argv = ["bench", str(run), "--runtime", runtime, "--calibration", str(text_file),
                "--seq-len", "16", "--batch", "4", "--repeats", "3", "--warmup", "1"]  # fmt: skip
        assert main(argv) == 0
    argv = ["bench", str(run), "--calibration", str(text_file), "--seq-len", "16", "--batch",
            "2", "--repeats", "3", "--activations", "int8", "--samples", "8"]  # fmt: skip
    assert main(argv) == 0
    dep = json.loads((run / "report.json").read_text())["metadata"]["deployment"]["bench"]
    for key in ("torch-b4-t1-s16", "onnxruntime-b4-t1-s16", "onnxruntime-b2-t1-s16-int8"):
        assert dep[key]["compressed"]["median_ms"] > 0, dep
    assert dep["onnxruntime-b2-t1-s16-int8"]["calibration_agreement"] > 50
    err = _err(["bench", str(run), "--calibration", str(text_file), "--seq-len", "16",
                "--batch", "100000"], capsys)  # fmt: skip
    assert "--batch 100000 needs at least as many" in err
