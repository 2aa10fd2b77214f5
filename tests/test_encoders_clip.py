"""CLIP-family encoders from a local directory: tiny random CLIP checkpoints built here, offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.model.api import InspectionModel, ModelConfig
from inference.model.encoders import EncoderConfig, build_encoder
from ingest.simulator import LineSimulator

CORPUS = ["a photo of a damaged disc.", "a photo of the flawless object.", "perfect unblemished part without flaw",
          "broken bottle with defect", "object with damage"]


def save_tiny_clip(path, layers: int = 4, image_size: int = 32, patch_size: int = 8) -> str:
    """A randomly initialised CLIP (vision + text tower) and a byte-level BPE tokenizer, saved to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(CORPUS, trainer)
    bos, eos = bpe.token_to_id("<bos>"), bpe.token_to_id("<eos>")
    bpe.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                       special_tokens=[("<bos>", bos), ("<eos>", eos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<bos>",
                                        eos_token="<eos>", model_max_length=32)
    config = CLIPConfig(
        text_config=dict(vocab_size=bpe.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                           image_size=image_size, patch_size=patch_size),
        projection_dim=24)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def test_clip_encoder_taps_four_depths_and_embeds_text(clip_dir):
    encoder = build_encoder(EncoderConfig(name=f"clip:{clip_dir}")).eval()
    assert encoder.layers == (1, 2, 3, 4) and encoder.stage_dims == (32,) * 4
    assert encoder.embed_dim == 24 and encoder.text_dim == 24 and encoder.has_text
    pixels = encoder.preprocess([np.zeros((40, 50, 3), np.uint8), np.full((20, 20), 200, np.uint8)])
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.uint8
    with torch.inference_mode():
        out = encoder(encoder.normalize(pixels))
        text = encoder.encode_text(["a photo of a damaged disc.", "a photo of the flawless object."])
    assert out.global_embedding.shape == (2, 24)
    assert [tuple(f.shape) for f in out.patch_features] == [(2, 32, 4, 4)] * 4   # CLS dropped: 32/8 = 4
    assert not torch.equal(out.patch_features[0], out.patch_features[3])       # different depths
    assert text.shape == (2, 24) and torch.isfinite(text).all()
    assert not torch.allclose(text[0], text[1])


def test_imagebind_spec_same_path_other_depths(tmp_path):
    path = save_tiny_clip(tmp_path / "tiny-imagebind", layers=8)
    with pytest.raises(ValueError, match="4 block depths"):   # ViT-H defaults 8, 16, 24, 32 don't fit 8 blocks
        build_encoder(EncoderConfig(name=f"imagebind:{path}"))
    encoder = build_encoder(EncoderConfig.parse(f"imagebind:{path}@2,4,6,8")).eval()
    assert encoder.layers == (2, 4, 6, 8)
    with torch.inference_mode():
        out = encoder(encoder.normalize(encoder.preprocess([np.zeros((32, 32, 3), np.uint8)])))
    assert [tuple(f.shape) for f in out.patch_features] == [(1, 32, 4, 4)] * 4
    assert out.global_embedding.shape == (1, 24)


@pytest.mark.parametrize("pretrained", [True, False])
def test_inspection_model_scores_with_clip_and_allows_zero_shot(clip_dir, pretrained):
    model = InspectionModel(ModelConfig(encoder=EncoderConfig(name=f"clip:{clip_dir}", pretrained=pretrained),
                                        device="cpu"))
    sim = LineSimulator(size=64)
    model.add_references("disc", sim.normal_references("disc", 2))
    part = sim.part(1, product="disc", defect_type="scratch")
    [(verdict, anomaly_map)] = model.score([(part.product, part.image)])
    assert anomaly_map.shape == part.image.shape[:2] and np.isfinite(anomaly_map).all()
    assert verdict.score == pytest.approx(float(anomaly_map.max()))
    calibration = model.set_references("bottle", [])                           # k = 0: text tower only
    assert calibration.method == "zero-shot"
    [(verdict, anomaly_map)] = model.score([("bottle", part.image)])
    assert anomaly_map.shape == part.image.shape[:2] and 0.0 <= verdict.score <= 1.0


def test_random_vision_tower_of_a_named_size_runs_the_whole_model():
    """`random:<size>` builds a vision tower with random weights (speed benchmarks of ViT-H/14 etc.)."""
    from inference.model.api import Frame

    encoder = build_encoder(EncoderConfig(name="random:vit-tiny"))
    assert encoder.stage_dims == (64, 64, 64, 64) and encoder.embed_dim == 32 and not encoder.has_text
    assert encoder.layers == (1, 2, 3, 4)
    model = InspectionModel(ModelConfig(encoder=EncoderConfig(name="random:vit-tiny"), device="cpu"))
    simulator = LineSimulator(products=("tile",), seed=3)
    model.set_references("tile", simulator.normal_references("tile", 2))
    frames = [Frame(simulator.part(i).image, "tile") for i in range(3)]
    scored = model.score(frames)
    assert [s.anomaly_map.shape for s in scored] == [f.image.shape[:2] for f in frames]
    assert all(s.embedding.shape == (32,) and 0 <= s.confidence <= 1 for s in scored)
    with pytest.raises(ValueError, match="random:<vit-h-14"):
        build_encoder(EncoderConfig(name="random:vit-giant"))
