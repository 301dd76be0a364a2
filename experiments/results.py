"""Regenerate every figure the README and docs/ quote, with one command:

    make results                                   # all of them (hours on a 2-core CPU)
    .venv/bin/python -m experiments.results 'names=[fork,cache,features]'   # some of them
    .venv/bin/python -m experiments.results list=true                      # the entries and commands

Each entry runs the command the README names beside its figures, on this machine, one
after the other (a failing one is recorded and the rest go on). Everything lands in
`outputs/results/<date>-<time>/`: `<entry>.log` (the command's whole output), the JSON
files the commands write, and `results.md`, which opens with the machine, git SHA and
package versions and gives, per entry, its command, exit status, wall time and the end of
its output (the tables). Copy the tables into the page named beside each entry.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import hydra
from omegaconf import DictConfig

Command = Callable[[Path, Path, Mapping[str, Path]], list[str]]
PY = [sys.executable, "-m"]


def _evaluate(name: str, split: str) -> Command:
    """experiments.evaluate of the base checkpoint on one split of its manifests."""
    return lambda out, base, m: [*PY, "experiments.evaluate", f"checkpoint={base}", f"data.manifest={m[split]}",
                                 f"hydra.run.dir={out / name}"]


def _demo(name: str, module: str) -> Command:
    """`module demo=true` measuring the entry's base checkpoint, its outputs under out/name."""
    return lambda out, base, m: [*PY, module, "demo=true", f"model={base}", f"out_dir={out / name}",
                                 f"hydra.run.dir={out / name}"]


def _anchor(name: str) -> Command:
    """experiments.benchmarks.whisper_anchor: the entry's base beside Whisper tiny.en on every test split."""
    return lambda out, base, m: [*PY, "experiments.benchmarks.whisper_anchor", f"checkpoint={base}", ALL_SPLITS,
                                 f"hydra.run.dir={out / name}"]


def _smollm2_hotwords(name: str, *args: str) -> Command:
    """experiments.benchmarks.hotwords on the smollm2 base, aligned with lists at SMOLLM2_HOTWORDS."""
    return lambda out, base, m: [*PY, "experiments.benchmarks.hotwords", "model=smollm2", *args,
                                 f"hotwords_overrides=[{','.join(SMOLLM2_HOTWORDS)}]", f"hydra.run.dir={out / name}"]


# entries run on another model's base than the default (tiny): name -> model config
ENTRY_MODELS = {"small_base_wer": "small", "small_base_wer_noisy": "small",
                "scratch_base_wer": "tiny-scratch", "scratch_base_wer_noisy": "tiny-scratch",
                "smollm2_anchor": "smollm2", "streaming_smollm2": "smollm2", "long_form_smollm2": "smollm2",
                "hotwords_smollm2": "smollm2", "hotwords_smollm2_lists": "smollm2",
                "hotwords_smollm2_prose": "smollm2"}
# experiment=hotwords on the smollm2 base: its stack-4 projector, lists of at most 20
# distractors (a 100-word list would pad training rows of ~60 tokens to ~500), 300 steps
SMOLLM2_HOTWORDS = ['"projector.stack=4"', '"train.steps=300"', '"train.lr=1e-3"', '"train.batch_size=8"',
                    '"train.hotwords.max_distractors=20"']
ALL_SPLITS = "splits=[test,test_noisy,test_prose,test_prose_noisy]"


