"""What the pipeline is made of and where this process sits in it (foundation: standard library only).

The stage names, in the order of ``dvc.yaml`` (``tests/test_layers.py`` checks that they match),
and the one rank check: under ``torchrun`` only rank 0 validates, writes outputs and talks to
MLflow.
"""

from __future__ import annotations

import os

# Stages that build and check the data; they run before a model variant exists.
DATA_STAGES = ("synthesize", "prepare", "validate")
# The three stages of the method (one ``params.yaml`` section each, ``models/stage{1,2,3}``).
METHOD_STAGES = ("stage1_detail", "stage2_branches", "stage3_fusion")
# Every stage that trains: the stand-in backbone's pretraining, then the method's stages.
TRAIN_STAGES = ("pretrain_backbone", *METHOD_STAGES)
# The whole pipeline, in the order of dvc.yaml.
STAGES = (*DATA_STAGES, *TRAIN_STAGES, "evaluate", "register")


def rank() -> int:
    """This process's global rank under ``torchrun`` (``$RANK``), 0 when not distributed."""
    return int(os.environ.get("RANK") or 0)


def local_rank() -> int:
    """This process's rank on its machine (``$LOCAL_RANK``, the CUDA device it uses), 0 when not distributed."""
    return int(os.environ.get("LOCAL_RANK") or 0)


def is_main_process() -> bool:
    """Rank 0 (or no DDP): the process that validates, writes outputs and tracks."""
    return rank() == 0
