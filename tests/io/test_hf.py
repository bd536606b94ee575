"""``format="compressed-tensors"``: a tiny Llama compressed by optbrain (GPTQ 4-bit per channel,
per group, 8-bit, asymmetric; tied output embedding; SparseGPT) is written as a Hugging Face
directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads in a process that
never imports optbrain, with logits **equal** (tolerance 0) to optbrain's compressed model; the
4-bit per-channel layers take ≤ 0.14× their fp32 bytes (scales included). Models or layers the
format cannot take are a clear error before anything is written."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="format='compressed-tensors' is for transformers")
pytest.importorskip(
    "compressed_tensors", reason="needs the compressed-tensors package (extra 'deploy')"
)
import transformers  # noqa: E402

from optbrain.api import compress  # noqa: E402
from optbrain.io.hf import _tensor_bytes, export_compressed_tensors  # noqa: E402

VOCAB = 96
RECIPES = {
    "gptq4": {"method": "gptq", "bits": 4},
    "gptq4-g32": {"method": "gptq", "bits": 4, "group_size": 32},
    "gptq8": {"method": "gptq", "bits": 8},
    "gptq4-asym-g64": {"method": "gptq", "bits": 4, "sym": False, "group_size": 64},
    "tied-gptq4": {"method": "gptq", "bits": 4},
    "sparsegpt50-4bit": {"method": "sparsegpt", "sparsity": 0.5, "bits": 4},
    "sparsegpt50": {"method": "sparsegpt", "sparsity": 0.5},
    "tied-gptq4-float16": {"method": "gptq", "bits": 4},
    "gptq4-bfloat16": {"method": "gptq", "bits": 4},
}
#: recipes exported with dtype= (the tensors compressed-tensors does not pack)
DTYPE = {"tied-gptq4-float16": "float16", "gptq4-bfloat16": "bfloat16"}


def _rounded(model: torch.nn.Module, packed: list[str], dtype: str) -> torch.nn.Module:
    """A copy of ``model`` whose parameters outside the ``packed`` layers went through
    ``dtype`` and back: what the exported directory holds."""
    out = copy.deepcopy(model)
    for name, m in out.named_modules():
        if name not in packed:
            for p in m.parameters(recurse=False):
                p.data = p.data.to(getattr(torch, dtype)).float()
    return out


def _tokenizer(d: Path) -> None:
    """A word-level tokenizer saved into ``d`` (files for the export to copy)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.save_pretrained(str(d))


def llama(d: Path, tie: bool = False) -> transformers.PreTrainedModel:
    """A tiny random Llama saved to (and loaded from) directory ``d``."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(d))
    _tokenizer(d)
    return transformers.AutoModelForCausalLM.from_pretrained(str(d)).eval()


def _calibration() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (16, 24), generator=g)
    return [{"input_ids": ids[i : i + 4]} for i in range(0, 16, 4)]


TEST_IDS = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(2))

LOADER = textwrap.dedent(
    """
    import json, sys, torch, transformers
    dirs = json.loads(sys.argv[1])
    ids = torch.load(sys.argv[2])
    out = {}
    for name, d in dirs.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
        tok = transformers.AutoTokenizer.from_pretrained(d)
        with torch.no_grad():
            out[name] = model(input_ids=ids).logits
        assert tok("w1 w2")["input_ids"] == [1, 2]
    assert "optbrain" not in sys.modules
    torch.save(out, sys.argv[3])
    """
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every recipe compressed, exported, and loaded back by plain transformers."""
    root = tmp_path_factory.mktemp("hf")
    results, refs, dirs = {}, {}, {}
    for name, recipe in RECIPES.items():
        model = llama(root / f"dense-{name}", tie=name.startswith("tied"))
        compress(model, _calibration(), recipe, quiet=True)
        out = root / f"ct-{name}"
        results[name] = export_compressed_tensors(model, out, dtype=DTYPE.get(name))
        ref = model
        if name in DTYPE:
            ref = _rounded(model, results[name].info["packed_layers"], DTYPE[name])
        with torch.no_grad():
            refs[name] = ref(input_ids=TEST_IDS).logits
        dirs[name] = str(out)
    torch.save(TEST_IDS, root / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = ""  # this tree's optbrain is not importable there
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, json.dumps(dirs), str(root / "ids.pt"), str(root / "o.pt")],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(root),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"results": results, "refs": refs, "loaded": torch.load(root / "o.pt"), "dirs": dirs}


@pytest.mark.parametrize("name", list(RECIPES))
def test_plain_transformers_loads_the_same_model(exported: dict, name: str) -> None:
    assert torch.equal(exported["loaded"][name], exported["refs"][name])


