"""The projector contract, for every family: token counts, padding invariance, the released
Qwen2-Audio key layout, the builder and gradients. Pure torch, small dims, runs in seconds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from projectors import (
    LinearProjector,
    build_projector,
    projector_block,
)

ROOT = Path(__file__).resolve().parents[1]
IN_DIM, OUT_DIM = 16, 24
LENGTHS = (1, 2, 3, 7, 75, 750)  # pooled encoder frames per clip (25/s: 40 ms .. 30 s)
SMALL_ATTENTION = dict(width=32, layers=2, heads=4)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors here are tiny: a second intra-op thread costs more than it saves, and on a
    busy machine it doubles the wall time of this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cases() -> list[tuple[str, dict]]:
    """(id, projector block) for every family and frame-rate reduction under test."""
    out = []
    for stack in (1, 2, 4):
        out.append((f"linear-s{stack}", dict(name="linear", stack=stack)))
        for act in ("gelu", "swiglu"):
            for pre_norm in (False, True):
                block = dict(
                    name="mlp", stack=stack, activation=act, pre_norm=pre_norm, hidden_dim=20
                )
                out.append((f"mlp-{act}-norm{int(pre_norm)}-s{stack}", block))
        out.append(
            (
                f"attn-stack-s{stack}",
                dict(name="attention", stack=stack, **SMALL_ATTENTION),
            )
        )
    out.append(("attn-none", dict(name="attention", downsample="none", **SMALL_ATTENTION)))
    for window in (1, 2, 4):
        for queries in (q for q in (1, 2) if q <= window):
            block = dict(
                name="attention",
                downsample="queries",
                window=window,
                queries=queries,
                **SMALL_ATTENTION,
            )
            out.append((f"attn-queries-w{window}-q{queries}", block))
    shortcut = dict(name="attention", downsample="queries", window=4, queries=2, mean_shortcut=True, **SMALL_ATTENTION)
    out.append(("attn-queries-w4-q2-mean-shortcut", shortcut))
    out.append(("attn-queries-s2-w2-q1-mean-shortcut", shortcut | dict(stack=2, window=2, queries=1)))
    return out


CASES = [pytest.param(block, id=name) for name, block in cases()]


def expected_tokens(block: dict, frames: int) -> int:
    """The token-count rule of DESIGN.md, written out independently of the code under test."""
    if block.get("downsample") == "queries":
        return math.ceil(math.ceil(frames / block.get("stack", 1)) / block["window"]) * block["queries"]
    return math.ceil(frames / block.get("stack", 1))


def make(block: dict) -> nn.Module:
    torch.manual_seed(0)
    return build_projector(block, IN_DIM, OUT_DIM).eval()


def padded_batch(lengths, garbage: float = 1e3) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, max(lengths), IN_DIM) frames with large random values in the padding, and the mask."""
    g = torch.Generator().manual_seed(1)
    T = max(lengths)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
    x = torch.randn(len(lengths), T, IN_DIM, generator=g)
    x = torch.where(mask[..., None], x, garbage * torch.randn(x.shape, generator=g))
    return x, mask


@pytest.mark.parametrize("block", CASES)
def test_output_shape_and_token_counts(block):
    proj = make(block)
    x, mask = padded_batch(LENGTHS)
    with torch.no_grad():
        out = proj(x, mask)

    T_out = int(proj.output_lengths(torch.tensor([x.shape[1]])))
    assert out.shape == (len(LENGTHS), T_out, OUT_DIM)
    counts = proj.output_lengths(torch.tensor(LENGTHS))
    assert counts.dtype == torch.long
    assert counts.tolist() == [expected_tokens(block, n) for n in LENGTHS]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("block", CASES)
def test_padding_does_not_change_valid_rows(block):
    """A clip's tokens are the same alone or batched next to longer clips with garbage
    padding: what vLLM (one clip at a time) and the HF twin (padded batches) both rely on."""
    proj = make(block)
    x, mask = padded_batch(LENGTHS)
    counts = proj.output_lengths(torch.tensor(LENGTHS))
    with torch.no_grad():
        batched = proj(x, mask)
        for i, (n, k) in enumerate(zip(LENGTHS, counts.tolist(), strict=True)):
            alone = proj(x[i : i + 1, :n], torch.ones(1, n, dtype=torch.bool))
            assert alone.shape == (1, k, OUT_DIM)
            torch.testing.assert_close(batched[i, :k], alone[0], atol=1e-5, rtol=1e-5)


