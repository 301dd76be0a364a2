"""Does Whisper's encoder hear as well over each clip's real frames as over its 30 s window?

    python -m experiments.benchmarks.tower_window [train=1000] [epochs=30]

OpenAI trained Whisper on whole 30 s windows, every position attending to the padding;
Qwen2-Audio (and this fork's real-frames encoder, `qwen2_audio_vllm.encoder`) masks the
padding out of attention, and the fork also cuts it off. So the default base's tower
(Whisper tiny.en, frozen) sees inputs of a kind it was never trained on. This measures what
that costs: the same probe, a character CTC head on the frozen pooled frames (Linear ->
convolutions -> Linear over a-z, space and apostrophe, greedy decoding, no language model), is
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

ALPHABET = " 'abcdefghijklmnopqrstuvwxyz"  # normalised transcripts: lower case, no other punctuation


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


class CtcProbe(torch.nn.Module):
    """Frames (B, T, d) -> character log-probabilities (B, T, len(ALPHABET) + 1), blank last:
    a per-frame MLP with two 5-frame convolutions (the encoder already gives each frame its
    context; a convolution trains in seconds on 2 cores where a recurrent layer takes minutes)."""

    def __init__(self, d: int, hidden: int = 256) -> None:
        super().__init__()
        self.inp = torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, hidden), torch.nn.GELU())
        self.conv = torch.nn.Sequential(torch.nn.Conv1d(hidden, hidden, 5, padding=2), torch.nn.GELU(),
                                        torch.nn.Conv1d(hidden, hidden, 5, padding=2), torch.nn.GELU())
        self.out = torch.nn.Linear(hidden, len(ALPHABET) + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)  # (B, T, hidden)
        return self.out(self.conv(h.transpose(1, 2)).transpose(1, 2)).log_softmax(-1)


def greedy(log_probs: torch.Tensor, length: int) -> str:
    ids = log_probs[:length].argmax(-1).tolist()
    blank = len(ALPHABET)
    return "".join(ALPHABET[i] for j, i in enumerate(ids) if i != blank and (j == 0 or ids[j - 1] != i))


def train_probe(train: list[torch.Tensor], texts: list[str], epochs: int, seed: int, batch: int = 32) -> CtcProbe:
    from experiments.training.cache import pad_frames

    torch.manual_seed(seed)
    probe = CtcProbe(train[0].shape[1])
    opt = torch.optim.AdamW(probe.parameters(), lr=2e-3)
    targets = [[ALPHABET.index(c) for c in t if c in ALPHABET] for t in texts]
    order = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="probe", unit="epoch"):
        for idx in torch.randperm(len(train), generator=order).split(batch):
            x, lengths = pad_frames([train[i] for i in idx])
            lp = probe(x).transpose(0, 1)  # (T, B, C)
            flat = torch.tensor([c for i in idx for c in targets[i]])
            loss = torch.nn.functional.ctc_loss(lp, flat, lengths, torch.tensor([len(targets[i]) for i in idx]),
                                                blank=len(ALPHABET), reduction="mean", zero_infinity=True)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return probe.eval()


@hydra.main(config_path="../../conf/apps", config_name="tower_window", version_base=None)
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from experiments.data import prepare, read_manifest
    from experiments.data.audio import load_audio
    from experiments.metrics import normalize_text, wer_cer, wer_difference
    from experiments.report import write_json_atomic
    from qwen2_audio_vllm.checkpoint import load_model, load_processor

    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    base = Path(cfg.checkpoint) if cfg.checkpoint else prepare.ensure_random_tiny()
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
        probe = train_probe(frames["train"], texts["train"], cfg.epochs, cfg.seed)
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
