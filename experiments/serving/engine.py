"""One place that starts vLLM: engine arguments per device (for `vllm.LLM` and, as flags,
for `vllm serve`), CPU thread binding, prompts.

Any script that builds `vllm.LLM` must run under `if __name__ == "__main__":` (the engine
core is a spawned process).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

# Measured 2x on 2-core machines (PLATFORM.md): bind the worker to all cores instead of
# reserving one for the engine process. Recorded with every result (`cpu_binding()`).
CPU_BINDING = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{max(os.cpu_count() or 1, 1) - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
TRANSCRIBE_PROMPT = "Transcribe the audio."


def has_cuda() -> bool:
    return shutil.which("nvidia-smi") is not None and _torch_cuda()


def _torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def quiet_vllm(verbose: bool) -> None:
    """vLLM logs every engine start at INFO (hundreds of lines a run); verbose=true shows them."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if verbose else "WARNING")


def cpu_binding() -> dict[str, str]:
    """Apply the CPU thread binding unless the user set it; return what is in force."""
    for key, value in CPU_BINDING.items():
        os.environ.setdefault(key, value)
    return {k: os.environ[k] for k in CPU_BINDING}


def engine_kwargs(model_dir: str | Path, **overrides: Any) -> dict[str, Any]:
    """Arguments for `vllm.LLM(**kwargs)`, and through `cli_flags` for `vllm serve`:
    float32/eager and a CPU KV-cache share on CPU, bf16 on CUDA. `overrides` win (e.g.
    max_num_seqs, hf_overrides); a None override keeps the default."""
    kwargs: dict[str, Any] = dict(
        model=str(model_dir),
        max_model_len=2048,
        limit_mm_per_prompt={"audio": 1},
        seed=0,
    )
    if has_cuda():
        kwargs.update(dtype="bfloat16", gpu_memory_utilization=0.85)
    else:
        cpu_binding()
        kwargs.update(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return kwargs


def cli_flags(kwargs: dict[str, Any]) -> list[str]:
    """`engine_kwargs` as `vllm serve` arguments (the model first, then one flag per key),
    so the online and offline engines are configured by the same function."""
    args = [str(kwargs["model"])]
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if key == "model" or value is None:
            continue
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (dict, list)):
            args += [flag, json.dumps(value)]
        else:
            args += [flag, str(value)]
    return args


def chat_prompt(tokenizer, text: str = TRANSCRIBE_PROMPT, n_audios: int = 1, answer_prefix: str = "") -> str:
    """The chat prompt served by `vllm serve` (chat completions with `n_audios` audio parts
    before the text) and used in offline evaluation and training, so all three see the same
    tokens. `answer_prefix`: the start of the assistant's answer, to be continued (as the
    server's `continue_final_message`)."""
    content = "".join(f"Audio {i}: <|audio_bos|><|AUDIO|><|audio_eos|>\n" for i in range(1, n_audios + 1)) + text
    messages = [{"role": "user", "content": content}]
    if answer_prefix:
        return tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": answer_prefix}], tokenize=False, continue_final_message=True
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def make_llm(model_dir: str | Path, **overrides: Any):
    """Validate the checkpoint (clear errors before any process starts), then `vllm.LLM`."""
    from vllm import LLM

    from qwen2_audio_vllm.checkpoint import validate_checkpoint

    validate_checkpoint(model_dir)
    return LLM(**engine_kwargs(model_dir, **overrides))


def close_llm(llm) -> None:
    """Stop the engine's processes now (rather than at garbage collection)."""
    import gc

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def audio_request(prompt: str, audio, hotwords: list[str] | None = None) -> dict[str, Any]:
    """One offline request: a prompt with one <|AUDIO|> per item and 16 kHz float samples
    (one array, or a list of them for several items); `hotwords`, words to favour
    (qwen2_audio_vllm/hotwords.py), go to the processor as `mm_processor_kwargs`."""
    data = [(a, 16000) for a in audio] if isinstance(audio, (list, tuple)) else (audio, 16000)
    request: dict[str, Any] = {"prompt": prompt, "multi_modal_data": {"audio": data}}
    if hotwords is not None:
        request["mm_processor_kwargs"] = {"hotwords": list(hotwords)}
    return request


class EmbedAudio:
    """`llm.apply_model(EmbedAudio(features, mask))` -> [the engine model's audio embeddings,
    one (n_i, d_text) tensor per clip]: what the served model merges into the prompt.
    Needs VLLM_ALLOW_INSECURE_SERIALIZATION=1 before the engine starts (it ships this object
    to the worker)."""

    def __init__(self, input_features, feature_attention_mask, trim: bool | None = None) -> None:
        self.input_features, self.feature_attention_mask = input_features, feature_attention_mask
        self.trim = trim  # None: as the checkpoint says; else flip its trim_audio_padding for this call

    def __call__(self, model) -> list:
        import torch

        device = next(model.parameters()).device
        n = self.input_features.shape[0]  # one window per clip
        configured = model.audio_tower.trim
        model.audio_tower.trim = configured if self.trim is None else self.trim
        try:
            with torch.no_grad():
                emb = model.embed_multimodal(
                    input_features=self.input_features.to(device),
                    feature_attention_mask=self.feature_attention_mask.to(device),
                    audio_num_windows=torch.ones(n, dtype=torch.long),
                    audio_window_start=torch.zeros(n, dtype=torch.long),
                )
        finally:
            model.audio_tower.trim = configured
        return [e.float().cpu() for e in emb]


class EncoderProbe:
    """`llm.apply_model(EncoderProbe())` -> [the (items, real encoder positions) of every
    audio-encoder call since the previous probe]: what the engine actually encoded, e.g. to
    check that a streamed update encodes only its new chunk. The first call installs a
    forward hook on the audio tower and returns []. Same VLLM_ALLOW_INSECURE_SERIALIZATION
    requirement as EmbedAudio."""

    def __call__(self, model) -> list[tuple[int, int]]:
        from qwen2_audio_vllm.encoder import output_lengths

        tower = model.audio_tower
        if not hasattr(tower, "encoder_calls"):
            tower.encoder_calls = []

            def record(_module, args, kwargs, _out) -> None:
                features, mask = args[0], kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
                width = output_lengths(features.shape[-1])[0]  # positions after the stride-2 conv
                real = int((mask[:, 0, 0, :] == 0).sum()) if mask is not None else features.shape[0] * width
                tower.encoder_calls.append((features.shape[0], real))

            tower.register_forward_hook(record, with_kwargs=True)
        calls, tower.encoder_calls[:] = list(tower.encoder_calls), []
        return calls


class EmbedModality:
    """`llm.apply_model(EmbedModality("m1", rows))` -> [the engine model's embeddings of an
    extra modality's items (modalities.py), one (n_i', d_text) tensor per item]. Same
    VLLM_ALLOW_INSECURE_SERIALIZATION requirement as EmbedAudio."""

    def __init__(self, name: str, rows: list) -> None:
        self.name, self.rows = name, rows

    def __call__(self, model) -> list:
        import torch

        device = next(model.parameters()).device
        with torch.no_grad():
            emb = model.embed_multimodal(**{f"{self.name}_embeds": [r.to(device) for r in self.rows]})
        return [e.float().cpu() for e in emb]
