"""Checkpoint format: build, export and load Qwen2-Audio directories with a swappable projector.

A checkpoint is a standard Qwen2-Audio directory (config.json, tokenizer, processor,
model.safetensors in the hub key layout) whose config.json says
`"architectures": ["Qwen2AudioSwapForConditionalGeneration"]` and carries a
`"projector": {"name": ..., ...}` block (see projectors.projector_block). With the package
installed, `vllm serve <dir>` and `vllm.LLM(<dir>)` load it through the plugin.

`build_tiny_checkpoint` writes a small random-weight model offline (own BPE tokenizer,
Whisper feature extractor, chat template), deterministic given its spec;
`build_hub_tiny` writes the same kind of model in exactly the layout of
`Qwen/Qwen2-Audio-7B-Instruct` on the hub (upstream architecture, no projector block,
bfloat16 shards with model.safetensors.index.json, preprocessor_config.json, vocab.json +
merges.txt), so the real model's path (adopt -> align -> export -> serve) runs on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    GenerationConfig,
    Qwen2AudioConfig,
    Qwen2AudioProcessor,
    Qwen2TokenizerFast,
    WhisperFeatureExtractor,
)

from qwen2_audio_vllm.hf import STOP_TOKENS, Qwen2AudioSwap
from qwen2_audio_vllm.modalities import modality_specs
from qwen2_audio_vllm.plugin import ARCHITECTURE  # noqa: E402  (one name, one place)
from qwen2_audio_vllm.validation import (
    check_projector_weights,
    declared_projector_shapes,
    projector_blocks,
)

UPSTREAM_ARCHITECTURE = "Qwen2AudioForConditionalGeneration"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# Shard size of exported checkpoints: one file up to this size, else shards + index.json
# (a 7B export is ~16 GB in bfloat16).
MAX_SHARD_BYTES = 5 * 2**30
# What the hub directory of Qwen/Qwen2-Audio-7B-Instruct holds besides its weight shards.
HUB_FILES = (
    "config.json", "generation_config.json", WEIGHTS_INDEX, "preprocessor_config.json",
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]
# Qwen2-Audio-Instruct's chat layout without the default system turn. Content is a string
# (vLLM's offline prompts put "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>" in it) or a
# list of OpenAI parts, where each audio part renders as that same placeholder line.
CHAT_TEMPLATE = (
    "{% set audio = namespace(n=0) %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] in ['audio', 'audio_url', 'input_audio'] %}{% set audio.n = audio.n + 1 %}"
    "Audio {{ audio.n }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def cache_root() -> Path:
    """Where built models, data and encoder caches live (outside clones, shared by CI)."""
    return Path(os.environ.get("Q2AP_CACHE", Path.home() / ".cache" / "qwen2-audio-projectors"))


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny default model. vLLM CPU attention needs LLM head_dim >= 64;
    chunk_length=30 / 1500 positions keeps it loadable by upstream vLLM's own class."""

    version: int = 2  # bump when the tokenizer, template or layout changes: new cache key
    seed: int = 0
    n_mels: int = 80
    chunk_length: int = 30
    encoder_dim: int = 128
    encoder_layers: int = 2
    encoder_heads: int = 2
    encoder_ffn: int = 512
    text_dim: int = 128
    text_layers: int = 2
    text_heads: int = 2
    text_ffn: int = 512
    vocab_size: int = 1000
    projector: tuple[tuple[str, Any], ...] = (("name", "linear"), ("stack", 1))

    def key(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def build_tokenizer(texts: Iterable[str], vocab_size: int) -> Qwen2TokenizerFast:
    """Byte-level BPE trained on `texts` (any text stays encodable through the byte alphabet)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return Qwen2TokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def build_processor(tokenizer: Qwen2TokenizerFast, n_mels: int, chunk_length: int) -> Qwen2AudioProcessor:
    fe = WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=16000, chunk_length=chunk_length, hop_length=160)
    return Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


# Special-token ids of the released Qwen2-Audio tokenizer, for configs built without one
# (the random full-size model of train_bench)
QWEN_SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|AUDIO|>": 151646,
                    "<|audio_bos|>": 151647, "<|audio_eos|>": 151648}


def make_config(spec: TinySpec, tokenizer: Qwen2TokenizerFast | None = None) -> Qwen2AudioConfig:
    """The Qwen2AudioConfig of `spec`'s dims. Without a tokenizer the vocabulary is
    spec.vocab_size with the released model's special-token ids (or its last ids, when
    smaller than the released vocabulary)."""
    if tokenizer is None:
        vocab = spec.vocab_size
        ids = QWEN_SPECIAL_IDS
        if vocab <= max(ids.values()):
            ids = {t: vocab - len(SPECIAL_TOKENS) + i for i, t in enumerate(SPECIAL_TOKENS)}
    else:
        ids, vocab = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}, len(tokenizer)
    cfg = Qwen2AudioConfig(
        audio_config=dict(
            model_type="qwen2_audio_encoder",
            num_mel_bins=spec.n_mels,
            d_model=spec.encoder_dim,
            encoder_layers=spec.encoder_layers,
            encoder_attention_heads=spec.encoder_heads,
            encoder_ffn_dim=spec.encoder_ffn,
            max_source_positions=spec.chunk_length * 50,
        ),
        text_config=dict(
            model_type="qwen2",
            vocab_size=vocab,
            hidden_size=spec.text_dim,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.text_heads,
            num_key_value_heads=spec.text_heads,
            intermediate_size=spec.text_ffn,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
        ),
        audio_token_index=ids["<|AUDIO|>"],
    )
    cfg.projector = dict(spec.projector)
    return cfg


def build_tiny_checkpoint(out_dir: str | Path, texts: Iterable[str], spec: TinySpec = TinySpec()) -> Path:
    """Write a random-weight tiny Qwen2-Audio checkpoint (deterministic given `spec.seed`)."""
    tokenizer = build_tokenizer(texts, spec.vocab_size)
    processor = build_processor(tokenizer, spec.n_mels, spec.chunk_length)
    config = make_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = Qwen2AudioSwap(config)
    return save_checkpoint(model, processor, out_dir)


def save_checkpoint(
    model: Qwen2AudioSwap,
    processor: Qwen2AudioProcessor,
    out_dir: str | Path,
    hub_layout: bool = False,
    shards: int | None = None,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Export `model` as a vLLM-loadable directory: hub key layout, projector block,
    architecture of the fork. Written into a temp dir and renamed, so a reader never sees
    a half-written checkpoint (a run killed mid-export leaves only `<out_dir>.tmp-*`,
    removed by the next export).

    hub_layout: write what the released hub directory looks like instead: upstream
    architecture, no projector block, bfloat16 weights in `shards` files (default 2) with
    model.safetensors.index.json, preprocessor_config.json, vocab.json and merges.txt.
    weights: the tensors to write, when not `model.state_dict()` (align writes the base's
    own frozen tensors, not their bf16 training copies)."""
    from projectors import projector_block

    out_dir = Path(out_dir)
    tmp = fresh_tmp_dir(out_dir)
    config = copy.deepcopy(model.config)
    if hub_layout:
        config.architectures = [UPSTREAM_ARCHITECTURE]
        config.__dict__.pop("projector", None)
        config.dtype = "bfloat16"
    else:
        config.projector = projector_block(model.multi_modal_projector)
        for name, projector in getattr(model, "modality_projectors", {}).items():
            config.modalities[name] = dict(config.modalities[name], projector=projector_block(projector))
        config.architectures = [ARCHITECTURE]
    config.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    tok = processor.tokenizer
    GenerationConfig(
        eos_token_id=tok.convert_tokens_to_ids(STOP_TOKENS),
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    ).save_pretrained(tmp)
    state = {k: v.detach().contiguous().cpu() for k, v in (weights or model.state_dict()).items()}
    if hub_layout:
        processor.feature_extractor.save_pretrained(tmp)  # preprocessor_config.json
        (tmp / "processor_config.json").unlink(missing_ok=True)  # the hub has none
        tok.backend_tokenizer.model.save(str(tmp))  # vocab.json + merges.txt
        state = {k: v.to(torch.bfloat16) for k, v in state.items()}
        write_weights(state, tmp, shards=shards or 2)
    else:
        write_weights(state, tmp, shards=shards)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def fresh_tmp_dir(out_dir: Path) -> Path:
    """A new temp dir beside `out_dir`, unique per process; stale ones of killed runs go."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f"{out_dir.name}.tmp-*"):
        if not _pid_alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def write_weights(state: Mapping[str, torch.Tensor], out_dir: Path, shards: int | None = None) -> list[Path]:
    """`model.safetensors`, or `model-0000i-of-0000n.safetensors` + model.safetensors.index.json
    (the hub's layout) when `shards` > 1 is asked for or the weights exceed MAX_SHARD_BYTES."""
    total = sum(t.numel() * t.element_size() for t in state.values())
    n = shards or max(1, -(-total // MAX_SHARD_BYTES))
    if n == 1:
        save_file(dict(state), out_dir / WEIGHTS, metadata={"format": "pt"})
        return [out_dir / WEIGHTS]
    groups: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    budget, filled, i = total / n, 0, 0
    for key, tensor in state.items():  # contiguous key ranges, about total/n bytes each
        if filled >= budget * (i + 1) and i < n - 1:
            i += 1
        groups[i][key] = tensor
        filled += tensor.numel() * tensor.element_size()
    names = [f"model-{j + 1:05d}-of-{n:05d}.safetensors" for j in range(n)]
    for name, group in zip(names, groups, strict=True):
        save_file(group, out_dir / name, metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[j] for j, g in enumerate(groups) for k in g}}
    (out_dir / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2))
    return [out_dir / name for name in names]


def weight_files(ckpt_dir: str | Path) -> list[Path]:
    """The safetensors files holding a checkpoint's weights (the index's shards, if any)."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / WEIGHTS_INDEX).is_file():
        names = sorted(set(json.loads((ckpt_dir / WEIGHTS_INDEX).read_text())["weight_map"].values()))
        return [ckpt_dir / n for n in names]
    files = sorted(ckpt_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{ckpt_dir} holds no *.safetensors weights")
    return files


def read_weights(ckpt_dir: str | Path, skip_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (CPU, as stored), optionally without those under a prefix."""
    out = {}
    for f in weight_files(ckpt_dir):
        out.update({k: v for k, v in load_file(f).items() if not (skip_prefix and k.startswith(skip_prefix))})
    return out


def stored_shapes(ckpt_dir: str | Path, prefixes: tuple[str, ...] = ()) -> dict[str, torch.Size]:
    """Name -> shape of every stored tensor (or those under `prefixes`), from the headers."""
    from safetensors import safe_open

    shapes = {}
    for f in weight_files(ckpt_dir):
        with safe_open(str(f), "pt") as handle:
            for key in handle.keys():
                if not prefixes or key.startswith(prefixes):
                    shapes[key] = torch.Size(handle.get_slice(key).get_shape())
    return shapes


def weights_stamp(ckpt_dir: str | Path) -> list[float]:
    """Modification times of a checkpoint's weight files: part of a stage key, so a
    re-exported checkpoint is evaluated anew."""
    return [f.stat().st_mtime for f in weight_files(ckpt_dir)]


def load_config(ckpt_dir: str | Path, projector: Mapping[str, Any] | None = None) -> Qwen2AudioConfig:
    """config.json of a checkpoint, optionally with a different projector block."""
    config = Qwen2AudioConfig.from_pretrained(ckpt_dir)
    if projector is not None:
        config.projector = dict(projector)
    if not isinstance(getattr(config, "projector", None), Mapping):
        raise ValueError(
            f"{ckpt_dir}/config.json has no 'projector' block; expected e.g. "
            '"projector": {"name": "linear", "stack": 1}. Add one (a released Qwen2-Audio '
            'checkpoint uses {"name": "linear", "stack": 1}).'
        )
    return config


def load_model(
    ckpt_dir: str | Path,
    projector: Mapping[str, Any] | None = None,
    load_projector: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Qwen2AudioSwap:
    """The HF twin with the checkpoint's weights, built directly on `device` in `dtype`
    (weights are read shard by shard, never a second full copy). With `projector` given,
    that projector is built instead of the checkpoint's, freshly initialised
    (load_projector=False) or loaded."""
    config = load_config(ckpt_dir, projector)
    with torch.device(device), default_dtype(dtype):
        model = Qwen2AudioSwap(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    found = stored_shapes(ckpt_dir)  # headers only: mismatches are named before any loading
    if load_projector:
        for block, prefix in projector_blocks(config):
            check_projector_weights(block, expected, found, prefix=prefix)
    else:
        found = {k: v for k, v in found.items() if not k.startswith("multi_modal_projector.")}
    for f in weight_files(ckpt_dir):
        state = {k: v for k, v in load_file(f, device=str(device)).items() if k in found}
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"{f} holds weights this model does not have: {unexpected[:5]} (of {len(unexpected)})")
    missing = sorted(set(expected) - set(found))
    if not load_projector:
        missing = [k for k in missing if not k.startswith("multi_modal_projector.")]
    if missing:
        raise ValueError(f"{ckpt_dir} lacks weights {missing[:5]} (of {len(missing)}); is it a complete Qwen2-Audio checkpoint?")
    return model.eval()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build modules in `dtype` (a 7B model never exists in float32)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def load_processor(ckpt_dir: str | Path) -> Qwen2AudioProcessor:
    return Qwen2AudioProcessor.from_pretrained(ckpt_dir)


def derive_checkpoint(
    base_dir: str | Path, projector: Mapping[str, Any], out_dir: str | Path, seed: int = 0
) -> Path:
    """A copy of `base_dir` with a freshly initialised (seeded) `projector` in place of its own."""
    torch.manual_seed(seed)
    model = load_model(base_dir, projector=projector, load_projector=False)
    return save_checkpoint(model, load_processor(base_dir), out_dir)


def validate_checkpoint(ckpt_dir: str | Path) -> Qwen2AudioConfig:
    """Cheap checks before an engine starts (reads config and safetensors headers only):
    the projector block builds for the base dims, the weights fit it, the tokenizer has
    every special token. Raises ValueError naming expected vs found."""

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "config.json").is_file():
        raise ValueError(f"{ckpt_dir} is not a checkpoint directory (no config.json)")
    config = load_config(ckpt_dir)
    expected = declared_projector_shapes(config)
    found = stored_shapes(ckpt_dir, ("multi_modal_projector.", "modality_projectors."))
    for block, prefix in projector_blocks(config):
        check_projector_weights(block, expected, found, prefix=prefix)
    vocab = json.loads((ckpt_dir / "tokenizer.json").read_text())["added_tokens"] if (ckpt_dir / "tokenizer.json").exists() else []
    have = {t["content"]: t["id"] for t in vocab}
    if vocab and (missing := [t for t in SPECIAL_TOKENS if t not in have]):
        raise ValueError(
            f"{ckpt_dir}/tokenizer.json lacks special tokens {missing}; expected all of {SPECIAL_TOKENS}"
        )
    for m in modality_specs(config).values():
        if vocab and have.get(m.token) != m.token_id:
            raise ValueError(
                f"config.json modality {m.name!r} uses placeholder {m.token} = id {m.token_id}, but "
                f"tokenizer.json has {m.token} = {have.get(m.token)}; re-create it with add_modalities()"
            )
    return config


def check_qwen2_audio_dir(src: Path, env_var: str | None = None) -> dict[str, Any]:
    """config.json of a local Qwen2-Audio directory, or a ValueError/FileNotFoundError
    saying what was expected and what to set (`env_var`: where the path came from)."""
    src = Path(src)
    where = f" (from ${env_var})" if env_var else ""
    fix = f"set {env_var} to" if env_var else "point model.path at"
    if not src.is_dir():
        raise FileNotFoundError(
            f"{src}{where} does not exist; {fix} a local directory of Qwen/Qwen2-Audio-7B-Instruct "
            "(config.json, *.safetensors, tokenizer, preprocessor_config.json). Nothing is downloaded."
        )
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}{where} has no config.json; {fix} a local Qwen2-Audio directory")
    config = json.loads((src / "config.json").read_text())
    if config.get("model_type") != "qwen2_audio":
        raise ValueError(
            f"{src}/config.json{where} has model_type {config.get('model_type')!r}, expected 'qwen2_audio' "
            f"(architectures {config.get('architectures')}); {fix} a Qwen2-Audio checkpoint such as "
            "Qwen/Qwen2-Audio-7B-Instruct"
        )
    try:
        weight_files(src)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}{where}; {fix} a complete Qwen2-Audio directory") from err
    return config