def entries() -> dict[str, tuple[str, Command]]:
    """name -> (README section, argv given (output dir, base checkpoint, manifests)); the
    base is the default model's, or ENTRY_MODELS' (built, as `make run model=...` would)."""
    return {
        "base_wer": ("docs/testbed.md: the base's WER/CER, clean held-out split", _evaluate("base_wer", "test")),
        "base_wer_noisy": ("docs/testbed.md: the base's WER/CER, noisy held-out split (10 dB)",
                           _evaluate("base_wer_noisy", "test_noisy")),
        "scratch_base_wer": ("docs/testbed.md: model=tiny-scratch's WER/CER, clean held-out split",
                             _evaluate("scratch_base_wer", "test")),
        "scratch_base_wer_noisy": ("docs/testbed.md: model=tiny-scratch's WER/CER, noisy held-out split (10 dB)",
                                   _evaluate("scratch_base_wer_noisy", "test_noisy")),
        "small_base_wer": ("docs/testbed.md: model=small's WER/CER, clean held-out split",
                           _evaluate("small_base_wer", "test")),
        "small_base_wer_noisy": ("docs/testbed.md: model=small's WER/CER, noisy held-out split (10 dB)",
                                 _evaluate("small_base_wer_noisy", "test_noisy")),
        "whisper_anchor": ("README / docs/testbed.md: Whisper tiny.en itself beside the base, paired",
                           _anchor("whisper_anchor")),
        "smollm2_anchor": ("README / docs/smollm2.md: the smollm2 base (built if missing) beside Whisper tiny.en, paired",
                           _anchor("smollm2_anchor")),
        "timestamps": ("README / docs/timestamps.md: boundary error against festival's word times, beside Whisper tiny.en",
                       lambda out, base, m: [*PY, "experiments.benchmarks.timestamps", f"checkpoint={base}",
                                             f"hydra.run.dir={out / 'timestamps'}"]),
        "hotwords": ("docs/hotwords.md: B-WER / U-WER against list size, beside Whisper tiny.en's hotwords=",
                     lambda out, base, m: [*PY, "experiments.benchmarks.hotwords", f"hydra.run.dir={out / 'hotwords'}"]),
        "tower_quant": ("README / docs/audio-tower.md: the int8 tower against full precision (paired WER, tower and req/s, memory)",
                        lambda out, base, m: [*PY, "experiments.benchmarks.tower_quant",
                                              f"hydra.run.dir={out / 'tower_quant'}"]),
        "tower_window": ("docs/testbed.md: Whisper's tower over real frames vs its 30 s window (dev WER, CTC probe)",
                         lambda out, base, m: [*PY, "experiments.benchmarks.tower_window",
                                               f"hydra.run.dir={out / 'tower_window'}"]),
        "cost_split": ("docs/testbed.md: a model with 7B's cost split", lambda out, base, m: [
            *PY, "experiments.benchmarks.cost_split", f"hydra.run.dir={out / 'cost_split'}"]),
        "compression": ("README / docs/compression.md: the compression comparison (paired WER vs the baseline, Pareto plot)",
                        lambda out, base, m: [*PY, "experiments.run", "-m", "experiment=compression",
                                              f"results_dir={out / 'compression'}",
                                              f"hydra.sweep.dir={out / 'compression' / 'runs'}"]),
        "compression_speed": ("README / docs/compression.md: req/s and TTFT on a model with 7B's cost split, 7B prefill FLOPs",
                              lambda out, base, m: [*PY, "experiments.benchmarks.compression_speed",
                                                    f"hydra.run.dir={out / 'compression_speed'}"]),
        "fork": ("README / docs/audio-tower.md: the fork vs upstream vLLM per clip length", lambda out, base, m: [
            *PY, "experiments.benchmarks.fork", f"hydra.run.dir={out / 'fork'}"]),
        "cache": ("docs/design.md: align step time, encoder-output cache vs recomputing", lambda out, base, m: [
            *PY, "experiments.benchmarks.cache", "steps=20", f"hydra.run.dir={out / 'cache'}"]),
        "features": ("docs/serving.md: cached encoder frames as requests vs raw audio", lambda out, base, m: [
            *PY, "experiments.benchmarks.features", "requests=64", "rounds=5", f"hydra.run.dir={out / 'features'}"]),
        "online": ("docs/serving.md: online serving, baseline vs FP8 KV cache", lambda out, base, m: [
            *PY, "experiments.benchmarks.serving", f"checkpoint={base}", f"manifest={m['test']}", "requests=200",
            "concurrency=8", "compare=[fp8_kv]", f"hydra.run.dir={out / 'online'}"]),
        "train_bench": ("docs/gpu-7b.md: align step cost per projector, tiny dims measured", lambda out, base, m: [
            *PY, "experiments.run", "stages=[train_bench]", f"hydra.run.dir={out / 'train_bench'}"]),
        "train_bench_7b": ("docs/gpu-7b.md: the 7B align estimate", lambda out, base, m: [
            *PY, "experiments.run", "model=qwen2-audio-7b-random", "stages=[train_bench]",
            "train_bench.estimate_only=true", f"hydra.run.dir={out / 'train_bench_7b'}"]),
        "long_form": ("docs/long-audio.md: the long-form demo", _demo("long_form", "experiments.serving.long_form")),
        "streaming": ("docs/streaming.md: streamed vs whole-utterance WER, cost per update",
                      _demo("streaming", "experiments.serving.streaming")),
        "streaming_smollm2": ("docs/streaming.md: the same on the smollm2 base",
                              _demo("streaming_smollm2", "experiments.serving.streaming")),
        "long_form_smollm2": ("docs/long-audio.md: the long-form demo on the smollm2 base",
                              _demo("long_form_smollm2", "experiments.serving.long_form")),
        "hotwords_smollm2": ("docs/hotwords.md: the smollm2 base, never shown a list, given one", lambda out, base, m: [
            *PY, "experiments.benchmarks.hotwords", "model=smollm2", "systems=[base,whisper]", "distractors=[0,100]",
            f"hydra.run.dir={out / 'hotwords_smollm2'}"]),
        "hotwords_smollm2_lists": ("docs/hotwords.md: the smollm2 base aligned with and without lists (LoRA r8, 300 steps)",
                                   _smollm2_hotwords("hotwords_smollm2_lists", "systems=[hotwords,plain]",
                                                     "distractors=[0,100,500]")),
        "hotwords_smollm2_prose": ("docs/hotwords.md: the same, the base and Whisper tiny.en on test_prose",
                                   _smollm2_hotwords("hotwords_smollm2_prose", "split=test_prose",
                                                     "systems=[hotwords,base,whisper]", "distractors=[0,100]")),
    }


