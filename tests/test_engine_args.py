"""One engine-args builder: `vllm serve` gets the offline engine's arguments as flags, and
vLLM's own command-line parser reads them back to the same values."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.serving.engine import cli_flags, engine_kwargs
from experiments.serving.server import serve_args

SERVE_CONFIG = {  # conf/serve/default.yaml with some knobs set
    "name": "baseline", "max_num_seqs": 32, "max_num_batched_tokens": 4096, "kv_cache_dtype": "auto",
    "enable_chunked_prefill": False, "gpu_memory_utilization": None, "port": None, "startup_timeout_s": 300,
}


def parsed(args: list[str]):
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser()).parse_args(args)


@pytest.mark.engine  # vLLM's own CLI parser: imports vLLM (5-10 s)
def test_serve_flags_parse_to_the_offline_engine_kwargs():
    args = serve_args(Path("/ckpt"), 8123, SERVE_CONFIG)
    assert args[1] == "serve"
    ns = parsed(args[2:])
    offline = engine_kwargs(Path("/ckpt"), max_num_seqs=32, max_num_batched_tokens=4096,
                            kv_cache_dtype="auto", enable_chunked_prefill=False)
    assert ns.model_tag == "/ckpt" and ns.host == "127.0.0.1" and ns.port == 8123
    for key, value in offline.items():
        if key != "model":
            assert getattr(ns, key) == value, key
    assert not {"name", "startup_timeout_s"} & set(args)  # server-process keys are not engine flags


def test_cli_flags_forms():
    flags = cli_flags({"model": "/m", "enforce_eager": True, "enable_chunked_prefill": False,
                       "limit_mm_per_prompt": {"audio": 1}, "seed": 0, "max_num_seqs": None})
    assert flags == ["/m", "--enforce-eager", "--no-enable-chunked-prefill",
                     "--limit-mm-per-prompt", '{"audio": 1}', "--seed", "0"]


def test_none_override_keeps_the_default():
    assert engine_kwargs("/m", gpu_memory_utilization=None)["gpu_memory_utilization"] in (0.3, 0.85)


def test_audio_url_errors_become_client_errors():
    """The plugin's mapping of vLLM's fetch failures to HTTP 400 (plugin.audio_url_error)."""
    import aiohttp
    from vllm.exceptions import VLLMValidationError

    from qwen2_audio_vllm.plugin import audio_url_error

    local = audio_url_error("file:///data/a.wav", RuntimeError("Cannot load local files without `--allowed-local-media-path`."))
    assert isinstance(local, VLLMValidationError) and local.parameter == "audio_url"
    assert "does not read local files" in str(local) and "base64 data URL" in str(local)
    down = audio_url_error("http://10.0.0.1/a.wav", aiohttp.ServerTimeoutError("read timeout"))
    assert isinstance(down, VLLMValidationError) and "could not be fetched (ServerTimeoutError" in str(down)
    assert audio_url_error("http://x/a.wav", KeyError("a bug")) is None  # not the client's fault: stays a 500
    assert audio_url_error("file:///a.wav", VLLMValidationError("already 4xx")) is None
