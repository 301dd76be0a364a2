"""Extra modalities (modalities.py) without an engine: config validation, request checks,
checkpoint round trip, and the twin's placement of each modality's rows."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qwen2_audio_vllm.checkpoint import load_model, load_processor, validate_checkpoint
from qwen2_audio_vllm.derive import add_modalities
from qwen2_audio_vllm.modalities import Modality, check_embeddings, modality_specs

SPECS = {
    "m1": {"in_dim": 768, "projector": {"name": "mlp", "stack": 2}},
    "m2": {"in_dim": 512, "projector": {"name": "linear"}, "max_len": 64},
}


@pytest.fixture(scope="module")
def two_modality_ckpt(tiny_base, tmp_path_factory):
    return add_modalities(tiny_base, tmp_path_factory.mktemp("mm") / "ckpt", SPECS, seed=1)


def test_add_modalities_writes_tokens_config_and_weights(two_modality_ckpt, tiny_base):
    specs = modality_specs(validate_checkpoint(two_modality_ckpt))
    tok = load_processor(two_modality_ckpt).tokenizer
    base_vocab = len(load_processor(tiny_base).tokenizer)
    assert [m.token for m in specs.values()] == ["<|M1|>", "<|M2|>"]
    assert [m.token_id for m in specs.values()] == [base_vocab, base_vocab + 1]
    assert tok("a <|M1|> b <|M2|>", add_special_tokens=False)["input_ids"].count(specs["m1"].token_id) == 1
    assert specs["m2"].max_len == 64 and specs["m1"].projector["stack"] == 2
    model = load_model(two_modality_ckpt)
    assert model.config.text_config.vocab_size == base_vocab + 2
    assert model.modality_projectors["m1"].in_dim == 768 and model.modality_projectors["m2"].in_dim == 512
    # the base weights are untouched; new vocabulary rows copy <|AUDIO|>'s
    base = load_model(tiny_base)
    emb, base_emb = model.language_model.get_input_embeddings().weight, base.language_model.get_input_embeddings().weight
    torch.testing.assert_close(emb[:base_vocab], base_emb, rtol=0, atol=0)
    torch.testing.assert_close(emb[base_vocab], base_emb[base.audio_token_id], rtol=0, atol=0)
    torch.testing.assert_close(model.audio_tower.conv1.weight, base.audio_tower.conv1.weight, rtol=0, atol=0)


def test_twin_places_each_modality_at_its_own_placeholder(two_modality_ckpt):
    model = load_model(two_modality_ckpt)
    specs = modality_specs(model.config)
    m1 = model.project_modality("m1", [torch.randn(7, 768)])  # stack 2: 4 rows
    m2 = model.project_modality("m2", [torch.randn(3, 512), torch.randn(2, 512)])
    assert [x.shape for x in m1 + m2] == [(4, 128), (3, 128), (2, 128)]
    t1, t2 = specs["m1"].token_id, specs["m2"].token_id
    ids = torch.tensor([[5, t2, t2, t2, 6] + [t1] * 4 + [7, t2, t2]])
    emb = model.embed(ids, [], {"m1": m1, "m2": m2})
    torch.testing.assert_close(emb[0, 5:9], m1[0])
    torch.testing.assert_close(emb[0, 1:4], m2[0])
    torch.testing.assert_close(emb[0, 10:12], m2[1])
    text = model.language_model.get_input_embeddings()(ids)
    torch.testing.assert_close(emb[0, [0, 4, 9]], text[0, [0, 4, 9]])
    with pytest.raises(ValueError, match=r"4 <\|M1\|> placeholders but 5 embeddings"):
        model.embed(ids, [], {"m1": [torch.zeros(5, 128)], "m2": m2})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (torch.zeros(4, 500), r"m2 item 0 has shape \(4, 500\); expected \(n, 512\)"),
        ([torch.zeros(4, 512), torch.zeros(4, 511)], r"m2 item 1 has shape \(4, 511\)"),
        (torch.zeros(512), r"shape \(512,\)"),
        (torch.zeros(0, 512), r"has 0 rows"),
        (torch.zeros(65, 512), r"has 65 rows.*max_len"),
        (torch.full((2, 512), float("nan")), "finite floating-point"),
        (torch.zeros(2, 512, dtype=torch.long), "finite floating-point"),
        ([[0.0] * 512], "is a list"),
    ],
)
def test_bad_requests_are_rejected_with_what_was_expected(data, message):
    m2 = Modality("m2", 512, "<|M2|>", 1001, 64, {"name": "linear"})
    with pytest.raises(ValueError, match=message):
        check_embeddings(m2, data)


def test_good_request_shapes_are_accepted():
    m2 = Modality("m2", 512, "<|M2|>", 1001, 64, {"name": "linear"})
    assert [x.shape[0] for x in check_embeddings(m2, torch.zeros(3, 5, 512))] == [5, 5, 5]
    assert [x.shape[0] for x in check_embeddings(m2, [torch.zeros(1, 512), torch.zeros(64, 512)])] == [1, 64]


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"audio": {}}, "lowercase identifiers other than"),
        ({"M1": {}}, "lowercase identifiers"),
        ({"m1": {"in_dim": 8, "token": "<|M1|>", "token_id": 3}}, r"lacks \['projector'\]"),
        ({"m1": {"in_dim": 0, "token": "<|M1|>", "token_id": 3, "projector": {}}}, "positive integers"),
        (
            {
                "m1": {"in_dim": 8, "token": "<|M1|>", "token_id": 3, "projector": {"name": "linear"}},
                "m2": {"in_dim": 8, "token": "<|M2|>", "token_id": 3, "projector": {"name": "linear"}},
            },
            "share a placeholder token id",
        ),
    ],
)
def test_bad_modality_blocks_are_rejected(block, message):
    class Config:
        modalities = block

    with pytest.raises(ValueError, match=message):
        modality_specs(Config())


def test_mismatched_modality_checkpoints_are_rejected(two_modality_ckpt, tmp_path):
    bad_width = tmp_path / "width"
    shutil.copytree(two_modality_ckpt, bad_width)
    cfg = json.loads((bad_width / "config.json").read_text())
    cfg["modalities"]["m2"]["in_dim"] = 256
    (bad_width / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="in_dim=256 but its projector block declares in_dim=512"):
        validate_checkpoint(bad_width)
    cfg["modalities"]["m2"]["projector"]["in_dim"] = 256
    (bad_width / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"modality_projectors\.m2\.\* do not match.*\(128, 256\), \(128, 512\)"):
        validate_checkpoint(bad_width)
    with pytest.raises(ValueError, match=r"modality_projectors\.m2\.\* do not match"):
        load_model(bad_width)

    bad_token = tmp_path / "token"
    shutil.copytree(two_modality_ckpt, bad_token)
    cfg = json.loads((bad_token / "config.json").read_text())
    cfg["modalities"]["m1"]["token_id"] = 5
    (bad_token / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"placeholder <\|M1\|> = id 5, but tokenizer.json has <\|M1\|> = \d+; re-create"):
        validate_checkpoint(bad_token)

    with pytest.raises(ValueError, match="already has"):
        add_modalities(two_modality_ckpt, tmp_path / "again", {"m1": SPECS["m1"]})


def test_adding_a_modality_keeps_the_others(two_modality_ckpt, tmp_path):
    three = add_modalities(two_modality_ckpt, tmp_path / "three", {"m3": {"in_dim": 64, "projector": {"name": "linear"}}}, seed=5)
    before, after = load_model(two_modality_ckpt), load_model(three)
    assert sorted(modality_specs(after.config)) == ["m1", "m2", "m3"]
    assert modality_specs(after.config)["m3"].max_len == 512  # the default
    for name in ("m1", "m2"):
        for (k, v), (k2, v2) in zip(before.modality_projectors[name].state_dict().items(),
                                    after.modality_projectors[name].state_dict().items(), strict=True):
            assert k == k2 and torch.equal(v, v2)
    with pytest.raises(ValueError, match=r"needs \['projector'\]"):
        add_modalities(two_modality_ckpt, tmp_path / "bad", {"m4": {"in_dim": 8}})


def test_twin_rejects_unknown_or_missing_modality_rows(two_modality_ckpt):
    model = load_model(two_modality_ckpt)
    t1 = modality_specs(model.config)["m1"].token_id
    with pytest.raises(ValueError, match=r"unknown modalities \['m9'\]"):
        model.embed(torch.tensor([[5, 6]]), [], {"m9": [torch.zeros(1, 128)]})
    with pytest.raises(ValueError, match=r"2 <\|M1\|> placeholders but 0 embeddings"):
        model.embed(torch.tensor([[5, t1, t1]]), [])


def test_token_ids_must_be_new_and_inside_the_vocabulary():
    class Text:
        vocab_size = 100

    def config(token_id, name="m1"):
        class Config:
            text_config, audio_token_id = Text(), 7
            modalities = {name: {"in_dim": 8, "token": "<|M1|>", "token_id": token_id, "projector": {"name": "linear"}}}
        return Config()

    assert modality_specs(config(99))["m1"].token_id == 99
    for bad in (7, 100, -1):
        with pytest.raises(ValueError, match="must be a new token inside the LLM vocabulary"):
            modality_specs(config(bad))
    with pytest.raises(ValueError, match="lowercase identifiers"):
        modality_specs(config(99, name="m1\n"))