def run_all(commands: Mapping[str, tuple[str, list[str]]], out: Path, tail_lines: int = 40) -> Path:
    """Run each (section, argv) in turn, logging to `out/<name>.log`; rewrite
    `out/results.md` and `out/index.json` after each so a stopped run keeps what it has."""
    from experiments.report import run_metadata

    out.mkdir(parents=True, exist_ok=True)
    meta = run_metadata()
    done: dict[str, dict] = {}
    for name, (section, argv) in commands.items():
        print(f"[results] {name}: {shlex.join(argv)}", flush=True)
        t0 = time.perf_counter()
        with open(out / f"{name}.log", "w") as log:
            rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1]).returncode
        lines = (out / f"{name}.log").read_text(errors="replace").splitlines()
        done[name] = {"section": section, "command": shlex.join(argv), "returncode": rc,
                      "seconds": time.perf_counter() - t0, "tail": lines[-tail_lines:]}
        (out / "index.json").write_text(json.dumps({"metadata": meta, "entries": done}, indent=1))
        (out / "results.md").write_text(render(meta, done))
    return out / "results.md"


def render(meta: Mapping, done: Mapping[str, dict]) -> str:
    packages = ", ".join(f"{k} {v}" for k, v in meta["packages"].items())
    head = [
        "# README numbers, regenerated", "",
        f"- machine: {meta['platform']}, {meta['cpu_count']} CPUs, GPU {meta['cuda_device'] or 'none'} ({meta['hostname']})",
        f"- code: git {meta['git_sha']}{' (uncommitted changes)' if meta['git_dirty'] else ''}",
        f"- packages: {packages}, Python {meta['python']}",
        f"- started {meta['created_utc']}", "",
    ]
    body = []
    for name, r in done.items():
        status = "ok" if r["returncode"] == 0 else f"FAILED (exit {r['returncode']}, see {name}.log)"
        body += [f"## {name}: {r['section']}", "", f"`{r['command']}`: {status}, {r['seconds']:.0f} s", "",
                 "```", *r["tail"], "```", ""]
    return "\n".join(head + body)


@hydra.main(config_path="../conf/apps", config_name="results", version_base=None)
def main(cfg: DictConfig) -> None:
    table, out = entries(), Path(cfg.out)
    if unknown := [n for n in cfg.names if n not in table]:
        raise SystemExit(f"unknown entries {unknown}; expected some of {list(table)}")
    names = list(cfg.names) or list(table)
    if cfg.list:
        placeholder = {"test": Path("<test manifest>"), "test_noisy": Path("<noisy test manifest>")}
        for n in names:
            print(f"{n:15s} {shlex.join(table[n][1](out, Path('<base checkpoint>'), placeholder))}")
        return
    from experiments.training.base import default_base

    bases = {model: default_base(model) for model in {ENTRY_MODELS.get(n) for n in names}}  # built once if missing
    commands = {n: (table[n][0], table[n][1](out, *bases[ENTRY_MODELS.get(n)])) for n in names}
    print(run_all(commands, out))

if __name__ == "__main__":
    main()
