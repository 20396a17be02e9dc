"""Edges of ``qkvprobe.taps`` that the mutation run (``make mutation MODULE=taps.py``, docs/testing.md) found
unpinned: the token plan when ``ffn`` comes first, a model without a final norm, keyword inputs, and each
user-facing message whole (what a user reads is the behaviour)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from qkvprobe.errors import DataError, FeatureError, ModelError
from qkvprobe.taps import TapSite, check_finite, first_input
from test_taps import tiny_timm, wrap


def test_ffn_first_still_taps_the_attention_tokens() -> None:
    """Tokens in any order: ``ffn`` before ``q`` plans q's hook too (ffn needs none of its own)."""
    bb = wrap(tiny_timm())
    x = torch.randn(2, 1, 16, 16)
    out = bb.extract(x, tokens=("ffn", "ffn_norm", "q", "v"))
    ref = bb.extract(x, tokens=("q", "v", "ffn"))
    for kind in ("q", "v", "ffn"):
        torch.testing.assert_close(out[kind], ref[kind], atol=0, rtol=0)


def test_model_without_final_norm_gives_every_token_but_ffn_norm() -> None:
    model = tiny_timm()
    model.norm = torch.nn.Identity()  # no final norm, and fc_norm is Identity (class-token pooling)
    bb = wrap(model)
    assert bb.ffn_norm_source is None
    out = bb.extract(torch.randn(1, 1, 16, 16), tokens=("q", "ffn"))
    assert set(out) == {"q", "ffn"}
    with pytest.raises(
        FeatureError,
        match=r"^timm:tiny-test has no final norm, so 'ffn_norm' would equal 'ffn'; drop ffn_norm from the tokens$",
    ):
        bb.extract(torch.randn(1, 1, 16, 16), tokens=("q", "ffn_norm"))


def test_first_input_by_keyword_and_check_finite_message() -> None:
    t = torch.ones(1)
    assert first_input((), {"hidden_states": t}) is t
    assert first_input((t,), {"hidden_states": torch.zeros(1)}) is t
    with pytest.raises(
        FeatureError,
        match=r"^where: tap 'q' contains NaN/Inf; check the input normalisation and the weights, or extract in "
        r"float32 \(amp off\)$",
    ):
        check_finite({"q": torch.tensor([1.0, float("nan")])}, "where")


def test_input_errors_say_what_was_given_and_what_works() -> None:
    bb = wrap(tiny_timm())
    with pytest.raises(
        DataError,
        match=r"^timm:tiny-test: images must be a float tensor \[B, C, H, W\], got Tensor of shape \(1, 16, 16\)$",
    ):
        bb.extract(torch.randn(1, 16, 16))
    with pytest.raises(DataError, match=r"got ndarray of shape \(1, 1, 16, 16\)$"):
        bb.extract(np.zeros((1, 1, 16, 16), np.float32))  # type: ignore[arg-type]
    size = tuple(bb.data_config["input_size"])
    assert size
    with pytest.raises(
        DataError,
        match="^"
        + re.escape(
            f"timm:tiny-test takes 1-channel images, got 3 channels; preprocess with the backbone's data_config "
            f"(input_size {size})"
        )
        + "$",
    ):
        bb.extract(torch.randn(1, 3, 16, 16))
    with pytest.raises(DataError, match=r"resize to a multiple of 4 \(height 4, width 16 or 20\)$"):
        bb.extract(torch.randn(1, 1, 3, 17))
    with pytest.raises(
        FeatureError,
        match=r"^unknown token type\(s\) \['z'\]; choose from q, k, v, ffn, ffn_norm, q_rope, k_rope$",
    ):
        bb.extract(torch.randn(1, 1, 16, 16), tokens=("q", "z"))
    with pytest.raises(FeatureError, match=r"^unknown token type\(s\) \(none\); choose from q, k"):
        bb.extract(torch.randn(1, 1, 16, 16), tokens=())
    with pytest.raises(
        FeatureError, match=r"^no block asked for; pass e\.g\. blocks=\(-1,\) for the last block$"
    ):
        bb.extract(torch.randn(1, 1, 16, 16), blocks=())


