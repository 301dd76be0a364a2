"""One way in: every user-facing job is `experiments.run` or a Hydra app beside it, each app's
config composes, the README lists them all, and bad values get a message saying what to
give."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APPS = {  # module -> its config in conf/apps/
    "experiments.evaluate": "evaluate",
    "experiments.results": "results",
    "experiments.derive": "derive",
    "experiments.prepare": "prepare",
    "experiments.benchmarks.fork": "bench_fork",
    "experiments.benchmarks.cache": "bench_cache",
    "experiments.benchmarks.features": "bench_features",
    "experiments.benchmarks.serving": "bench_serving",
    "experiments.benchmarks.cost_split": "cost_split",
    "experiments.benchmarks.whisper_anchor": "whisper_anchor",
    "experiments.benchmarks.tower_window": "tower_window",
    "experiments.benchmarks.compression_speed": "compression_speed",
    "experiments.benchmarks.timestamps": "timestamps",
    "experiments.benchmarks.hotwords": "hotwords",
    "experiments.benchmarks.tower_quant": "tower_quant",
    "experiments.serving.client": "client",
    "experiments.serving.long_form": "long_form",
    "experiments.serving.streaming": "streaming",
}


def entry_modules() -> set[str]:
    """Modules that run something under `if __name__ == "__main__":`."""
    out = set()
    for f in [*ROOT.glob("experiments/**/*.py"), *ROOT.glob("qwen2_audio_vllm/**/*.py")]:
        if re.search(r'^if __name__ == "__main__":', f.read_text(), re.M):
            out.add(".".join(f.relative_to(ROOT).with_suffix("").parts))
    return out


def test_every_entry_point_is_hydra_and_listed_in_the_readme():
    assert entry_modules() == {*APPS, "experiments.run"}
    readme = (ROOT / "README.md").read_text()
    for module, config in APPS.items():
        source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
        assert f'config_name="{config}"' in source and "argparse" not in source, module
        assert f"python -m {module}" in readme, module


@pytest.mark.parametrize("config", sorted(set(APPS.values())))
def test_app_config_composes(config):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf" / "apps"), version_base=None):
        cfg = compose(config)
    first = (ROOT / "conf" / "apps" / f"{config}.yaml").read_text().splitlines()[0]
    assert re.match(r"# python -m [\w.]+", first), "the file opens with its command"
    assert len(cfg) > 0


@pytest.mark.slow
@pytest.mark.parametrize("argv,message", [
    (["experiments.benchmarks.fork", "rounds=2"], "at least 5 alternating rounds"),
    (["experiments.serving.long_form", "strategy=bogus"], "expected segments (cut at pauses) or whole"),
    (["experiments.serving.long_form"], "give audio files (files=[a.wav,b.wav]), or demo=true"),
    (["experiments.serving.client", "mode=bogus"], "expected single (one request), simulation (a load run) or realtime"),
    (["experiments.serving.client", "mode=realtime"], "mode=realtime needs manifest=FILE"),
    (["experiments.serving.streaming"], "give audio files (files=[a.wav]), or demo=true, or compare=[demo out_dirs]"),
    (["experiments.serving.streaming", "compare=[nowhere]"], "compare: no streaming.json in ['nowhere']"),
    (["experiments.serving.streaming", "files=[a.wav]", "stream.chunk_s=0.01"], "stream.chunk_s=0.01"),
    (["experiments.benchmarks.serving", "checkpoint=/nope", "compare=[nope]"], "unknown serve configs ['nope']"),
    (["experiments.benchmarks.cost_split", "models=[nope]"], "no conf/model/nope.yaml; choose from"),
    (["experiments.benchmarks.hotwords", "systems=[base,bogus]"], "['bogus'] unknown; expected one of hotwords, plain, base, whisper"),
])
def test_bad_values_say_what_to_give(argv, message, tmp_path):
    run = subprocess.run([sys.executable, "-m", *argv, f"hydra.run.dir={tmp_path}"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert run.returncode != 0 and message in run.stderr, run.stderr[-2000:]


def test_default_config_composes_inside_another_app():
    """experiments.results and long_form call training.base.default_base from inside their
    own Hydra app; composing the main config there must work and leave the app's state."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from experiments.training.base import default_config

    with initialize_config_dir(str(ROOT / "conf" / "apps"), version_base=None):
        outer = compose("results")
        cfg = default_config()
        assert cfg.model.name == "tiny" and cfg.data.name == "synthetic"
        assert GlobalHydra.instance().is_initialized() and compose("results").names == outer.names


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports, at the top or inside a function."""
    import ast

    modules = {}
    for f in [*ROOT.glob("experiments/**/*.py"), *ROOT.glob("qwen2_audio_vllm/**/*.py"), *ROOT.glob("projectors/**/*.py")]:
        parts = f.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f

    def owner(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for name, f in modules.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        targets = []
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets += [f"{base}.{a.name}" for a in node.names]
        graph[name] = {owner(t) for t in targets} - {"", name}
    return graph


def test_the_project_imports_one_way():
    """No import circle, not even through a function-level import: a circle means a module
    does two jobs (the base checkpoint was once built by data preparation, which the
    trainer's export path imported back)."""
    graph = import_graph()
    assert "experiments.training.base" in graph["experiments.run"]  # the walk sees function-level imports
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for nxt in sorted(graph[module]):
            assert state.get(nxt) != "open", f"import circle: {' -> '.join([*path, module, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
