"""Hotword biasing, measured after the contextual-biasing protocol, beside Whisper tiny.en.

    python -m experiments.benchmarks.hotwords [distractors=[0,100,500]] [limit=N]

Each held-out test utterance gets a bias list: its own names and rare words (seen fewer than
5 times in the training transcripts) plus N distractors of the same kind, shuffled
(experiments/data/bias.py). Scored per condition: overall WER, B-WER on the reference words
in the list, U-WER on the others (metrics.biased_wer); "no list" scores the same words with
no list in the prompt.

Checkpoints: `hotwords` is the base aligned with lists in half of its training prompts
(`experiment=hotwords`), `plain` the same recipe without lists (`train.hotwords.p=0`, the
compression baseline); both are aligned first when missing (cached by their align key).
`model=` picks the model of all three (default: the default model's). `base` is that model's
base checkpoint as built, never shown a list: whether its LLM uses a list unprompted
(`systems=[base] model=smollm2`).
Whisper tiny.en (faster-whisper, greedy) gets the same lists as `hotwords=` (its prompt keeps
the last ~223 tokens of a long list). Writes hotwords.json, hotwords.md and hotwords.png
(B-WER against list size).
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

# Each system's label ({model}: model= or "default") and plot style, in plot order.
SYSTEMS = {
    "hotwords": ("aligned with lists", "o-"),
    "plain": ("aligned without lists", "s:"),
    "base": ("{model} base, never shown a list", "d-."),
    "whisper": ("Whisper tiny.en (hotwords=)", "^--"),
}


def aligned_checkpoint(overrides: list[str]) -> Path:
    """The checkpoint `python -m experiments.run experiment=hotwords <overrides>` aligns
    (aligned here if its align key has no checkpoint yet)."""
    from experiments import run
    from experiments.training.base import default_config

    cfg = default_config(["experiment=hotwords", *overrides])
    state = run.prepare(cfg, {})
    state |= run.align(cfg, state)
    return Path(state["checkpoint"])


def whisper_hotwords(rows: list[dict], lists: list[list[str]] | None, threads: int = 0) -> list[str | None]:
    """Whisper tiny.en transcripts, each with its list as faster-whisper's `hotwords=`."""
    import logging

    from faster_whisper import WhisperModel

    from experiments.data.audio import load_audio
    from qwen2_audio_vllm.whisper_weights import model_bin

    logging.getLogger("faster_whisper").setLevel(logging.WARNING)
    model = WhisperModel(str(model_bin("tiny.en").parent), device="cpu", compute_type="float32", cpu_threads=threads)
    out = []
    for i, row in enumerate(tqdm(rows, desc="whisper tiny.en", unit="clip")):
        words = lists[i] if lists else None
        segments, _ = model.transcribe(load_audio(row["audio_filepath"]), language="en", beam_size=1, vad_filter=False,
                                       without_timestamps=True, condition_on_previous_text=False,
                                       hotwords=" ".join(words) if words else None)
        out.append(" ".join(s.text.strip() for s in segments).strip())
    return out


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ns = result["distractors"]
    for name, (_, style) in SYSTEMS.items():
        conds = result["systems"].get(name)
        if not conds:
            continue
        line = ax.plot(ns, [100 * conds[f"n{n}"]["b_wer"] for n in ns], style, label=result["labels"][name])[0]
        ax.axhline(100 * conds["none"]["b_wer"], color=line.get_color(), lw=0.8, ls=(0, (1, 3)))
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.set_xlabel("distractors in the bias list (N)")
    ax.set_ylabel("B-WER on the listed words (%)")
    ax.set_title("B-WER against list size (dotted: the same system with no list)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(result: dict) -> str:
    lines = ["| system | list | WER | B-WER | U-WER |", "|---|---|---|---|---|"]
    for name, conds in result["systems"].items():
        for cond, m in conds.items():
            label = "no list" if cond == "none" else f"own words + {cond[1:]} distractors"
            lines.append(f"| {result['labels'][name]} | {label} | {m['wer']:.1%} | {m['b_wer']:.1%} | {m['u_wer']:.1%} |")
    return "\n".join(lines)


@hydra.main(config_path="../../conf/apps", config_name="hotwords", version_base=None)
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from experiments.data import read_manifest
    from experiments.data.bias import bias_lists, bias_words, distractor_pool, word_counts
    from experiments.evaluate import transcribe
    from experiments.metrics import biased_wer
    from experiments.report import write_json_atomic
    from experiments.serving.engine import close_llm, make_llm, quiet_vllm
    from experiments.training.base import default_base, default_manifests

    unknown = sorted(set(cfg.systems) - SYSTEMS.keys())
    if unknown:
        raise SystemExit(f"systems={list(cfg.systems)}: {unknown} unknown; expected one of {', '.join(SYSTEMS)}")
    quiet_vllm(cfg.verbose)
    out = Path(HydraConfig.get().runtime.output_dir)
    manifests = default_manifests()
    counts = word_counts([r["text"] for r in read_manifest(manifests["train"])])
    rows = read_manifest(manifests[cfg.split])[: cfg.limit or None]
    texts = [r["text"] for r in rows]
    pool = distractor_pool(counts, [w for t in texts for w in bias_words(t, counts)])
    lists = {n: bias_lists(texts, counts, n, pool, cfg.seed) for n in cfg.distractors}
    result: dict = {"split": cfg.split, "clips": len(rows), "distractors": list(cfg.distractors), "pool": len(pool),
                    "bias_words_per_utterance": sum(len(x) for x in lists[0]) / max(1, len(rows)),
                    "systems": {}, "labels": {}, "checkpoints": {}, "seconds": {}}
    # plain is hotwords' recipe (overrides included) without lists; model= applies to all three
    recipe = ([f"model={cfg.model}"] if cfg.model else []) + list(cfg.hotwords_overrides)
    systems = {"hotwords": recipe, "plain": [*recipe, "train.hotwords.p=0"]}
    for name in cfg.systems:
        t0 = time.perf_counter()
        result["labels"][name] = SYSTEMS[name][0].format(model=cfg.model or "default")
        if name == "whisper":
            run = lambda ls: whisper_hotwords(rows, ls, cfg.threads)  # noqa: E731
            conds = {"none": biased_wer(texts, run(None), lists[0])}
            conds |= {f"n{n}": biased_wer(texts, run(lists[n]), lists[n]) for n in cfg.distractors}
        else:
            ckpt = default_base(cfg.model)[0] if name == "base" else aligned_checkpoint(systems[name])
            result["checkpoints"][name] = str(ckpt)
            llm = make_llm(ckpt, **OmegaConf.to_container(cfg.engine, resolve=True))
            try:
                def run(ls, llm=llm):
                    batch = [r | {"hotwords": ls[i] or None} if ls else r for i, r in enumerate(rows)]
                    return [x["hyp"] for x in transcribe(llm, batch, cfg.max_tokens)]

                conds = {"none": biased_wer(texts, run(None), lists[0])}
                conds |= {f"n{n}": biased_wer(texts, run(lists[n]), lists[n]) for n in cfg.distractors}
            finally:
                close_llm(llm)
        result["systems"][name] = conds
        result["seconds"][name] = time.perf_counter() - t0
        for cond, m in conds.items():
            print(f"[hotwords] {name} {cond}: WER {m['wer']:.1%}, B-WER {m['b_wer']:.1%} ({m['bias_words']} words), "
                  f"U-WER {m['u_wer']:.1%}")
        write_json_atomic(out / "hotwords.json", result)  # a crash in a later system keeps these
    (out / "hotwords.md").write_text(table(result) + "\n")
    write_plot(result, out / "hotwords.png")
    print(f"[hotwords] -> {out / 'hotwords.json'}, hotwords.md, hotwords.png")


if __name__ == "__main__":
    main()
