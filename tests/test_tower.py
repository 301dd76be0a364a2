"""The audio tower built from vLLM's layers (qwen2_audio_vllm/tower.py): its precision
switch, the int8 path served by a real engine, and the refusals (a --quantization the tower
cannot take here, a checkpoint whose tower is already quantized, an unknown switch value).
Its greedy identity with upstream's transformers tower at full precision is
tests/test_encoder_trim.py::test_fork_trimmed_equals_upstream_full_window."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from experiments.benchmarks.tower_quant import fp8_estimate, linear_weight_bytes
from qwen2_audio_vllm import tower
from qwen2_audio_vllm.checkpoint import load_config, weight_files

# the tower is built from vLLM's layers: importing it imports vLLM (5-10 s), which the fast
# loop leaves to `make test` with the engine tests
pytestmark = pytest.mark.engine


def test_precision_switch_values():
    assert tower.precision(SimpleNamespace()) == "inherit"
    assert tower.precision(SimpleNamespace(audio_tower_quantization="int8")) == "int8"
    with pytest.raises(ValueError, match=r'"audio_tower_quantization" is .int4.; expected one of inherit, none, int8'):
        tower.precision(SimpleNamespace(audio_tower_quantization="int4"))


def test_tower_quantization_follows_the_switch():
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config

    fp8 = Fp8Config()
    assert tower.tower_quant_config(SimpleNamespace(audio_tower_quantization="none"), fp8, "fp8") is None
    assert isinstance(tower.tower_quant_config(SimpleNamespace(audio_tower_quantization="int8"), None),
                      tower.Int8DynamicConfig)
    assert tower.tower_quant_config(SimpleNamespace(), None) is None  # inherit, engine unquantized
    assert "fp8" in tower.supported_methods("cuda") and tower.supported_methods("cpu") == ()
    # inherit on this CPU: refused, naming the method, what the tower takes, and the switch
    with pytest.raises(ValueError, match=r"--quantization fp8 cannot run on the audio tower on cpu.*"
                                         r'only none here.*"int8".*"none"'):
        tower.tower_quant_config(SimpleNamespace(), fp8, "fp8")


@pytest.mark.parametrize("name,tensor,scheme", [
    ("layers.0.fc1.weight", torch.zeros(4, 4, dtype=torch.int8), "int8 tensors"),
    ("layers.0.self_attn.q_proj.qweight", torch.zeros(4, 4, dtype=torch.int32), "GPTQ/AWQ packed integers"),
    ("layers.0.fc2.weight_scale", torch.ones(4), "scaled 8-bit"),
])
def test_quantized_tower_weights_are_named(name, tensor, scheme):
    weights = tower._float_weights([("conv1.weight", torch.zeros(2)), (name, tensor)])
    assert next(weights)[0] == "conv1.weight"
    with pytest.raises(ValueError, match=rf"audio_tower\.{name} .* cannot load: {scheme}"):
        next(weights)


def test_int8_weight_bytes_and_fp8_estimate(tiny_base):
    sizes = linear_weight_bytes(load_config(tiny_base))
    assert 3.9 < sizes["full"] / sizes["int8"] < 4.0  # 1 byte a weight plus a scale per channel
    e = fp8_estimate(5.0)
    assert 0.9 < e["linear_share"] < 1 and 1.5 < e["encoder_speedup_bound"] < 2


def _int8_cos_min() -> float:
    """How close int8 embeddings are to full precision's (cosine, per clip) on this CPU.
    oneDNN's int8 GEMM accumulates u8 x s8 products exactly in int32 with VNNI or AMX; on AVX2
    alone it adds them in pairs in saturating int16 (vpmaddubsw), which costs closeness:
    per clip 0.974-0.993 on the tiny base's 8 clips on a 2-core AVX2-only x86_64 VM."""
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    return 0.99 if flags & {"avx512_vnni", "avx_vnni", "amx_int8"} else 0.97


def _shard_widths(model) -> tuple[int, int]:
    first = model.audio_tower.layers[0]
    return first.self_attn.qkv_proj.output_size_per_partition, first.mlp.fc1.output_size_per_partition