def test_output_mask_marks_real_tokens():
    proj = make(dict(name="linear", stack=4))
    x, mask = padded_batch((3, 9))
    out = proj(x, mask)
    assert proj.output_mask(mask, out.shape[1]).tolist() == [
        [True, False, False],
        [True, True, True],
    ]


def test_linear_stack1_is_qwen2_audio_projector():
    """Released Qwen2-Audio weights (`multi_modal_projector.linear.*`) load unchanged."""
    torch.manual_seed(0)
    released = nn.Linear(IN_DIM, OUT_DIM)
    proj = LinearProjector(IN_DIM, OUT_DIM)
    assert set(proj.state_dict()) == {"linear.weight", "linear.bias"}
    # the hub checkpoint's `multi_modal_projector.linear.*`, prefix stripped as the model does
    hub = {f"linear.{k}": v for k, v in released.state_dict().items()}
    proj.load_state_dict(hub, strict=True)

    x = torch.randn(2, 11, IN_DIM)
    mask = torch.ones(2, 11, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(proj(x, mask), released(x))
    assert proj.output_lengths(torch.tensor([11, 1])).tolist() == [11, 1]


def test_linear_stack_concatenates_consecutive_frames():
    """stack=2: token t sees frames 2t and 2t+1, the odd last frame is paired with zeros."""
    proj = LinearProjector(IN_DIM, OUT_DIM, stack=2)
    x = torch.randn(1, 5, IN_DIM)
    mask = torch.ones(1, 5, dtype=torch.bool)
    stacked = torch.cat([x, torch.zeros(1, 1, IN_DIM)], dim=1).reshape(1, 3, 2 * IN_DIM)
    with torch.no_grad():
        torch.testing.assert_close(proj(x, mask), proj.linear(stacked))


@pytest.mark.parametrize("stack", [2, 4, 8])
def test_mean_pool_init_is_mean_pooling_then_the_base_projection(stack):
    """init_as_mean_pool: at step 0 a stack-k linear equals the stack-1 projection of the mean
    of each k frames; the last partial group of r frames gets the mean scaled by r/k."""
    base = LinearProjector(IN_DIM, OUT_DIM)
    proj = LinearProjector(IN_DIM, OUT_DIM, stack=stack).init_as_mean_pool(base.linear.weight, base.linear.bias)
    T = 3 * stack + 1  # three full groups and one frame
    x = torch.randn(2, T + 2, IN_DIM)
    mask = torch.arange(T + 2)[None, :] < torch.tensor([[T], [T + 2]])
    with torch.no_grad():
        out = proj(x, mask)
        full = x[0, : 3 * stack].reshape(3, stack, IN_DIM).mean(1)
        torch.testing.assert_close(out[0, :3], base.linear(full))
        torch.testing.assert_close(out[0, 3], base.linear(x[0, 3 * stack] / stack))
    with pytest.raises(ValueError, match=r"weight \(24, 16\).*projector must be \{'name': 'linear', 'stack': 1\}"):
        proj.init_as_mean_pool(proj.linear.weight, proj.linear.bias)


@pytest.mark.parametrize(("stack", "window", "queries"), [(1, 8, 2), (2, 4, 1), (1, 4, 4)])
def test_window_mean_init_is_window_mean_pooling_then_the_base_projection(stack, window, queries):
    """init_as_window_mean: at step 0 every query of a window (stack x window frames) is the
    base's stack-1 projection of the mean of that window's real frames, the last partial
    window included (its mean over its real frames, not scaled)."""
    base = LinearProjector(IN_DIM, OUT_DIM)
    block = dict(name="attention", downsample="queries", stack=stack, window=window, queries=queries,
                 mean_shortcut=True, **SMALL_ATTENTION)
    proj = make(block).init_as_window_mean(base.linear.weight, base.linear.bias)
    group = stack * window
    lengths = [2 * group + 3, group]
    x, mask = padded_batch(lengths)
    with torch.no_grad():
        out = proj(x, mask)
        for i, n in enumerate(lengths):
            for w in range(math.ceil(n / group)):
                mean = x[i, w * group : min(n, (w + 1) * group)].mean(0)
                for q in range(queries):
                    torch.testing.assert_close(out[i, w * queries + q], base.linear(mean))
    plain = make({k: v for k, v in block.items() if k != "mean_shortcut"})
    with pytest.raises(ValueError, match="needs the shortcut: projector.mean_shortcut=true"):
        plain.init_as_window_mean(base.linear.weight, base.linear.bias)
    with pytest.raises(ValueError, match=r"weight \(24, 16\).*projector must be \{'name': 'linear', 'stack': 1\}"):
        proj.init_as_window_mean(base.linear.weight.T, base.linear.bias)


BUILDER_BLOCKS = [
    dict(name="linear", stack=2),
    dict(name="mlp", stack=4, hidden_dim=20, depth=3, activation="swiglu", pre_norm=True),
    dict(name="attention", downsample="queries", window=2, queries=2, **SMALL_ATTENTION),
]


@pytest.mark.parametrize("block", BUILDER_BLOCKS, ids=lambda b: b["name"])
def test_block_round_trip(block):
    proj = build_projector(block, IN_DIM, OUT_DIM)
    saved = json.loads(json.dumps(projector_block(proj)))  # what config.json stores
    assert saved["name"] == block["name"]
    assert (saved["in_dim"], saved["out_dim"]) == (IN_DIM, OUT_DIM)
    assert saved.items() >= block.items()

    rebuilt = build_projector(saved, IN_DIM, OUT_DIM)
    assert type(rebuilt) is type(proj)
    assert rebuilt.hparams == proj.hparams
    shapes = {k: v.shape for k, v in proj.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown projector name 'qformer'") as err:
        build_projector({"name": "qformer"}, IN_DIM, OUT_DIM)
    for name in ("linear", "mlp", "attention"):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="unknown projector name None"):
        build_projector({"stack": 2}, IN_DIM, OUT_DIM)


@pytest.mark.parametrize("key", ["in_dim", "out_dim"])
def test_block_dims_must_match_base_model(key):
    with pytest.raises(ValueError, match=f"{key}=1280") as err:
        build_projector({"name": "linear", key: 1280}, IN_DIM, OUT_DIM)
    assert f"needs {IN_DIM if key == 'in_dim' else OUT_DIM}" in str(err.value)


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (dict(name="mlp", dropout=0.1), r"bad arguments for projector 'mlp': .*unexpected keyword argument 'dropout'"),
        (dict(name="linear", stack=0), r"stack must be an integer >= 1 .*got 0"),
        (dict(name="linear", stack=1.5), r"stack must be an integer >= 1 .*got 1.5"),
        (dict(name="mlp", activation="relu"), r"mlp activation must be one of \('gelu', 'swiglu'\), got 'relu'"),
        (dict(name="attention", downsample="stack"), r"downsample must be one of \('none', 'queries'\), got 'stack'"),
        (dict(name="attention", width=30, heads=4), r"width \(30\) must be divisible by heads \(4\)"),
        (dict(name="attention", downsample="queries", window=8, queries=3), r"queries=3 do not divide window=8"),
        (dict(name="attention", downsample="queries", window=1, queries=2), r"queries=2 do not divide window=1"),
        (dict(name="attention", mean_shortcut=True), r"mean_shortcut=true needs downsample=queries.*got 'none'"),
    ],
    ids=[
        "unknown-kwarg",
        "stack0",
        "stack-float",
        "activation",
        "downsample-unknown",
        "width-heads",
        "queries-not-dividing-window",
        "more-queries-than-frames",
        "shortcut-without-windows",
    ],
)
def test_bad_hyperparameters_raise_value_error(block, message):
    """Each bad value is named with what was expected and what was found."""
    with pytest.raises(ValueError, match=message):
        build_projector(block, IN_DIM, OUT_DIM)


@pytest.mark.parametrize("yaml", sorted((ROOT / "conf" / "projector").glob("*.yaml")), ids=lambda p: p.stem)
def test_hydra_projector_configs_are_config_json_blocks(yaml):
    """conf/projector/*.yaml nodes are config.json "projector" blocks (one mechanism:
    build_projector), and the block of the built module rebuilds the same projector."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        node = OmegaConf.to_container(compose("config", [f"projector={yaml.stem}"]).projector, resolve=True)
    proj = build_projector(node, IN_DIM, OUT_DIM)
    resolved = {k: v for k, v in node.items() if k != "name" and not (k == "hidden_dim" and v == 0)}  # 0: LLM width
    assert proj.name == node["name"] and all(proj.hparams[k] == v for k, v in resolved.items())
    assert build_projector(projector_block(proj), IN_DIM, OUT_DIM).hparams == proj.hparams


@pytest.mark.parametrize("block", CASES)
def test_gradients_reach_every_parameter(block):
    proj = make(block).train()
    x, mask = padded_batch((3, 7, 12))
    out = proj(x, mask)
    real = proj.output_mask(mask, out.shape[1])  # (B, T') rows that are tokens
    out[real].square().mean().backward()
    for name, p in proj.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
