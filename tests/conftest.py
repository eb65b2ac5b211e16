"""Shared fixtures: offline mode, a network guard, and one tiny model built per session."""

from __future__ import annotations

import ipaddress
import os
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

_real_connect = socket.socket.connect


class NetworkBlocked(RuntimeError):
    """Raised when a test tries to reach anything but this machine."""


def _guarded_connect(sock: socket.socket, address) -> None:
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            raise NetworkBlocked(f"tests must stay offline; blocked a connection to {address!r}")
    return _real_connect(sock, address)


@pytest.fixture(autouse=True, scope="session")
def no_network():
    """Every test runs with outbound connections refused (loopback allowed)."""
    socket.socket.connect = _guarded_connect
    yield
    socket.socket.connect = _real_connect


@pytest.fixture(scope="session")
def tiny():
    """A random-init tiny model and its processor (built once; tests must not change the weights): the preset
    without SAM 2's memory modules and with qwen_vl_utils' video settings, which the tests of those features
    set themselves (``tests/test_tiny_preset.py`` checks the preset with them)."""
    from citrus_v.recipes.presets import build_tiny

    model, processor = build_tiny(seed=0, video=False)
    return model, processor


@pytest.fixture(scope="session")
def tiny_dir(tiny, tmp_path_factory):
    """The tiny model saved to a folder."""
    model, processor = tiny
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def phantom(seed: int = 0, size: int = 224):
    from citrus_v.data.synth import make_phantom

    return make_phantom(np.random.default_rng(seed), size=size)


def seg_sample(num_seg: int, seed: int = 0, with_masks: bool = True) -> dict:
    """A sample whose answer holds ``num_seg`` ``[SEG]`` tokens (alternating lesion/organ masks)."""
    p = phantom(seed)
    targets = ["lesion", "organ"] * 3
    answer = "Sure, " + ", ".join(f"{t} [SEG]" for t in targets[:num_seg]) + "." if num_seg else "No."
    sample = {
        "messages": [
            {"role": "user", "content": "<image>Segment every target."},
            {"role": "assistant", "content": answer},
        ],
        "images": [p.image],
    }
    if with_masks:
        sample["masks"] = [p.masks[t] for t in targets[:num_seg]]
    return sample


def assert_trains_the_vision_tower_alone(model, loss) -> None:
    """``loss`` alone (an image-token auxiliary loss) reaches the vision tower's first block and not the LM."""
    model.zero_grad()
    loss.backward()
    grad = model.mllm.model.visual.blocks[0].attn.qkv.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert model.mllm.model.language_model.layers[0].mlp.up_proj.weight.grad is None
