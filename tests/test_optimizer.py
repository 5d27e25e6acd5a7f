"""AdamW parameter groups: weight decay goes by parameter name, as the rules say."""

from __future__ import annotations

import re

import pytest

from detailfusion.models import create_model, get_model_config, list_variants
from detailfusion.train.tasks import param_groups

# What must not be decayed: norms, biases, embeddings (token/positional/class/segment), learned
# tokens (Q-Former queries, the compositor's CLS token) and the logit scale.
EXEMPT = re.compile(
    r"(norm|ln_|LayerNorm|layernorm)[^.]*\.(weight|bias)$|bias$|embedding|query_tokens|cls_token|\.segment$|logit_scale"
)


@pytest.mark.parametrize("variant", list_variants())
def test_no_decay_group_holds_exactly_norms_biases_embeddings_and_tokens(variant):
    model = create_model(get_model_config("tiny"), variant=variant)
    named = model.parameter_groups()
    groups = param_groups({k: (v, 1e-3) for k, v in named.items()}, weight_decay=0.05)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["param_names"]}
    exempt = {n for g in groups if g["weight_decay"] == 0 for n in g["param_names"]}
    assert decayed and exempt and not decayed & exempt
    assert all(len(g["params"]) == len(g["param_names"]) for g in groups)
    assert {n for n in exempt if not EXEMPT.search(n)} == set()
    assert {n for n in decayed if EXEMPT.search(n)} == set()
    # the names the old list-based groups never matched (backbone.0, backbone.1, ...)
    assert "backbone.clip.token_embedding.weight" in exempt
    assert "backbone.clip.visual.positional_embedding" in exempt
    if "di" in named and named["di"]:
        assert "di.query_tokens" in exempt
    if named["afc"]:
        assert "afc.cls_token" in exempt
    all_names = {n for v in named.values() for n, p in v}
    assert decayed | exempt == all_names  # every trainable parameter is in exactly one group
