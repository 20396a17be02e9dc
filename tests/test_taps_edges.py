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