def _served(ckpt, speech_clips, capfd, **overrides) -> dict:
    """One engine's audio embeddings, greedy tokens and tower shard widths for the clips, and
    what it logged."""
    from vllm import SamplingParams

    from experiments.serving.engine import (
        EmbedAudio,
        audio_request,
        chat_prompt,
        close_llm,
        make_llm,
    )
    from qwen2_audio_vllm.checkpoint import load_processor

    fe = load_processor(ckpt).feature_extractor
    audios = [a for _, a, _ in speech_clips]
    feats = fe(audios, sampling_rate=16000, return_attention_mask=True, return_tensors="pt")
    llm = make_llm(ckpt, distributed_executor_backend="mp", **overrides)
    try:
        emb = llm.apply_model(EmbedAudio(feats["input_features"], feats["attention_mask"]))[0]
        prompt = chat_prompt(llm.get_tokenizer())
        outs = llm.generate([audio_request(prompt, a) for a in audios], SamplingParams(max_tokens=16, temperature=0))
        widths = llm.apply_model(_shard_widths)
    finally:
        close_llm(llm)
    captured = capfd.readouterr()  # vLLM logs INFO to stdout, errors to stderr
    return {"emb": emb, "tokens": [o.outputs[0].token_ids for o in outs], "widths": widths,
            "log": captured.out + captured.err}


def test_full_int8_and_two_ranks_serve_the_tower(tiny_base, speech_clips, capfd, monkeypatch):
    """Three engines on the tiny base. Full precision in one worker process and int8 each log
    the tower's precision, and int8's embeddings are close to full precision's. Two CPU
    worker processes, one core each: the tower's linears are split across them like the
    language model's, and greedy tokens are those of one process."""
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "INFO")  # vLLM's default; the apps (quiet_vllm) lower it
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    full = _served(tiny_base, speech_clips, capfd)
    int8 = _served(tiny_base, speech_clips, capfd, hf_overrides={"audio_tower_quantization": "int8"})
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank
    two = _served(tiny_base, speech_clips, capfd, tensor_parallel_size=2)

    assert "audio tower: 4 layers, d=384, full precision (float32)" in full["log"]
    assert "audio tower: 4 layers, d=384, int8 W8A8" in int8["log"] and "full precision" not in int8["log"]
    for a, b in zip(full["emb"], int8["emb"], strict=True):
        assert a.shape == b.shape
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert _int8_cos_min() < cos < 1.0  # quantized (not the same numbers), and close
    d, ffn = 384, 1536
    assert full["widths"] == [(3 * d, ffn)]
    assert two["widths"] == [(3 * d // 2, ffn // 2)] * 2  # each rank holds half of q/k/v and of fc1
    assert two["tokens"] == full["tokens"]


def test_quantization_the_tower_cannot_take_is_refused_at_start(tiny_base, capfd):
    from vllm import LLM

    from experiments.serving.engine import engine_kwargs

    with pytest.raises(Exception):  # noqa: B017 - the engine's start-up error; the cause is in its log
        LLM(**engine_kwargs(tiny_base, quantization="fp8", dtype="bfloat16"))
    captured = capfd.readouterr()
    err = captured.out + captured.err
    assert "--quantization fp8 cannot run on the audio tower on cpu" in err
    assert '"audio_tower_quantization": "none"' in err


def test_checkpoint_with_a_quantized_tower_is_refused(tiny_base, tmp_path, capfd):
    from safetensors.torch import load_file, save_file
    from vllm import LLM

    from experiments.serving.engine import engine_kwargs

    ckpt = tmp_path / "int8-tower"
    shutil.copytree(tiny_base, ckpt)
    (path,) = weight_files(ckpt)
    state = load_file(path)
    w = state["audio_tower.layers.0.fc1.weight"]
    state["audio_tower.layers.0.fc1.weight"] = (w / w.abs().max() * 127).round().to(torch.int8)
    save_file(state, path, metadata={"format": "pt"})
    assert json.loads((ckpt / "config.json").read_text())["architectures"]
    with pytest.raises(Exception):  # noqa: B017 - the engine's start-up error; the cause is in its log
        LLM(**engine_kwargs(ckpt))
    captured = capfd.readouterr()
    err = captured.out + captured.err
    assert "audio_tower.layers.0.fc1.weight (int8) is quantized in a scheme the audio tower cannot load" in err