def adopt_checkpoint(src: Path, out_root: Path, env_var: str | None = None) -> Path:
    """Make a released Qwen2-Audio directory servable by the fork without copying weights:
    a sibling directory of symlinks whose config.json names the fork's architecture and the
    original connector, {"name": "linear", "stack": 1}. A directory that already has a
    projector block is used as it is."""
    src = Path(src)
    config = check_qwen2_audio_dir(src, env_var)
    if isinstance(config.get("projector"), Mapping):
        return src
    config["architectures"] = [ARCHITECTURE]
    config["projector"] = {"name": "linear", "stack": 1}
    return linked_checkpoint(src, out_root, config)


def linked_checkpoint(src: Path, out_root: Path, config: Mapping[str, Any], suffix: str = "") -> Path:
    """`out_root/<src name>-<hash of src's path><suffix>`: symlinks to every file of `src`
    beside a different config.json. No weights are copied. Built in a temp dir and renamed,
    so processes adopting the same directory at once (a launcher's parallel jobs) each see
    a complete one; an existing one whose links and config already match is kept."""
    src = Path(src)
    out = out_root / f"{src.name}-{hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:8]}{suffix}"
    wanted = {f.name: f.resolve() for f in src.iterdir() if f.name != "config.json"}
    text = json.dumps(config, indent=2)
    if _links_match(out, wanted, text):
        return out
    tmp = fresh_tmp_dir(out)
    for name, target in wanted.items():
        (tmp / name).symlink_to(target)
    (tmp / "config.json").write_text(text)
    shutil.rmtree(out, ignore_errors=True)
    try:
        tmp.rename(out)
    except OSError:  # another process renamed its identical copy first
        shutil.rmtree(tmp, ignore_errors=True)
        if not _links_match(out, wanted, text):
            raise
    return out


def _links_match(out: Path, wanted: Mapping[str, Path], config_text: str) -> bool:
    if not (out / "config.json").is_file() or (out / "config.json").read_text() != config_text:
        return False
    have = {f.name: f.resolve() for f in out.iterdir() if f.name != "config.json"}
    return have == dict(wanted)


def build_hub_tiny(out_dir: str | Path, texts: Iterable[str], spec: TinySpec = TinySpec()) -> Path:
    """A random-weight tiny Qwen2-Audio in exactly the hub layout of
    Qwen/Qwen2-Audio-7B-Instruct (see save_checkpoint(hub_layout=True)): what
    `QWEN2_AUDIO_7B_DIR` points at in tests, so the 7B path runs end to end on CPU.
    Weights are those of build_tiny_checkpoint with the same spec, rounded to bfloat16."""
    tokenizer = build_tokenizer(texts, spec.vocab_size)
    processor = build_processor(tokenizer, spec.n_mels, spec.chunk_length)
    torch.manual_seed(spec.seed)
    model = Qwen2AudioSwap(make_config(spec, tokenizer))
    return save_checkpoint(model, processor, out_dir, hub_layout=True)
