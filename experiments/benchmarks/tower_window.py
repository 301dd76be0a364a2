"""Does Whisper's encoder hear as well over each clip's real frames as over its 30 s window?

    python -m experiments.benchmarks.tower_window [train=1000] [epochs=30]

OpenAI trained Whisper on whole 30 s windows, every position attending to the padding;
Qwen2-Audio (and this fork's real-frames encoder, `qwen2_audio_vllm.encoder`) masks the
padding out of attention, and the fork also cuts it off. So the default base's tower
(Whisper tiny.en, frozen) sees inputs of a kind it was never trained on. This measures what
that costs: the same probe, a character CTC head on the frozen pooled frames
(experiments.timestamps.CtcHead: Linear -> convolutions -> Linear over a-z, space and
apostrophe, one output per frame; greedy decoding, no language model), is
trained on `train` training clips and scored on the dev split (training voices, sentences
never trained on), once on each kind of frames:

  trimmed  what the testbed uses: real frames only, padding masked (encoder.encode, trim=True)
  window   Whisper's own computation: the whole 3000-frame window, no mask, then the clip's
           pooled frames kept (the positions past the clip are dropped, as Qwen2-Audio does)

It reports each one's dev WER/CER with 95 % bootstrap intervals and the paired difference
trimmed - window (`metrics.wer_difference`), plus the encoder seconds each took.
`tower_window.json` holds it all.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from tqdm import tqdm


@torch.no_grad()
def frames_of(tower, fe, audios: list, window: bool, batch: int = 16) -> list[torch.Tensor]:
    """Pooled frames (T_i, d) of each clip: trimmed (the fork's path) or over the whole window."""
    from qwen2_audio_vllm.encoder import _encode, encode, mel_features, output_lengths, pad_mels

    out = []
    for i in tqdm(range(0, len(audios), batch), desc="window" if window else "trimmed", unit="batch"):
        chunk = audios[i : i + batch]
        if window:
            f = fe(chunk, sampling_rate=fe.sampling_rate, return_attention_mask=True, return_tensors="pt")
            pooled = output_lengths(f["attention_mask"].sum(-1))[1]
            full = torch.full((len(chunk),), f["input_features"].shape[-1] // 2)  # every position valid: no mask
            x = _encode(tower, f["input_features"], full)
        else:
            x, pooled = encode(tower, *pad_mels([mel_features(fe, a) for a in chunk]), trim=True)
        out += [x[j, :n].clone() for j, n in enumerate(pooled.tolist())]
    return out


@hydra.main(config_path="../../conf/apps", config_name="tower_window", version_base=None)
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from experiments.data import prepare, read_manifest
    from experiments.data.audio import load_audio
    from experiments.metrics import normalize_text, wer_cer, wer_difference
    from experiments.report import write_json_atomic
    from experiments.timestamps import greedy, train_ctc_head
    from experiments.training.base import ensure_random_tiny
    from qwen2_audio_vllm.checkpoint import load_model, load_processor

    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    base = Path(cfg.checkpoint) if cfg.checkpoint else ensure_random_tiny()
    if not (base / "config.json").is_file():
        raise SystemExit(f"checkpoint={base} is not a checkpoint directory (no config.json); give one whose "
                         "audio_tower to probe, or leave checkpoint unset for the default tiny checkpoint")
    manifests = prepare.ensure_synthetic()
    rows = {"train": read_manifest(manifests["train"])[: cfg.train], "dev": read_manifest(manifests["dev"])}
    tower = load_model(base).audio_tower.float().eval()
    fe = load_processor(base).feature_extractor
    audio = {s: [load_audio(r["audio_filepath"]) for r in rs] for s, rs in rows.items()}
    texts = {s: [normalize_text(r["text"]) for r in rs] for s, rs in rows.items()}
    result: dict = {"checkpoint": str(base), "train_clips": len(rows["train"]), "dev_clips": len(rows["dev"]),
                    "epochs": cfg.epochs}
    hyps = {}
    for mode in ("trimmed", "window"):
        t0 = time.perf_counter()
        frames = {s: frames_of(tower, fe, audio[s], window=mode == "window") for s in rows}
        seconds = time.perf_counter() - t0
        probe = train_ctc_head(frames["train"], texts["train"], cfg.epochs, cfg.seed)
        with torch.no_grad():
            hyps[mode] = [greedy(probe(f[None])[0], f.shape[0]) for f in frames["dev"]]
        result[mode] = wer_cer(texts["dev"], hyps[mode]) | {"encoder_seconds": seconds}
        print(f"[tower_window] {mode}: dev WER {result[mode]['wer']:.1%} [{result[mode]['wer_ci_low']:.1%}, "
              f"{result[mode]['wer_ci_high']:.1%}], CER {result[mode]['cer']:.1%}, encoder {seconds:.0f} s")
    result["trimmed_minus_window"] = d = wer_difference(texts["dev"], hyps["trimmed"], hyps["window"])
    result["examples"] = [{"ref": r, **{m: hyps[m][i] for m in hyps}} for i, r in enumerate(texts["dev"][:5])]
    out = Path(HydraConfig.get().runtime.output_dir)
    write_json_atomic(out / "tower_window.json", result)
    print(f"[tower_window] trimmed - window, paired: {100 * d['wer_delta']:+.1f} points "
          f"[{100 * d['wer_delta_ci_low']:+.1f}, {100 * d['wer_delta_ci_high']:+.1f}] -> {out / 'tower_window.json'}")


if __name__ == "__main__":
    main()
