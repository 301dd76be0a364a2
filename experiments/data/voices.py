"""Speech synthesis engines and voices for the synthetic corpus.

Three engines, all from Debian packages that scripts/bootstrap.sh installs:

- espeak-ng (formant synthesis): accents x voice variants; the test accents and variants
  are never used in training;
- festival (diphone and HTS synthesis): kal (diphone) trains, slt (HTS) tests;
- flite (festival's small sibling): kal16 and rms train, slt and awb test.

A voice here is (engine, voice id); each rendering also draws a speed and a pitch. Speakers
are disjoint between train and test across engines too (slt and awb are never heard in
training, nor are espeak-ng's test accents).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

ESPEAK_TRAIN_ACCENTS = ("en", "en-us", "en-gb-x-rp", "en-029", "en-gb-x-gbcwmd")
ESPEAK_TRAIN_VARIANTS = ("m1", "m2", "m3", "m4", "f1", "f2", "f4", "klatt", "adam", "linda", "steph", "max")
ESPEAK_TEST_ACCENTS = ("en-gb-scotland", "en-gb-x-gbclan", "en-us-nyc")
ESPEAK_TEST_VARIANTS = ("m5", "m6", "f3", "f5", "klatt2", "robert", "annie")

TRAIN_VOICES: dict[str, tuple[str, ...]] = {
    "espeak-ng": tuple(f"{a}+{v}" for a in ESPEAK_TRAIN_ACCENTS for v in ESPEAK_TRAIN_VARIANTS),
    "festival": ("kal_diphone",),
    "flite": ("kal16", "rms"),
}
TEST_VOICES: dict[str, tuple[str, ...]] = {
    "espeak-ng": tuple(f"{a}+{v}" for a in ESPEAK_TEST_ACCENTS for v in ESPEAK_TEST_VARIANTS),
    "festival": ("cmu_us_slt_arctic_hts",),
    "flite": ("slt", "awb"),
}
ENGINES = tuple(TRAIN_VOICES)
APT_PACKAGES = {
    "espeak-ng": "espeak-ng",
    "festival": "festival festvox-kallpc16k festvox-us-slt-hts",
    "flite": "flite",
}


class EngineMissing(RuntimeError):
    """A synthesis engine (or one of its voices) is not installed; the message says how to."""


def install_hint(engine: str) -> str:
    return f"install it with `sudo apt-get install -y {APT_PACKAGES[engine]}` (bash scripts/bootstrap.sh does this)"


def check_engines(engines: tuple[str, ...]) -> None:
    """Raise EngineMissing naming the apt command for each engine not on PATH."""
    unknown = [e for e in engines if e not in APT_PACKAGES]
    if unknown:
        raise ValueError(f"unknown synthesis engines {unknown}; expected some of {list(APT_PACKAGES)}")
    missing = [e for e in engines if shutil.which(e) is None]
    if missing:
        raise EngineMissing("; ".join(f"{e} is not installed: {install_hint(e)}" for e in missing))


@dataclass(frozen=True)
class Rendering:
    """One utterance to synthesise: `speed` and `pitch` are in [0, 1], mapped onto each
    engine's own range."""

    text: str
    engine: str
    voice: str
    speed: float
    pitch: float
    path: Path


def _lerp(lo: float, hi: float, t: float) -> float:
    return lo + (hi - lo) * t


def espeak_ng(r: Rendering) -> None:
    wpm, pitch = round(_lerp(120, 200, r.speed)), round(_lerp(20, 80, r.pitch))
    subprocess.run(["espeak-ng", "-v", r.voice, "-s", str(wpm), "-p", str(pitch), "-w", str(r.path), r.text],
                   check=True, capture_output=True)


def flite(r: Rendering) -> None:
    stretch, f0 = _lerp(1.25, 0.8, r.speed), _lerp(85, 150, r.pitch)
    subprocess.run(["flite", "-voice", r.voice, "-t", r.text, "-o", str(r.path),
                    "--setf", f"duration_stretch={stretch:.3f}", "--setf", f"int_f0_target_mean={f0:.0f}"],
                   check=True, capture_output=True)


def festival(batch: list[Rendering]) -> None:
    """Render a batch in one festival process (its start-up costs more than an utterance)."""
    lines = []
    for r in batch:
        text = r.text.replace("\\", " ").replace('"', " ")
        lines += [f"(voice_{r.voice})", f"(Parameter.set 'Duration_Stretch {_lerp(1.25, 0.8, r.speed):.3f})",
                  f'(utt.save.wave (utt.synth (Utterance Text "{text}")) "{r.path}" \'riff)']
    run_festival(lines)


def run_festival(lines: list[str]) -> str:
    """Run Scheme `lines` in one `festival --batch` process; its stdout. A missing voice
    raises EngineMissing with the apt command."""
    with tempfile.NamedTemporaryFile("w", suffix=".scm") as script:
        script.write("\n".join(lines) + "\n")
        script.flush()
        done = subprocess.run(["festival", "--batch", script.name], capture_output=True, text=True)
    if "not defined" in done.stderr or "unbound variable" in done.stderr:
        raise EngineMissing(f"festival lacks a voice ({done.stderr.strip()[-200:]}): {install_hint('festival')}")
    return done.stdout


def render_batch(batch: list[Rendering]) -> None:
    """Synthesise every item of `batch` (all of one engine) to its path; an item whose file
    does not appear is left for the caller's checks to drop."""
    engine = batch[0].engine
    if engine == "festival":
        festival(batch)
        return
    one = {"espeak-ng": espeak_ng, "flite": flite}[engine]
    for r in batch:
        try:
            one(r)
        except subprocess.CalledProcessError:
            r.path.unlink(missing_ok=True)
