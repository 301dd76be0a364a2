"""scripts/bootstrap.sh on a machine that lacks something: one line naming what is missing
and how to get it, and never a half-built venv marked ready or linked as .venv. Each case
stops before any package is installed, in a copy of the files that key the venv and a
fresh cache directory (the real venv and this clone's .venv are never touched)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# a stand-in interpreter that passes the version checks and then fails (or hangs) while
# building the venv, after it has put a few files in place: what an interrupted or failed
# pip install leaves
FAKE_PYTHON = """#!/bin/sh
case "$1" in
  -m) mkdir -p "$3/bin" && touch "$3/bin/half-installed"; {action} ;;
  -V) echo "Python 3.11.7" ;;
  *) exit 0 ;;
esac
"""


def clone(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("setup.cfg", "pyproject.toml", "scripts/bootstrap.sh"):
        shutil.copy(ROOT / name, repo / name)
    return repo


def bootstrap(repo: Path, cache: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(repo / "scripts" / "bootstrap.sh"), *args], capture_output=True, text=True,
                          timeout=60, env=os.environ | {"Q2AP_CACHE": str(cache)} | env)


def fake_python(tmp_path: Path, action: str) -> Path:
    path = tmp_path / "python3.11"
    path.write_text(FAKE_PYTHON.format(action=action))
    path.chmod(0o755)
    return path


def assert_nothing_ready(repo: Path, cache: Path) -> None:
    assert not list(cache.glob("venv-*/.q2ap-ready")) and not list(cache.glob("venv-*/bin"))
    assert not (repo / ".venv").exists() and not (repo / ".venv").is_symlink()


def one_error_line(run: subprocess.CompletedProcess) -> str:
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("[bootstrap] error:")]
    assert len(errors) == 1, run.stderr
    return errors[0]


def test_no_python311_names_what_to_install(tmp_path):
    repo, cache = clone(tmp_path), tmp_path / "cache"
    line = one_error_line(bootstrap(repo, cache, "--venv-only", PYTHON="python3.11-nowhere"))
    assert "no python3.11-nowhere on PATH" in line and "install Python 3.11" in line and "PYTHON=" in line
    assert_nothing_ready(repo, cache)


def test_another_python_version_is_refused(tmp_path):
    other = tmp_path / "python3.9"
    other.write_text("#!/bin/sh\n[ \"$1\" = -V ] && echo 'Python 3.9.2'\nexit 1\n")
    other.chmod(0o755)
    line = one_error_line(bootstrap(clone(tmp_path), tmp_path / "cache", "--venv-only", PYTHON=str(other)))
    assert "is Python 3.9.2, expected Python 3.11" in line


def test_too_little_disk_is_refused_before_building(tmp_path):
    repo, cache = clone(tmp_path), tmp_path / "cache"
    line = one_error_line(bootstrap(repo, cache, "--venv-only", Q2AP_VENV_GIB="1000000"))
    assert "GiB free under" in line and "needs about 1000000 GiB" in line and "Q2AP_CACHE" in line
    assert_nothing_ready(repo, cache)


def test_no_apt_get_is_refused_before_the_venv(tmp_path):
    """Without apt-get (or dpkg) the speech engines cannot be installed: said at once, not
    after the venv's minutes. --venv-only does not need them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        for tool in Path(d).glob("*") if Path(d).is_dir() else []:
            if tool.name not in ("apt-get", "dpkg") and not (bin_dir / tool.name).exists():
                (bin_dir / tool.name).symlink_to(tool)
    repo, cache = clone(tmp_path), tmp_path / "cache"
    line = one_error_line(bootstrap(repo, cache, PATH=str(bin_dir)))
    assert "speech engines espeak-ng festival" in line and "no apt-get" in line and "--venv-only" in line
    assert_nothing_ready(repo, cache)


def test_a_failed_venv_build_is_removed_and_never_marked_ready(tmp_path):
    repo, cache = clone(tmp_path), tmp_path / "cache"
    run = bootstrap(repo, cache, "--venv-only", PYTHON=str(fake_python(tmp_path, "exit 1")))
    assert run.returncode != 0 and "removed" in run.stdout and "the next run rebuilds it" in run.stdout
    assert_nothing_ready(repo, cache)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_venv_build_is_removed(tmp_path, sig):
    repo, cache = clone(tmp_path), tmp_path / "cache"
    env = os.environ | {"Q2AP_CACHE": str(cache), "PYTHON": str(fake_python(tmp_path, "sleep 30"))}
    proc = subprocess.Popen(["bash", str(repo / "scripts" / "bootstrap.sh"), "--venv-only"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 30
    while not list(cache.glob("venv-*/bin/half-installed")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(cache.glob("venv-*/bin/half-installed")), "the stand-in build never started"
    os.killpg(proc.pid, sig)  # as Ctrl-C does: the whole foreground group
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "removed" in out
    assert_nothing_ready(repo, cache)
