"""A copy of a checkpoint with extra embedding modalities: new placeholder tokens
and freshly initialised (seeded) projectors, one per modality (qwen2_audio_vllm.derive).

    python -m experiments.derive src=DIR out=DIR \\
        'spec={m1: {in_dim: 768, projector: {name: mlp}}, m2: {in_dim: 512, projector: {name: linear}}}'
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(config_path="../conf/apps", config_name="derive", version_base=None)
def main(cfg: DictConfig) -> None:
    from qwen2_audio_vllm.checkpoint import load_config
    from qwen2_audio_vllm.derive import add_modalities
    from qwen2_audio_vllm.modalities import modality_specs

    out = add_modalities(Path(cfg.src), Path(cfg.out), OmegaConf.to_container(cfg.spec, resolve=True), seed=cfg.seed)
    for m in modality_specs(load_config(out)).values():
        print(f"{m.name}: ({m.in_dim}-wide rows) -> {m.projector['name']} projector, placeholder {m.token} (id {m.token_id})")
    print(out)


if __name__ == "__main__":
    main()