def test_a_site_without_the_tap_names_block_and_token() -> None:
    model = tiny_timm()
    bb = wrap(model)
    full = bb.tap_site

    def without_v(block: int) -> TapSite:
        site = full(block)
        return TapSite(block=site.block, taps={k: v for k, v in site.taps.items() if k != "v"})

    bb.tap_site = without_v  # type: ignore[method-assign]
    with pytest.raises(ModelError, match=r"^timm:tiny-test: block 1 describes no tap for 'v'$"):
        bb.extract(torch.randn(1, 1, 16, 16), tokens=("q", "v"))


@pytest.mark.parametrize("kind", ["ffn", "ffn_norm"])
def test_block_outputs_of_every_asked_block(kind: str) -> None:
    """``ffn`` or ``ffn_norm`` alone, of two blocks: each block's output is hooked, not only the deepest's."""
    model = tiny_timm()
    bb = wrap(model)
    x = torch.randn(1, 1, 16, 16)
    out = bb.extract(x, blocks=(0, 1), tokens=(kind,))
    with torch.no_grad():
        inter = model.forward_intermediates(
            x, indices=[0, 1], output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )
    ffn0 = torch.cat([inter[0][1], inter[0][0]], 1)
    expected = ffn0 if kind == "ffn" else bb.final_norm(ffn0)
    torch.testing.assert_close(out[(0, kind)], expected, atol=1e-5, rtol=0)


def test_attention_tokens_alone_stop_after_the_deepest_block_and_cast_the_input() -> None:
    """Without a block-output token the forward still stops after the deepest block asked for; float64 images
    are cast to the model's dtype; pre-hooks (timm Beit's recomputed projections) are all removed afterwards."""
    model = tiny_timm()
    bb = wrap(model)
    calls: list[int] = []
    handle = model.blocks[1].register_forward_hook(lambda *a: calls.append(1))  # returns None
    try:
        out = bb.extract(torch.randn(1, 1, 16, 16), blocks=(0,), tokens=("q",))
    finally:
        handle.remove()
    assert calls == [] and set(out) == {"q"}
    x = torch.randn(1, 1, 16, 16)
    torch.testing.assert_close(bb.extract(x.double(), tokens=("q",))["q"], bb.extract(x, tokens=("q",))["q"])
    from test_taps_timm_families import beit
    from test_taps_timm_families import wrap as wrap_timm

    b = beit("beit")
    wrap_timm(b).extract(torch.randn(1, 1, 16, 16), tokens=("q", "k", "v"))
    for module in b.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks


def test_a_nan_tap_names_the_model() -> None:
    model = tiny_timm()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[0, 0] = float("nan")
    with pytest.raises(FeatureError, match=r"^timm:tiny-test: tap 'q' contains NaN/Inf"):
        wrap(model).extract(torch.randn(1, 1, 16, 16), blocks=(0,), tokens=("q",))


def test_select_positions_messages_and_the_last_prefix_boundary() -> None:
    from qkvprobe.taps import select_positions

    with pytest.raises(
        FeatureError, match=r"^select_positions expects a \[B, T, D\] tensor, got shape \(\)$"
    ):
        select_positions([1, 2], ("cls",), 1, True)
    with pytest.raises(
        FeatureError, match=r"^select_positions expects a \[B, T, D\] tensor, got shape \(2, 3\)$"
    ):
        select_positions(np.zeros((2, 3)), ("cls",), 1, True)
    with pytest.raises(
        FeatureError,
        match=r"^tap has 5 tokens but 5 prefix tokens: no patch tokens are left; check num_prefix_tokens$",
    ):
        select_positions(np.zeros((2, 5, 3)), ("avg",), 5, True)
    with pytest.raises(FeatureError, match=r"^unknown position 'mean'; choose from cls, avg, patch$"):
        select_positions(np.zeros((2, 5, 3)), ("mean",), 1, True)
    with pytest.raises(
        FeatureError,
        match=r"^position 'cls' asked from a model without a class token; use 'avg' \(mean of patch tokens\) or "
        r"'patch' instead$",
    ):
        select_positions(np.zeros((2, 5, 3)), ("cls",), 0, False)


def test_image_errors_without_shape_or_input_size() -> None:
    bb = wrap(tiny_timm())
    with pytest.raises(DataError, match=r"got list of shape \(\)$"):
        bb.extract([[1.0]])  # type: ignore[arg-type]
    bb.data_config = {k: v for k, v in bb.data_config.items() if k != "input_size"}
    with pytest.raises(DataError, match=r"data_config \(input_size \(\)\)$"):
        bb.extract(torch.randn(1, 3, 16, 16))
