"""Official checkpoint layouts → the key names of the architecture they load into (``--weights PATH``).

Only what the libraries' own filters do not convert lives here; timm's ``checkpoint_filter_fn`` of each
architecture runs after these steps (DINOv3's ``storage_tokens``/``ls1.gamma``/``qkv.bias``, EVA-02's
``mlp.w1``/``q_bias`` names and MIM ``norm``, position-embedding resampling). Each step changes a state dict only
when its source keys are in the file and absent from the model, and says what it did in a note:

- MoCo v3 (``{"state_dict": {"module.base_encoder.*", "module.momentum_encoder.*", "module.predictor.*"}}``):
  keep the online ``base_encoder``, which MoCo v3's own linear evaluation uses; the momentum encoder and the
  predictor are dropped.
- BEiT / data2vec pre-training (the BEiT code base, ``{"model": ...}``): one relative position bias shared by all
  blocks (``rel_pos_bias.relative_position_bias_table``) is copied into every block's table, as BEiT's
  fine-tuning code does: the same bias in every block, so the outputs are unchanged.
- Masked-image-modelling pre-training (BEiT, data2vec, EVA-02): the final ``norm`` (or Hugging Face
  ``layernorm``) is moved to the pooling norm (``fc_norm`` / ``pooler.layernorm``) of a model that normalises
  after pooling, which is where qkvprobe's ``ffn_norm`` reads it (applied to every token).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

#: Training wrappers that hold several sub-models: (prefix of the one to keep, what it is).
SUBMODELS: tuple[tuple[str, str], ...] = (
    ("module.base_encoder.", "MoCo v3 base_encoder"),
    ("base_encoder.", "MoCo v3 base_encoder"),
)
#: A relative position bias shared by all blocks, and each block's own table (timm Beit names).
SHARED_REL_POS = "rel_pos_bias.relative_position_bias_table"
BLOCK_REL_POS = "attn.relative_position_bias_table"
#: (final norm prefix in a pre-training checkpoint, pooling norm prefix of a model that normalises after pooling).
NORM_MOVES: tuple[tuple[str, str], ...] = (("norm.", "fc_norm."), ("layernorm.", "pooler.layernorm."))

State = dict[str, torch.Tensor]


def _matches(keys: Iterable[str], model_keys: set[str]) -> int:
    return sum(k in model_keys for k in keys)


def select_submodel(state: State, model_keys: set[str]) -> tuple[State, list[str]]:
    """Keep one sub-model of a multi-model checkpoint (MoCo v3) when its keys fit the model better."""
    for prefix, what in SUBMODELS:
        inner = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if inner and _matches(inner, model_keys) > _matches(state, model_keys):
            others = len(state) - len(inner)
            return inner, [
                f"{what} kept ({prefix!r} stripped, {others} keys of the other sub-models dropped)"
            ]
    return state, []


def share_rel_pos_bias(state: State, model_keys: set[str]) -> tuple[State, list[str]]:
    """Copy a shared relative position bias table into every block's table the model has and the file lacks."""
    targets = sorted(k for k in model_keys if k.endswith(BLOCK_REL_POS))
    if SHARED_REL_POS not in state or SHARED_REL_POS in model_keys or not targets:
        return state, []
    if any(t in state for t in targets):
        return state, []
    out = {k: v for k, v in state.items() if not k.startswith("rel_pos_bias.")}
    table = state[SHARED_REL_POS]
    for target in targets:
        out[target] = table.clone()
    return out, [f"shared relative position bias copied into {len(targets)} blocks"]


def move_final_norm(state: State, model_keys: set[str]) -> tuple[State, list[str]]:
    """Rename a pre-training checkpoint's final norm to the model's pooling norm where only that one exists."""
    for source, target in NORM_MOVES:
        keys = [k for k in state if k.startswith(source)]
        if not keys or any(k in model_keys for k in keys) or any(k.startswith(target) for k in state):
            continue
        renamed = {k: target + k[len(source) :] for k in keys}
        if all(new in model_keys for new in renamed.values()):
            out = {renamed.get(k, k): v for k, v in state.items()}
            return out, [f"final norm {source!r} → pooling norm {target!r}"]
    return state, []


def convert_layout(state: State, model_keys: set[str]) -> tuple[State, list[str]]:
    """Run every step above; returns the converted state dict and notes of what changed."""
    notes: list[str] = []
    for step in (select_submodel, share_rel_pos_bias, move_final_norm):
        state, said = step(state, model_keys)
        notes += said
    return state, notes
