"""The issue-#5 zoo entries are registered with valid defaults, and importing the zoo stays
light (no heavy optional package imported until an entry is used)."""

import subprocess
import sys

import pytest

from optbrain.app.zoo import ZooEntry, get, names
from optbrain.recipe import Recipe

ENTRIES = {
    "fashion-cnn": "accuracy",
    "efficientnet-lite0": "top1",
    "minilm": "lee50_pearson",
    "smollm2-135m": "perplexity",
}


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_registered_with_valid_defaults(name):
    e = get(name)
    assert name in names() and isinstance(e, ZooEntry)
    assert e.primary == ENTRIES[name]
    assert e.inputs in ("all", "first")
    Recipe.coerce(e.recipe)  # raises on an invalid default recipe
    assert e.notes and e.description


def test_lower_is_better():
    assert get("smollm2-135m").lower_is_better == ("perplexity",)
    assert get("efficientnet-lite0").lower_is_better == ("kl",)
    assert get("minilm").lower_is_better == () == get("fashion-cnn").lower_is_better
    assert ZooEntry("x", "", lambda: None, lambda n, s: [], lambda m: {}, "a").lower_is_better == ()


def test_import_is_light():
    heavy = ["transformers", "gensim", "gguf", "PIL", "foolbox", "efficientnet_lite_pytorch"]
    code = f"import sys, optbrain.app.zoo; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_package_names_what_to_install(monkeypatch):
    from optbrain.app.zoo import _common

    with pytest.raises(ImportError, match=r"'no-such-model'.*pip install nothing"):
        _common.package_dir("optbrain_no_such_package", "no-such-model", "pip install nothing")
    monkeypatch.setenv("OPTBRAIN_FASHION_MNIST", "/nonexistent")
    from optbrain.app.zoo import fashion

    with pytest.raises(ImportError, match="apt-get install dataset-fashion-mnist"):
        fashion.data_dir()
