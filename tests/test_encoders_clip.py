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
    assert anomaly_map.shape == model.image_size and np.isfinite(anomaly_map).all()
    assert verdict.score == pytest.approx(float(anomaly_map.max()))
    calibration = model.set_references("bottle", [])                           # k = 0: text tower only
    assert calibration.method == "zero-shot"
    [(verdict, anomaly_map)] = model.score([("bottle", part.image)])
    assert anomaly_map.shape == model.image_size and 0.0 <= verdict.score <= 1.0


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
    assert [s.anomaly_map.shape for s in scored] == [model.image_size] * len(frames)
    assert all(s.embedding.shape == (32,) and 0 <= s.confidence <= 1 for s in scored)
    with pytest.raises(ValueError, match="random:<vit-h-14"):
        build_encoder(EncoderConfig(name="random:vit-giant"))


# --- SigLIP: no CLS token, max-length padding, no visual projection -------------------------------

def save_tiny_siglip(path, layers: int = 4, image_size: int = 32, patch_size: int = 8) -> str:
    """A randomly initialised SiglipModel (vision + text tower) and a byte-level BPE tokenizer, saved to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, SiglipConfig, SiglipModel

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(CORPUS, trainer)
    eos = bpe.token_to_id("<eos>")
    bpe.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", eos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>",
                                        model_max_length=32)
    config = SiglipConfig(
        text_config=dict(vocab_size=bpe.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=eos,
                         eos_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                           image_size=image_size, patch_size=patch_size))
    torch.manual_seed(0)
    SiglipModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory) -> str:
    return save_tiny_siglip(tmp_path_factory.mktemp("tiny-siglip"))


def test_siglip_taps_all_patch_tokens_at_four_depths(siglip_dir):
    encoder = build_encoder(EncoderConfig(name=f"clip:{siglip_dir}")).eval()
    assert encoder.is_siglip and encoder.has_text
    assert encoder.layers == (1, 2, 3, 4) and encoder.stage_dims == (32,) * 4
    assert encoder.embed_dim == encoder.text_dim == 32                    # no visual projection: pooled width
    assert encoder.mean == encoder.std == (127.5, 127.5, 127.5)           # SigLIP's [-1, 1] normalisation
    pixels = encoder.normalize(encoder.preprocess([np.zeros((40, 50, 3), np.uint8), np.full((20, 20), 200, np.uint8)]))
    with torch.inference_mode():
        out = encoder(pixels)
        hidden = encoder.vision(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert hidden[1].shape == (2, 16, 32)                                 # SigLIP has no CLS: 4 x 4 tokens
    assert [tuple(f.shape) for f in out.patch_features] == [(2, 32, 4, 4)] * 4
    for stage, depth in zip(out.patch_features, encoder.layers, strict=True):
        # no token dropped, none shifted: patch (row, col) is token row * 4 + col of that block
        assert torch.allclose(stage.flatten(2).transpose(1, 2), hidden[depth], atol=1e-6)
    assert not torch.allclose(out.patch_features[0], out.patch_features[3])
    assert out.global_embedding.shape == (2, 32) and not torch.allclose(out.global_embedding[0],
                                                                         out.global_embedding[1])
    # a larger input: position embeddings are interpolated, the patch grid grows
    with torch.inference_mode():
        big = encoder(torch.zeros(1, 3, 64, 64))
    assert [tuple(f.shape) for f in big.patch_features] == [(1, 32, 8, 8)] * 4


def test_siglip_text_tower_embeds_the_normal_and_abnormal_prompts(siglip_dir):
    from inference.model.decoder import state_prompts

    model = InspectionModel(ModelConfig(encoder=EncoderConfig(name=f"clip:{siglip_dir}"), device="cpu"))
    encoder = model.encoder
    normal, abnormal = state_prompts("disc")
    with torch.inference_mode():
        together = encoder.encode_text(normal + abnormal)
        alone = encoder.encode_text([abnormal[0]])
        # SigLIP's own recipe: pad to max length, no attention mask
        ids = encoder.tokenizer([abnormal[0]], padding="max_length", truncation=True, return_tensors="pt").input_ids
        direct = encoder.model.get_text_features(input_ids=ids).pooler_output
        prompts = model._prompts("disc")
    assert together.shape == (len(normal) + len(abnormal), 32) and torch.isfinite(together).all()
    assert ids.shape == (1, 32)
    assert torch.allclose(alone, direct, atol=1e-5)
    assert torch.allclose(together[len(normal)], alone[0], atol=1e-5)     # padding to max length: batch-independent
    assert not torch.allclose(together[0], together[len(normal)], atol=1e-3)
    expected = torch.stack([torch.nn.functional.normalize(
        torch.nn.functional.normalize(group, dim=-1).mean(0), dim=-1)
        for group in (together[:len(normal)], together[len(normal):])])
    assert prompts.shape == (2, 32) and torch.allclose(prompts, expected, atol=1e-5)
    assert torch.allclose(prompts.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(prompts[0], prompts[1], atol=1e-3)


def test_inspection_model_scores_a_frame_with_siglip(siglip_dir):
    from inference.model.decoder import TextBranch

    model = InspectionModel(ModelConfig(encoder=EncoderConfig(name=f"clip:{siglip_dir}", image_size=64),
                                        device="cpu"))
    assert isinstance(model.decoder.semantic, TextBranch)
    assert model.decoder_config.memory_stages == (0, 1, 2, 3)           # ViT: all 4 taps, raw tokens
    sim = LineSimulator(size=64)
    calibration = model.add_references("disc", sim.normal_references("disc", 2))
    assert calibration.method in ("reshot", "held-out", "simulated", "balanced") and calibration.threshold > 0
    part = sim.part(1, product="disc", defect_type="scratch")
    [(verdict, anomaly_map)] = model.score([(part.product, part.image)])
    assert anomaly_map.shape == model.image_size and np.isfinite(anomaly_map).all()
    assert verdict.score == pytest.approx(float(anomaly_map.max()))
    assert verdict.is_anomalous == (verdict.score > verdict.threshold) and 0.0 <= verdict.confidence <= 1.0
    assert model.states["disc"].prompts.shape == (2, 32)
    assert model.set_references("bottle", []).method == "zero-shot"       # k = 0 with SigLIP's text tower
    [(verdict, anomaly_map)] = model.score([("bottle", part.image)])
    assert 0.0 <= verdict.score <= 1.0 and verdict.threshold == 0.5


# --- the text branch --------------------------------------------------------------------------------

def test_state_prompts_are_anomalygpt_state_words_times_templates():
    from inference.model.decoder import state_prompts

    normal, abnormal = state_prompts("metal_nut")
    # AnomalyGPT's lists (../shared/ANOMALYGPT.md), written out here rather than imported
    normal_states = ["{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                     "{} without damage"]
    abnormal_states = ["damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"]
    templates = ["a photo of a {}.", "a photo of the {}."]
    assert sorted(normal) == sorted(t.format(s.format("metal nut")) for s in normal_states for t in templates)
    assert sorted(abnormal) == sorted(t.format(s.format("metal nut")) for s in abnormal_states for t in templates)
    assert len(normal) == 14 and len(abnormal) == 10 and not set(normal) & set(abnormal)
    assert "a photo of the flawless metal nut." in normal and "a photo of a metal nut with defect." in abnormal
    assert all("metal nut" in p for p in normal + abnormal)
    default_normal, default_abnormal = state_prompts()
    assert "a photo of a object." in default_normal and "a photo of the broken object." in default_abnormal


def test_text_branch_follows_the_prompts(clip_dir):
    """Swapping the normal/abnormal prompt embeddings turns the zero-shot map m into 1 - m."""
    model = InspectionModel(ModelConfig(encoder=EncoderConfig(name=f"clip:{clip_dir}", image_size=64), device="cpu"))
    branch = model.decoder.semantic
    # the branch starts from the encoder's own CLS head (post-LayerNorm + visual projection)
    assert all(torch.equal(p.weight, model.encoder.model.visual_projection.weight) for p in branch.projections)
    model.set_references("disc", [])                                        # zero-shot: text branch only
    prompts = model.states["disc"].prompts                                  # (2, D) [normal, abnormal]
    image = LineSimulator(size=64).part(1, product="disc", defect_type="scratch").image
    with torch.inference_mode():
        out = model._encode(model.encoder.preprocess([image]))
        # the CLS token through the stage head lands on the global embedding
        hidden = model.encoder.vision(pixel_values=model.encoder.normalize(model.encoder.preprocess([image])),
                                      output_hidden_states=True, interpolate_pos_encoding=True).hidden_states
        cls = branch.projections[3](branch.norms[3](hidden[4][:, 0]))
        assert torch.allclose(cls, out.global_embedding, atol=1e-5)

        semantic = branch(out.patch_features, prompts[None])               # (1, 1, 8, 8)
        swapped = branch(out.patch_features, prompts.flip(0)[None])
        decoded = model.decoder(out.patch_features, None, model.image_size, prompts[None])
        decoded_swapped = model.decoder(out.patch_features, None, model.image_size, prompts.flip(0)[None])
        other = branch(out.patch_features, model._prompts("screw")[None])
        # an "abnormal" prompt pointing where the patch tokens point raises the map above 0.5
        toward = torch.stack([torch.nn.functional.normalize(proj(norm(f.flatten(2).transpose(1, 2))), dim=-1)
                              .mean((0, 1)) for f, norm, proj in
                              zip(out.patch_features, branch.norms, branch.projections, strict=True)]).mean(0)
        toward = torch.nn.functional.normalize(toward, dim=0)
        pointed = branch(out.patch_features, torch.stack([-toward, toward])[None])
    assert semantic.shape == (1, 1, 8, 8) and float(semantic.max() - semantic.min()) > 1e-3   # not a constant
    assert torch.allclose(swapped, 1 - semantic, atol=1e-5)
    assert decoded.shape == (1, 1, 64, 64) and torch.allclose(decoded_swapped, 1 - decoded, atol=1e-5)
    assert not torch.allclose(other, semantic, atol=1e-4)                   # the product name reaches the map
    assert float(pointed.mean()) > 0.75                                     # channel 1 is "abnormal"
    # and through the public path: the zero-shot score map is the text branch's map
    [(_, anomaly_map)] = model.score([("disc", image)])
    model.states["disc"].prompts = prompts.flip(0)
    [(_, flipped_map)] = model.score([("disc", image)])
    assert np.allclose(flipped_map, 1 - anomaly_map, atol=1e-4)
