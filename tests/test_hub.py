"""Offline hub lookups fail in seconds with the clear message: the offline variables are honoured and a missing
network is detected once per process (a monkeypatched probe: no test touches the network)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from huggingface_hub import constants

from qkvprobe import load_backbone
from qkvprobe.backbones import hub
from qkvprobe.errors import WeightsError


@pytest.fixture
def online_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """No offline variable set, huggingface_hub in online mode with an empty cache, a fresh probe memory, and
    every socket connection recorded and refused (so a test fails if anything tries the network)."""
    for name in hub.OFFLINE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(hub, "_reachable", {})
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:1]))
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.mark.parametrize("name", hub.OFFLINE_ENV)
def test_offline_variables_are_honoured(monkeypatch: pytest.MonkeyPatch, online_env, name: str) -> None:
    monkeypatch.setattr(hub, "probe", lambda host, timeout=0: pytest.fail("probed although declared offline"))
    monkeypatch.setenv(name, "1")
    assert hub.offline_reason() == f"{name}=1 is set"
    monkeypatch.setenv(name, "0")
    monkeypatch.setattr(hub, "probe", lambda host, timeout=0: True)
    assert hub.offline_reason() is None


def test_no_network_is_probed_once(monkeypatch: pytest.MonkeyPatch, online_env) -> None:
    calls: list[str] = []
    monkeypatch.setattr(hub, "probe", lambda host, timeout=0: calls.append(host) or False)
    assert hub.offline_reason() == "huggingface.co cannot be reached (no network)"
    assert hub.offline_reason() == "huggingface.co cannot be reached (no network)"
    assert calls == ["huggingface.co"]
    with hub.hub_access() as reason:
        assert reason and constants.HF_HUB_OFFLINE is True  # huggingface_hub reads the cache only
    assert constants.HF_HUB_OFFLINE is False  # restored


def test_probe_gives_up_after_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def hang(*args, **kwargs):  # a DNS lookup / connect that never answers
        release.wait(30)
        raise OSError("released")

    monkeypatch.setattr(socket, "create_connection", hang)
    try:
        assert hub.probe("huggingface.co", timeout=0.05) is False  # returns: the join timed out
    finally:
        release.set()

    class Connection:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: Connection())
    assert hub.probe("huggingface.co", timeout=1) is True
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("down")))
    assert hub.probe("huggingface.co", timeout=1) is False


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        (
            "timm:vit_small_patch16_224.dino",
            r"could not fetch pretrained weights for timm:vit_small_patch16_224\.dino \(offline: huggingface\.co "
            r"cannot be reached \(no network\); .*\); download them once with internet access or pass --weights PATH",
        ),
        (
            "hf:facebook/dinov2-small",
            r"could not fetch the config of hf:facebook/dinov2-small \(offline: huggingface\.co cannot be reached",
        ),
    ],
)
def test_offline_lookup_fails_without_touching_the_network(
    monkeypatch: pytest.MonkeyPatch, online_env: list[str], spec: str, pattern: str
) -> None:
    monkeypatch.setattr(hub, "probe", lambda host, timeout=0: False)
    with pytest.raises(WeightsError, match=pattern) as info:
        load_backbone(spec)
    assert "\n" not in str(info.value)
    assert online_env == []  # huggingface_hub's offline mode: no connection, hence no retries
    assert constants.HF_HUB_OFFLINE is False
