"""The decoder: patch features -> anomaly map at input resolution -> image score.

Two branches, as in AnomalyGPT:

- `ReferenceMemory` (training-free, few-shot): the patch features of k normal references, enlarged by
  rotating and flipping them. Each query patch is compared with its nearest memory patch (cosine);
  map = 1 - similarity, per stage, averaged over stages.
- a semantic branch, `TextBranch` when the encoder has a text tower (patch tokens vs. prompts built
  from AnomalyGPT's normal/abnormal state words), else `PrototypeBranch` (learned normal/abnormal
  prototypes). Its map is the softmax "abnormal" probability.

The final map is smoothed with a Gaussian; the image score is its maximum.

Example:
    >>> decoder = AnomalyDecoder(DecoderConfig(memory_stages=(1, 2)), stage_dims=(24, 40, 112, 320))
    >>> memory = decoder.build_memory([reference_stages], n_references=1, n_views=8)
    >>> maps = decoder(query_stages, memory, image_size=(320, 320))  # (B, 1, 320, 320)
    >>> scores = maps.flatten(1).amax(1)                             # (B,)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# AnomalyGPT's prompt ensemble (state words x templates); "{}" is the product name or "object".
NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage")
ABNORMAL_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = ("a photo of a {}.", "a photo of the {}.")


def state_prompts(product: str = "object") -> tuple[list[str], list[str]]:
    """(normal prompts, abnormal prompts) for one product: state words x templates."""
    noun = product.replace("_", " ") or "object"
    normal = [t.format(s.format(noun)) for s in NORMAL_STATES for t in TEMPLATES]
    abnormal = [t.format(s.format(noun)) for s in ABNORMAL_STATES for t in TEMPLATES]
    return normal, abnormal


@dataclass
class DecoderConfig:
    memory_stages: tuple[int, ...] = (1, 2)  # encoder stages in the memory; CNN: strides 8 and 16 (PatchCore)
    neighbourhood: int = 3                   # average each patch with its k x k neighbours (local context)
    augment: str = "dihedral"                # reference views: "dihedral" (8), "rotate" (4), "none" (1)
    augment_max_references: int = 4         # more references than this carry their own variation: no views
    smoothing_sigma: float = 4.0             # Gaussian on the final map, in input pixels
    max_memory: int = 262_144                # patches per stage; beyond, a seeded random subset
    coreset: float = 0.25                    # keep this share of each bank, picked greedily (PatchCore)
    coreset_min: int = 2048                  # banks this small are kept whole
    semantic_weight: float = 1.0             # weight of the text/prototype map next to the memory map
    temperature: float = 100.0               # softmax(100 * cos) as in CLIP and AnomalyGPT
    query_chunk: int = 1 << 20               # elements of one query x memory similarity block: 4 MB stays
                                             # in cache on a CPU (3x faster than 128 MB); CUDA takes more


# --- reference memory ----------------------------------------------------------------------------

def augment_views(images: torch.Tensor, augment: str) -> torch.Tensor:
    """(k, 3, S, S) -> (k * views, 3, S, S): rotations by 0/90/180/270 degrees, optionally mirrored."""
    if augment == "none":
        return images
    rotations = [torch.rot90(images, r, dims=(2, 3)) for r in range(4)]
    if augment == "rotate":
        return torch.cat(rotations)
    if augment == "dihedral":
        return torch.cat(rotations + [torch.flip(v, dims=(3,)) for v in rotations])
    raise ValueError(f"unknown augment {augment!r}: dihedral, rotate or none")


def local_patches(features: torch.Tensor, neighbourhood: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, h, w) averaged over a k x k neighbourhood, zero padding ignored."""
    if neighbourhood <= 1:
        return features
    return F.avg_pool2d(features, neighbourhood, stride=1, padding=neighbourhood // 2, count_include_pad=False)


class ReferenceMemory:
    """Unit-norm patch features of one product's references, one (M_s, C_s) bank per memory stage."""

    def __init__(self, banks: list[torch.Tensor], n_references: int, n_views: int):
        self.banks = banks                 # per memory stage: (M_s, C_s)
        self.n_references = n_references
        self.n_views = n_views

    def __len__(self) -> int:
        return self.banks[0].shape[0] if self.banks else 0

    @property
    def is_empty(self) -> bool:
        return self.n_references == 0


def nearest_distance(query: torch.Tensor, bank: torch.Tensor, chunk: int) -> torch.Tensor:
    """Cosine distance of every query patch to its nearest bank patch.

    query: (B, C, h, w) unit-norm along C; bank: (M, C) unit-norm -> (B, 1, h, w)
    """
    B, C, h, w = query.shape
    flat = query.permute(0, 2, 3, 1).reshape(-1, C)          # (B*h*w, C)
    rows = max(1, chunk // max(1, bank.shape[0]))
    best = torch.cat([(block @ bank.T).amax(dim=1) for block in flat.split(rows)])  # (B*h*w,)
    return (1.0 - best.float()).clamp_min(0).view(B, 1, h, w)


def greedy_coreset(bank: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of `size` rows of `bank` (M, C) that cover it: each pick is the row farthest from those
    already picked (k-center greedy, as PatchCore), so rare normal patches survive and repeats go."""
    M = bank.shape[0]
    first = int(torch.randint(M, (1,), generator=generator))
    picked = torch.empty(size, dtype=torch.long)
    picked[0] = first
    # unit-norm rows: cosine distance = 1 - dot; keep each row's distance to its nearest pick
    nearest = 1.0 - bank @ bank[first]
    for i in range(1, size):
        index = int(torch.argmax(nearest))
        picked[i] = index
        nearest = torch.minimum(nearest, 1.0 - bank @ bank[index])
    return picked.to(bank.device)


# --- semantic branches ---------------------------------------------------------------------------

class TextBranch(nn.Module):
    """Patch tokens vs. normal/abnormal prompt embeddings (AnomalyGPT's decoder).

    One LayerNorm + Linear per stage maps patch tokens into the joint image-text space. They start as
    copies of the encoder's own CLS head (post-LayerNorm + visual projection), so the branch already
    works zero-shot; training refines them.
    """

    def __init__(self, stage_dims: tuple[int, ...], text_dim: int, token_head=None, temperature: float = 100.0):
        super().__init__()
        self.temperature = temperature
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in stage_dims)
        self.projections = nn.ModuleList(nn.Linear(c, text_dim, bias=False) for c in stage_dims)
        if token_head is not None:
            norm, projection = token_head
            for stage_norm, stage_projection in zip(self.norms, self.projections, strict=True):
                if norm is not None and norm.normalized_shape == stage_norm.normalized_shape:
                    stage_norm.load_state_dict(norm.state_dict())
                if projection is not None and projection.weight.shape == stage_projection.weight.shape:
                    stage_projection.weight.data.copy_(projection.weight.data)
                elif projection is None and stage_projection.weight.shape[0] == stage_projection.weight.shape[1]:
                    nn.init.eye_(stage_projection.weight)

    def forward(self, stages: list[torch.Tensor], prompts: torch.Tensor) -> torch.Tensor:
        """stages: S x (B, C_s, h, w); prompts: (B, 2, D) unit-norm [normal, abnormal] -> (B, 1, h, w)."""
        maps = []
        for features, norm, projection in zip(stages, self.norms, self.projections, strict=True):
            B, C, h, w = features.shape
            tokens = features.flatten(2).transpose(1, 2)                   # (B, h*w, C)
            tokens = F.normalize(projection(norm(tokens)), dim=-1)         # (B, h*w, D)
            logits = self.temperature * tokens @ prompts.transpose(1, 2)   # (B, h*w, 2)
            abnormal = logits.softmax(-1)[..., 1]                          # (B, h*w)
            maps.append(abnormal.view(B, 1, h, w))
        size = max(m.shape[-2:] for m in maps)
        return torch.stack([F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                            for m in maps]).mean(0)                        # (B, 1, h, w)


class PrototypeBranch(nn.Module):
    """Learned normal/abnormal prototypes per stage, for encoders without a text tower.

    The prototypes play the part of AnomalyGPT's text prompts: each patch is scored by softmax over
    its cosine to the [normal, abnormal] pair. They are learned per product (`fit`) from the product's
    reference views (normal) and simulated anomalies pasted onto them (synthetic.py), so one good image
    is enough and no defect image is ever needed.
    """

    def __init__(self, temperature: float = 100.0):
        super().__init__()
        self.temperature = temperature

    def stage_maps(self, stages: list[torch.Tensor], prototypes: list[torch.Tensor]) -> list[torch.Tensor]:
        """stages: S x (B, C_s, h_s, w_s); prototypes: S x (2, C_s) -> S x (B, 1, h_s, w_s) logits."""
        maps = []
        for features, pair in zip(stages, prototypes, strict=True):
            tokens = F.normalize(features.float(), dim=1)                                   # (B, C, h, w)
            cosine = torch.einsum("bchw,kc->bkhw", tokens, F.normalize(pair.float(), dim=1))  # (B, 2, h, w)
            maps.append(self.temperature * (cosine[:, 1:] - cosine[:, :1]))               # (B, 1, h, w)
        return maps

    def forward(self, stages: list[torch.Tensor], prototypes: list[torch.Tensor]) -> torch.Tensor:
        """stages: S x (B, C_s, h, w) -> (B, 1, h, w) abnormal probability, averaged over stages."""
        maps = [m.sigmoid() for m in self.stage_maps(stages, prototypes)]  # = softmax over the pair
        size = max(m.shape[-2:] for m in maps)
        return torch.stack([F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                            for m in maps]).mean(0)

    def fit(self, normal: list[torch.Tensor], anomalous: list[torch.Tensor], masks: torch.Tensor,
            steps: int = 150, lr: float = 0.02) -> list[torch.Tensor]:
        """Learn S x (2, C_s) prototypes: patches of `normal` views are label 0, patches of `anomalous`
        views are labelled by the share of their cell that `masks` (N, H, W) marks changed.

        Class-balanced logistic loss on every stage, Adam on the prototype vectors; they start at the
        normalised class means, so a few steps suffice.
        """
        with torch.inference_mode(False), torch.enable_grad():
            return self._fit(normal, anomalous, masks, steps, lr)

    def _fit(self, normal, anomalous, masks, steps, lr) -> list[torch.Tensor]:
        tokens, labels = [], []
        for stage_normal, stage_anomalous in zip(normal, anomalous, strict=True):
            h, w = stage_anomalous.shape[-2:]
            share = F.adaptive_avg_pool2d(masks[:, None].float(), (h, w))                  # (N, 1, h, w)
            x = torch.cat([stage_normal, stage_anomalous]).float()                         # (n+N, C, h, w)
            tokens.append(F.normalize(x, dim=1).permute(0, 2, 3, 1).reshape(-1, x.shape[1]).clone())  # (P, C)
            zeros = torch.zeros(stage_normal.shape[0] * h * w, device=share.device)
            labels.append(torch.cat([zeros, share.reshape(-1)]).to(x.device))              # (P,)
        prototypes, weights = [], []
        for x, y in zip(tokens, labels, strict=True):
            positive = y > 0.5
            abnormal = x[positive].mean(0) if positive.any() else -x.mean(0)
            prototypes.append(torch.stack([x[~positive].mean(0), abnormal]))               # (2, C)
            # class balance: the few abnormal patches weigh as much as all normal ones
            weights.append(torch.where(y > 0, (y <= 0).sum() / (y > 0).sum().clamp_min(1), torch.ones_like(y)))
        parameters = [p.clone().requires_grad_(True) for p in prototypes]
        optimizer = torch.optim.Adam(parameters, lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = torch.zeros((), device=tokens[0].device)
            for x, y, weight, pair in zip(tokens, labels, weights, parameters, strict=True):
                cosine = x @ F.normalize(pair, dim=1).T                                     # (P, 2)
                logits = self.temperature * (cosine[:, 1] - cosine[:, 0])
                loss = loss + F.binary_cross_entropy_with_logits(logits, y, weight=weight)
            loss.backward()
            optimizer.step()
        return [p.detach() for p in parameters]


# --- the decoder ---------------------------------------------------------------------------------

class AnomalyDecoder(nn.Module):
    """Patch features (+ reference memory, + prompts) -> smoothed anomaly map at input resolution."""

    def __init__(self, config: DecoderConfig, stage_dims: tuple[int, ...], text_dim: int | None = None,
                 token_head=None):
        super().__init__()
        self.config = config
        if text_dim is not None:
            self.semantic: nn.Module = TextBranch(stage_dims, text_dim, token_head, config.temperature)
        else:
            self.semantic = PrototypeBranch(config.temperature)
        self._kernel_cache: dict[tuple, torch.Tensor] = {}

    @property
    def zero_shot(self) -> bool:
        """The text branch needs no reference image; learned prototypes need at least one."""
        return isinstance(self.semantic, TextBranch)

    def memory_features(self, stages: list[torch.Tensor]) -> list[torch.Tensor]:
        """The memory stages, locally aggregated and unit-normalised: S x (B, C_s, h_s, w_s)."""
        out = []
        for s in self.config.memory_stages:
            features = local_patches(stages[s].float(), self.config.neighbourhood)
            out.append(F.normalize(features, dim=1))
        return out

    def build_memory(self, stage_batches, n_references: int, n_views: int, seed: int = 0) -> ReferenceMemory:
        """Reference views' features, batch by batch (each 4 x (b, C_s, h_s, w_s)) -> ReferenceMemory."""
        chunks: list[list[torch.Tensor]] = [[] for _ in self.config.memory_stages]
        for stages in stage_batches:
            for bank, features in zip(chunks, self.memory_features(stages), strict=True):
                bank.append(features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]))  # (b*h*w, C)
        banks = []
        generator = torch.Generator().manual_seed(seed)
        for parts in chunks:
            bank = torch.cat(parts)                                                        # (M, C)
            if bank.shape[0] > self.config.max_memory:
                keep = torch.randperm(bank.shape[0], generator=generator)[: self.config.max_memory]
                bank = bank[keep.to(bank.device)]
            size = max(self.config.coreset_min, round(self.config.coreset * bank.shape[0]))
            if size < bank.shape[0]:
                bank = bank[greedy_coreset(bank, size, generator)]
            banks.append(bank.contiguous())
        return ReferenceMemory(banks, n_references, n_views)

    def memory_map(self, stages: list[torch.Tensor], memory: ReferenceMemory) -> torch.Tensor:
        """1 - nearest cosine similarity, averaged over memory stages -> (B, 1, h, w) at the finest stage."""
        maps = []
        for features, bank in zip(self.memory_features(stages), memory.banks, strict=True):
            maps.append(nearest_distance(features.to(bank.dtype), bank, self.config.query_chunk))
        size = max(m.shape[-2:] for m in maps)
        return torch.stack([F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                            for m in maps]).mean(0)

    def forward(self, stages: list[torch.Tensor], memory: ReferenceMemory | None,
                image_size: tuple[int, int], prompts: torch.Tensor | None = None,
                semantic_offset: float = 0.0) -> torch.Tensor:
        """stages: 4 x (B, C_s, h_s, w_s) -> anomaly map (B, 1, H, W) at input resolution, smoothed.

        `prompts` are the semantic branch's [normal, abnormal] pair: (B, 2, D) text embeddings, or the
        product's learned prototypes (S x (2, C_s)); None leaves the branch out. `semantic_offset` is the
        semantic map's ceiling on the product's own references: only evidence beyond what normal parts
        already show is added to the memory map.
        """
        B = stages[0].shape[0]
        anomaly = torch.zeros(B, 1, *image_size, device=stages[0].device)
        has_memory = memory is not None and not memory.is_empty
        if has_memory:
            anomaly = anomaly + self._upsample(self.memory_map(stages, memory), image_size)
        if prompts is not None:
            weight = self.config.semantic_weight if has_memory else 1.0
            semantic = (self.semantic([s.float() for s in stages], prompts) - semantic_offset).clamp_min(0)
            anomaly = anomaly + weight * self._upsample(semantic, image_size)
        elif not has_memory:
            raise ValueError("no reference memory and no semantic branch: add references first")
        return self.smooth(anomaly)

    @staticmethod
    def _upsample(anomaly: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(anomaly.float(), size=image_size, mode="bilinear", align_corners=False)

    def smooth(self, anomaly: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur, (B, 1, H, W) -> (B, 1, H, W); reflect padding keeps borders honest."""
        sigma = self.config.smoothing_sigma
        if sigma <= 0:
            return anomaly
        radius = int(math.ceil(3 * sigma))
        key = (sigma, anomaly.device, anomaly.dtype)
        if key not in self._kernel_cache:
            x = torch.arange(-radius, radius + 1, device=anomaly.device, dtype=anomaly.dtype)
            kernel = torch.exp(-(x**2) / (2 * sigma**2))
            self._kernel_cache[key] = kernel / kernel.sum()
        kernel = self._kernel_cache[key]
        x = F.pad(anomaly, (radius, radius, 0, 0), mode="reflect")
        x = F.conv2d(x, kernel.view(1, 1, 1, -1))
        x = F.pad(x, (0, 0, radius, radius), mode="reflect")
        return F.conv2d(x, kernel.view(1, 1, -1, 1))
