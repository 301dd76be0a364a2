"""Build the data and the tiny checkpoints without running anything else.

    python -m experiments.prepare                # the synthetic corpus and the tiny random checkpoint
    python -m experiments.prepare hub_tiny=true  # + a tiny model in the hub layout of Qwen2-Audio-7B-Instruct

What `make run`'s prepare stage builds first (the pretrained base comes with it:
`python -m experiments.run stages=[prepare]`). Everything is cached under $Q2AP_CACHE.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from experiments.data.prepare import ensure_synthetic
from experiments.training.base import ensure_hub_tiny, ensure_random_tiny


@hydra.main(config_path="../conf/apps", config_name="prepare", version_base=None)
def main(cfg: DictConfig) -> None:
    print(f"[prepare] tiny random checkpoint: {ensure_random_tiny()}")
    if cfg.hub_tiny:
        print(f"[prepare] hub-shaped tiny Qwen2-Audio: {ensure_hub_tiny()}")
    if cfg.data:
        print(f"[prepare] synthetic corpus: {ensure_synthetic()['train'].parent}")


if __name__ == "__main__":
    main()