def test_directory_holds_config_weights_and_tokenizer(exported: dict) -> None:
    d = Path(exported["dirs"]["gptq4-g32"])
    cfg = json.loads((d / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == "pack-quantized"
    (group,) = qc["config_groups"].values()
    assert group["weights"]["num_bits"] == 4 and group["weights"]["group_size"] == 32
    assert len(group["targets"]) == 15  # 7 projections x 2 blocks + lm_head
    assert (d / "model.safetensors").is_file()
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(d))
    res = exported["results"]["gptq4-g32"]
    assert set(res.info["tokenizer_files"]) >= {"tokenizer.json", "tokenizer_config.json"}
    assert res.dense == {}


def test_four_bit_per_channel_is_at_most_0_14_of_fp32(exported: dict) -> None:
    res = exported["results"]["gptq4"]
    # 4 bits per weight (0.125x) plus one float32 scale per row of 128 or 256 columns
    assert 0.125 < res.ratio <= 0.14, res.ratio
    dense = Path(exported["dirs"]["gptq4"]).parent / "dense-gptq4" / "model.safetensors"
    saved = res.layer_fp32_bytes - res.layer_bytes
    assert res.files["model.safetensors"] <= dense.stat().st_size - saved + 4096
    assert exported["results"]["gptq4-g32"].ratio <= 0.16
    assert exported["results"]["gptq8"].ratio <= 0.26


def test_asymmetric_and_pruned_only_layers_are_said(exported: dict) -> None:
    asym = exported["results"]["gptq4-asym-g64"]
    assert asym.dense == {}
    assert asym.ratio <= 0.28  # naive-quantized: one int8 per code (see the module docstring)
    pruned = exported["results"]["sparsegpt50"]
    assert len(pruned.dense) == 15 and pruned.layer_bytes == 0
    assert all("no sparse format" in r for r in pruned.dense.values())


def test_tied_output_embedding_stays_tied_and_dense(exported: dict) -> None:
    """optbrain does not compress an output projection tied to the input embedding."""
    cfg = json.loads((Path(exported["dirs"]["tied-gptq4"]) / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    (group,) = cfg["quantization_config"]["config_groups"].values()
    assert len(group["targets"]) == 14 and "re:^lm_head$" not in group["targets"]


@pytest.mark.parametrize("name", list(DTYPE))
def test_dtype_stores_the_unpacked_tensors_smaller(exported: dict, name: str) -> None:
    """dtype=: embedding and norms stored in float16 / bfloat16, the packed layers' scales in
    float32; config.json keeps float32, so transformers loads a float32 model whose logits
    equal (tolerance 0, above) those of the compressed model with those tensors rounded."""
    from safetensors import safe_open

    d = Path(exported["dirs"][name])
    want = {"float16": "F16", "bfloat16": "BF16"}[DTYPE[name]]
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert dtypes["model.embed_tokens.weight"] == want
    assert dtypes["model.norm.weight"] == want
    assert {v for k, v in dtypes.items() if k.endswith("weight_scale")} == {"F32"}
    assert json.loads((d / "config.json").read_text())["dtype"] == "float32"
    plain = Path(exported["dirs"][name.removesuffix(f"-{DTYPE[name]}")])
    small, full = (_tensor_bytes(x / "model.safetensors") for x in (d, plain))
    assert small.keys() == full.keys()
    for k, n in small.items():  # the unpacked tensors take half their float32 bytes
        assert n == (full[k] if dtypes[k] in ("I32", "I64", "F32") else full[k] // 2), k
    assert exported["results"][name].info["dtype"] == DTYPE[name]


def test_model_is_left_unchanged(tmp_path: Path) -> None:
    model = llama(tmp_path / "dense")
    compress(model, _calibration(), RECIPES["gptq4"], quiet=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_compressed_tensors(model, tmp_path / "ct")
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert not hasattr(model.model.layers[0].self_attn.q_proj, "weight_scale")


def test_gpt2_conv1d_is_a_clear_error(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    compress(model, _calibration(), {"method": "gptq", "bits": 4}, quiet=True)
    with pytest.raises(ValueError, match="transformers Conv1D .* packs nn.Linear layers only"):
        export_compressed_tensors(model, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_bad_input_is_an_error_before_work(tmp_path: Path) -> None:
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="writes Hugging Face transformers models"):
        export_compressed_tensors(mlp, tmp_path / "a")
    model = llama(tmp_path / "dense")
    with pytest.raises(ValueError, match="not compressed by optbrain.compress"):
        export_compressed_tensors(model, tmp_path / "b")
    compress(model, _calibration(), RECIPES["gptq4"], quiet=True)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 0.01
    with pytest.raises(ValueError, match="not on their quantization grid"):
        export_compressed_tensors(model, tmp_path / "c")
    with pytest.raises(ValueError, match="source .* is not a directory"):
        export_compressed_tensors(model, tmp_path / "d", source=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="dtype='int8' .* choose one of"):
        export_compressed_tensors(model, tmp_path / "d", dtype="int8")
    assert not any((tmp_path / x).exists() for x in "abcd")


def test_export_is_written_whole_into_a_fresh_directory(tmp_path: Path) -> None:
    """The directory appears complete under its name (written beside it, renamed when done):
    no temporary directory is left, an existing empty directory is taken, a non-empty one is
    refused before any work and left as it was."""
    model = llama(tmp_path / "dense")
    compress(model, _calibration(), RECIPES["gptq4"], quiet=True)
    (tmp_path / "empty").mkdir()
    res = export_compressed_tensors(model, tmp_path / "empty")
    assert (tmp_path / "empty" / "config.json").is_file() and res.files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        export_compressed_tensors(model, full)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
