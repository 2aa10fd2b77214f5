"""The batched inference API: the one object the worker, `lineguard eval` and the benchmarks use.

This is orchestration: it holds per-product state (reference memory, prompts, calibration), batches
frames through the encoder once, runs the decoder per product and turns maps into verdicts. The
tensor work lives in encoders.py, decoder.py, prompt_learner.py and lvlm.py.

Example:
    >>> model = InspectionModel()                                   # efficientnet-lite0, CPU or CUDA
    >>> model.add_references("bottle", [good_bgr])                  # 1-shot; threshold is derived here
    >>> [(verdict, anomaly_map)] = model.score([Frame(image_bgr, "bottle")])
    >>> verdict.is_anomalous, verdict.positions, anomaly_map.shape        # the map at model resolution;
    (True, ['top left'], (320, 320))                                     # regions in frame pixels
    >>> model.set_references("wafer", goods, tiling=Tiling.parse("3x3"))  # small defects: inspect in tiles
    >>> model.answer([model.score([Frame(image_bgr, "bottle")])[0]])
    ['Yes, there is an anomaly in the image, at the top left of the image.']
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from lineguard.logging import get_logger

from .decoder import AnomalyDecoder, DecoderConfig, ReferenceMemory, augment_views, state_prompts
from .descriptor import defect_descriptor
from .encoders import EncoderConfig, EncoderOutput, build_encoder
from .synthetic import simulate_batch
from .tiles import NO_TILES, Tiling
from .verdict import Calibration, ModelVerdict, VerdictConfig, calibrate, calibrate_tail, make_verdict

log = get_logger(__name__)

MODEL_VERSION = "fewshot-memory-4"


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig | None = None   # None = the encoder family's defaults (see default_decoder)
    verdict: VerdictConfig = field(default_factory=VerdictConfig)
    device: str = "auto"                   # "auto" = CUDA when available, else CPU
    precision: str = "auto"                # "auto" = bf16/fp16 on CUDA, fp32 on CPU; or fp32|fp16|bf16
    batch_size: int = 16                   # frames per call of the model (and per encoder pass on CUDA)
    cpu_micro_batch: int = 1               # frames per pass on a CPU: bigger batches fall out of cache and run
                                           # no faster per frame (measured in `lineguard bench stream`)
    n_jitter: int = 8                      # re-shot reference views for the threshold (few-shot)
    prototype_views: int = 16              # simulated-anomaly views that teach the learned prototypes
    prototype_steps: int = 150             # optimiser steps of the prototype fit (no text tower)
    seed: int = 0
    llm: str | None = None                 # causal LM dir or .gguf for answers; None = SmolLM2-135M GGUF


def default_decoder(encoder) -> DecoderConfig:
    """CNN: memory on strides 8 and 16 with 3x3 local context (PatchCore); ViT: all 4 taps, raw tokens
    (AnomalyGPT)."""
    if len(set(encoder.stage_dims)) == 1:
        return DecoderConfig(memory_stages=(0, 1, 2, 3), neighbourhood=1)
    return DecoderConfig()


@dataclass
class Frame:
    """A decoded frame: (H, W, 3) BGR or (H, W) grey uint8, any size.

    `size` is the (width, height) of the camera's frame when `image` was decoded at a reduced scale; regions
    and mm_per_px are in those pixels. None: the image's own size."""

    image: np.ndarray
    product: str
    mm_per_px: float | None = None
    size: tuple[int, int] | None = None


@dataclass
class ScoredFrame:
    """One result of `score`; unpacks as `(verdict, anomaly_map)`."""

    verdict: ModelVerdict
    anomaly_map: np.ndarray          # (h, w) float32 at model resolution (S x S; tiled: the stitched tiles)
    product: str
    embedding: np.ndarray            # (D,) the encoder's global embedding, for the LVLM's image token
    descriptor: np.ndarray | None = None  # (≤256,) float16 of the main defect, flagged frames only (descriptor.py)

    def __iter__(self):
        return iter((self.verdict, self.anomaly_map))

    # the worker reads verdict fields straight off the result
    score = property(lambda self: self.verdict.score)
    threshold = property(lambda self: self.verdict.threshold)
    is_anomalous = property(lambda self: self.verdict.is_anomalous)
    confidence = property(lambda self: self.verdict.confidence)
    regions = property(lambda self: self.verdict.regions)
    positions = property(lambda self: self.verdict.positions)


@dataclass
class ProductState:
    memory: ReferenceMemory | None
    calibration: Calibration
    prompts: torch.Tensor | list[torch.Tensor] | None  # [normal, abnormal]: (2, D) unit-norm text embeddings,
                                                        # or learned prototypes S x (2, C_s) (no text tower)
    semantic_offset: float
    references: list[np.ndarray]
    version: str | None = None       # the registry version it came from (inference/registry.py); None = references
    tiling: Tiling = NO_TILES        # a tiled product's memory and threshold are of tile views (tiles.py)


class InspectionModel:
    """Few-shot anomaly inspection of mixed-product frame batches, with AnomalyGPT-style answers.

    Args:
        config: encoder, decoder, verdict and runtime settings; defaults run efficientnet-lite0.
    """

    def __init__(self, config: ModelConfig | None = None):
        self.config = config = config or ModelConfig()
        self.device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if config.device == "auto" else config.device))
        self.dtype = _precision(config.precision, self.device)
        self.encoder = build_encoder(config.encoder).to(self.device, self.dtype).eval()
        if self.device.type == "cuda" and not self.encoder.has_text:
            # depthwise convs read NHWC faster on tensor cores
            self.encoder = self.encoder.to(memory_format=torch.channels_last)
        self.decoder_config = config.decoder or default_decoder(self.encoder)
        if config.decoder is None and self.device.type == "cuda":
            self.decoder_config.query_chunk = 1 << 26   # a GPU wants big similarity blocks
        token_head = self.encoder.token_head() if hasattr(self.encoder, "token_head") else None
        self.decoder = AnomalyDecoder(self.decoder_config, self.encoder.stage_dims, self.encoder.text_dim,
                                      token_head).to(self.device).eval()
        self.states: dict[str, ProductState] = {}
        self._lvlm = None
        self.lvlm_adapters: tuple[str | None, bytes] | None = None   # (registry version, weights)
        self.version = f"{MODEL_VERSION}+{config.encoder.name.split(':')[0]}"

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.encoder.image_size, self.encoder.image_size)

    def products(self) -> set[str]:
        return set(self.states)

    # --- references ------------------------------------------------------------------------------

    def add_references(self, product: str, images: list[np.ndarray]) -> Calibration:
        """Add normal reference images of a product, rebuild its memory and re-derive its threshold."""
        previous = self.states[product].references if product in self.states else []
        return self.set_references(product, previous + list(images))

    def set_references(self, product: str, images: list[np.ndarray], tiling: Tiling | None = None) -> Calibration:
        """Replace a product's references (k >= 0; k = 0 needs a text tower) and calibrate it; `tiling`
        (default: the product's current one) inspects its frames in tiles."""
        state = self.state_from_references(product, images, tiling)
        self.states[product] = state
        return state.calibration

    def tiling(self, product: str) -> Tiling:
        return self.states[product].tiling if product in self.states else NO_TILES

    def needed_pixels(self, product: str) -> tuple[int, int]:
        """(width, height) of a frame that still gives the encoder full detail: a decoder may shrink to it."""
        return self.tiling(product).needed_pixels(self.encoder.image_size)

    def _views(self, images: list[np.ndarray], tiling: Tiling) -> tuple[list[np.ndarray], np.ndarray]:
        """A product's views of images (its tiles, or the images), and the image each view comes from."""
        if not tiling.active:
            return list(images), np.arange(len(images))
        views = [crop for image in images for crop in tiling.split(image)]
        return views, np.repeat(np.arange(len(images)), tiling.count)

    @torch.inference_mode()
    def state_from_references(self, product: str, images: list[np.ndarray],
                              tiling: Tiling | None = None) -> ProductState:
        """A calibrated state of `product` from these references, built beside the live one (not installed)."""
        images = list(images)
        tiling = self.tiling(product) if tiling is None else tiling
        prompts = self._prompts(product) if self.encoder.has_text else None
        if not images:
            if not self.decoder.zero_shot:
                raise ValueError(f"{product}: zero-shot needs an encoder with a text tower; give references")
            return ProductState(None, calibrate(np.array([]), "zero-shot", self.config.verdict), prompts, 0.0, [],
                                tiling=tiling)
        views, groups = self._views(images, tiling)
        pixels = self.encoder.preprocess(views)                          # (k x tiles, 3, S, S) uint8
        if prompts is None and self.config.prototype_views > 0:
            prompts = self._fit_prototypes(pixels, product)
        memory, semantic_offset = self._memory(pixels, prompts)
        state = ProductState(memory, Calibration(1.0, 0.5, "pending"), prompts, semantic_offset, images,
                             tiling=tiling)
        state.calibration = self._calibrate(state, pixels, product, groups)
        return state

    @torch.inference_mode()
    def widened(self, product: str, normals: list[np.ndarray], calibration: Calibration | None = None,
                prompts=None) -> ProductState:
        """A new state of `product` whose memory holds its references plus more known-normal images (frames
        operators labelled good), bounded by the coreset as always; prompts (unless given: see
        `prototypes_with`) and, unless given, the calibration are the current state's. The model itself is
        not changed."""
        state = self.states[product]
        prompts = state.prompts if prompts is None else prompts
        memory, semantic_offset = self._memory(
            self.encoder.preprocess(self._views(state.references, state.tiling)[0]), prompts,
            self.encoder.preprocess(self._views(list(normals), state.tiling)[0]) if normals else None)
        return ProductState(memory, calibration or state.calibration, prompts, semantic_offset,
                            state.references, tiling=state.tiling)

    @property
    def learns_prototypes(self) -> bool:
        """Whether the semantic branch is learned per product (an encoder without a text tower)."""
        return not self.encoder.has_text and self.config.prototype_views > 0

    @torch.inference_mode()
    def prototypes_with(self, product: str, defects: list[tuple[np.ndarray, np.ndarray]]):
        """The product's learned prototypes fitted again, with confirmed defects beside the simulated anomalies:
        `defects` are (frame, mask) pairs, the mask (any size, resized to the frame) marking the defect. An
        encoder with a text tower keeps its prompts."""
        state = self.states[product]
        if not self.learns_prototypes or not defects or not state.references:
            return state.prompts
        views, masks = [], []
        for image, mask in defects:
            height, width = image.shape[:2]
            full = cv2.resize(np.asarray(mask, np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
            views += self._views([image], state.tiling)[0]
            masks += self._views([full], state.tiling)[0]
        size = self.encoder.image_size
        masks = np.stack([cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST) > 0 for m in masks])
        pixels = self.encoder.preprocess(self._views(state.references, state.tiling)[0])
        return self._fit_prototypes(pixels, product, (self.encoder.preprocess(views), torch.from_numpy(masks)))

    def _memory(self, pixels: torch.Tensor, prompts: torch.Tensor | None,
                extra: torch.Tensor | None = None) -> tuple[ReferenceMemory, float]:
        """Memory of k references (augmented views when k is small) plus `extra` views as they are."""
        k = pixels.shape[0]
        augment = self.decoder_config.augment if k <= self.decoder_config.augment_max_references else "none"
        views = augment_views(pixels, augment)                             # (k*views, 3, S, S)
        if extra is not None:
            views = torch.cat([views, extra])
        offset = [0.0]

        def stage_batches():
            for batch in views.split(self.config.batch_size):
                stages = self._encode(batch).patch_features
                if prompts is not None:
                    semantic = self.decoder.semantic([s.float() for s in stages], _expand(prompts, batch.shape[0]))
                    offset[0] = max(offset[0], float(semantic.max()))
                yield stages

        memory = self.decoder.build_memory(stage_batches(), k, views.shape[0] // k, seed=self.config.seed)
        return memory, offset[0]

    def _calibrate(self, state: ProductState, pixels: torch.Tensor, product: str,
                   groups: np.ndarray | None = None) -> Calibration:
        """Score normal views the memory has not seen; see verdict.py for the rules. `groups[i]` is the
        reference that view i comes from (tiles of one image share it)."""
        k = pixels.shape[0]
        groups = np.arange(k) if groups is None else groups
        verdict_config = self.config.verdict
        rng = np.random.default_rng([self.config.seed, _stable_hash(product)])
        if verdict_config.rule == "tail":
            strength = verdict_config.reshot_strength
            shots = [jitter(pixels[i % k].permute(1, 2, 0).numpy(), rng, shift=0.03 * strength,
                            degrees=5.0 * strength, scale=0.03 * strength, light=0.05 * strength)
                     for i in range(max(self.config.n_jitter, k))]
            views = torch.from_numpy(np.stack([view for view, _ in shots])).permute(0, 3, 1, 2)
            reshot = self._map_scores(views, state, np.stack([valid for _, valid in shots]))
            held_out = self._held_out_scores(state, pixels, rng, groups) if groups.max() >= 1 else None
            simulated = None
            if verdict_config.simulated_quantile is not None:
                bases = [pixels[i % k].permute(1, 2, 0).numpy() for i in range(max(self.config.n_jitter, k))]
                anomalous, _ = simulate_batch(bases, 2 * len(bases), rng)
                simulated = self._map_scores(torch.from_numpy(anomalous).permute(0, 3, 1, 2), state)
            return calibrate_tail(reshot, held_out, verdict_config, simulated)
        if groups.max() + 1 >= verdict_config.min_held_out:
            # leave-one-out over up to 8 folds: each held-out reference is a genuinely unseen normal part
            return calibrate(self._held_out_scores(state, pixels, rng, groups), "held-out", verdict_config)
        shots = [jitter(pixels[i % k].permute(1, 2, 0).numpy(), rng) for i in range(max(self.config.n_jitter, k))]
        views = torch.from_numpy(np.stack([view for view, _ in shots])).permute(0, 3, 1, 2)
        scores = self._map_scores(views, state, np.stack([valid for _, valid in shots]))
        return calibrate(scores, "jitter", verdict_config)

    def _held_out_scores(self, state: ProductState, pixels: torch.Tensor, rng: np.random.Generator,
                         groups: np.ndarray) -> np.ndarray:
        """Leave-one-out over up to 8 folds: each held-out reference, scored against a memory of the others,
        is a genuinely unseen normal part. One score per reference: the maximum over its views (tiles)."""
        k = int(groups.max()) + 1
        scores = []
        for held in np.array_split(rng.permutation(k), min(k, 8)):
            held_views = np.flatnonzero(np.isin(groups, held))
            rest = np.flatnonzero(~np.isin(groups, held))
            memory, _ = self._memory(pixels[torch.from_numpy(rest)], state.prompts)
            held_state = ProductState(memory, state.calibration, state.prompts, state.semantic_offset, [])
            view_scores = self._map_scores(pixels[torch.from_numpy(held_views)], held_state)
            owners = groups[held_views]
            scores.append(np.array([view_scores[owners == g].max() for g in np.unique(owners)]))
        return np.concatenate(scores)

    def _map_scores(self, pixels: torch.Tensor, state: ProductState, valid: np.ndarray | None = None) -> np.ndarray:
        """Image scores of (N, 3, S, S) views; `valid` (N, S, S) bool limits each maximum to real content."""
        maps = [self._decode(self._encode(batch).patch_features, state).float().cpu().numpy()
                for batch in pixels.split(self.config.batch_size)]
        maps = np.concatenate(maps)                                       # (N, S, S)
        if valid is not None:
            maps = np.where(valid, maps, -np.inf)
        return maps.reshape(len(maps), -1).max(1)

    def _fit_prototypes(self, pixels: torch.Tensor, product: str,
                        confirmed: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Learned [normal, abnormal] prototypes of a product without a text tower: its reference views are
        the normal class, simulated anomalies on them (synthetic.py) the abnormal one, joined by `confirmed`
        defects ((n, 3, S, S) uint8 views, (n, S, S) bool masks) when operators confirmed some."""
        rng = np.random.default_rng([self.config.seed, _stable_hash(product), 1])
        k = pixels.shape[0]
        pick = rng.permutation(k)[:16]                                   # enough normal variety, bounded cost
        normal = augment_views(pixels[torch.from_numpy(pick)], "rotate" if len(pick) <= 4 else "none")
        images = [pixels[i].permute(1, 2, 0).numpy() for i in pick]
        anomalous, masks = simulate_batch(images, self.config.prototype_views, rng)
        anomalous = torch.from_numpy(anomalous).permute(0, 3, 1, 2)      # (n, 3, S, S) uint8
        masks = torch.from_numpy(masks)
        if confirmed is not None:
            anomalous, masks = torch.cat([anomalous, confirmed[0]]), torch.cat([masks, confirmed[1]])

        def encode(views: torch.Tensor) -> list[torch.Tensor]:
            parts = [self._encode(batch).patch_features for batch in views.split(self.config.batch_size)]
            return [torch.cat(stage).float() for stage in zip(*parts, strict=True)]

        return self.decoder.semantic.fit(encode(normal), encode(anomalous), masks.to(self.device),
                                         steps=self.config.prototype_steps)

    def _prompts(self, product: str) -> torch.Tensor:
        """(2, D) unit-norm mean embeddings of AnomalyGPT's normal and abnormal prompt ensembles."""
        normal, abnormal = state_prompts(product)
        embeddings = []
        for group in (normal, abnormal):
            text = torch.nn.functional.normalize(self.encoder.encode_text(group).float(), dim=-1)  # (N, D)
            embeddings.append(torch.nn.functional.normalize(text.mean(0), dim=-1))
        return torch.stack(embeddings)

    # --- scoring ---------------------------------------------------------------------------------

    def _encode(self, pixels: torch.Tensor) -> EncoderOutput:
        """uint8 (B, 3, S, S) -> EncoderOutput; on a CPU in micro-batches, which run faster per frame."""
        if self.device.type == "cpu" and pixels.shape[0] > self.config.cpu_micro_batch:
            parts = [self._encode(p) for p in pixels.split(self.config.cpu_micro_batch)]
            return EncoderOutput(torch.cat([p.global_embedding for p in parts]),
                                 [torch.cat(stage) for stage in zip(*(p.patch_features for p in parts), strict=True)])
        pixels = pixels.to(self.device, non_blocking=True)
        x = self.encoder.normalize(pixels).to(self.dtype)
        if self.device.type == "cuda" and not self.encoder.has_text:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.encoder(x)

    def _decode(self, stages: list[torch.Tensor], state: ProductState) -> torch.Tensor:
        prompts = None if state.prompts is None else _expand(state.prompts, stages[0].shape[0])
        return self.decoder(stages, state.memory, self.image_size, prompts, state.semantic_offset)[:, 0]

    @torch.inference_mode()
    def score(self, frames: list) -> list[ScoredFrame]:
        """Frames of any products and sizes -> one ScoredFrame (verdict, anomaly map) per frame.

        A frame is a `Frame`, anything with `.image`, `.product` (and optionally `.mm_per_px`, `.size`), or a
        `(product, image)` tuple. The encoder sees the whole batch at once (a tiled product's frame as its
        tiles); each product's views then meet that product's memory. Maps, regions and positions are
        computed at model resolution; regions are scaled to frame pixels.
        """
        frames = [_as_frame(f) for f in frames]
        unknown = {f.product for f in frames} - set(self.states)
        if unknown:
            raise KeyError(f"no references for product(s) {sorted(unknown)}: call add_references first")
        views: list[np.ndarray] = []
        owner: list[int] = []                    # the frame of each view
        spans: list[range] = []                  # the views of each frame
        for index, frame in enumerate(frames):
            tiling = self.states[frame.product].tiling
            crops = tiling.split(frame.image) if tiling.active else [frame.image]
            spans.append(range(len(views), len(views) + len(crops)))
            views.extend(crops)
            owner.extend([index] * len(crops))
        maps: list[np.ndarray | None] = [None] * len(views)
        embedded: list[np.ndarray] = []
        best: list[tuple[float, np.ndarray | None]] = [(-np.inf, None)] * len(frames)   # (peak, descriptor)
        step = self.config.cpu_micro_batch if self.device.type == "cpu" else self.config.batch_size
        for start in range(0, len(views), step):
            chunk = range(start, min(start + step, len(views)))
            out = self._encode(self.encoder.preprocess([views[v] for v in chunk]))
            embedded.append(out.global_embedding.float().cpu().numpy())
            products = [frames[owner[v]].product for v in chunk]
            for product in dict.fromkeys(products):
                index = [i for i, p in enumerate(products) if p == product]
                select = torch.tensor(index, device=self.device)
                state = self.states[product]
                decoded = self._decode([s.index_select(0, select) for s in out.patch_features], state)
                for view_map, i in zip(decoded.float().cpu().numpy(), index, strict=True):   # (S, S) each
                    view = start + i
                    maps[view] = view_map
                    peak = float(view_map.max())
                    frame_index = owner[view]
                    if peak > state.calibration.threshold and peak > best[frame_index][0]:
                        # the flagged view's defect, for the dialogue's similar-parts search
                        best[frame_index] = (peak, defect_descriptor(
                            [s[i] for s in out.patch_features], view_map, state.calibration.threshold,
                            self.decoder_config.memory_stages))
        embeddings = np.concatenate(embedded) if embedded else np.empty((0, 0), np.float32)
        results = []
        for index, (frame, mine) in enumerate(zip(frames, spans, strict=True)):
            state = self.states[frame.product]
            height, width = frame.image.shape[:2]
            if state.tiling.active:
                anomaly_map = state.tiling.stitch(np.stack([maps[v] for v in mine]), width, height)
            else:
                anomaly_map = maps[mine[0]]
            verdict = make_verdict(anomaly_map, state.calibration, frame.mm_per_px, self.config.verdict,
                                   frame_size=frame.size or (width, height))
            descriptor = best[index][1] if verdict.is_anomalous else None
            results.append(ScoredFrame(verdict, anomaly_map, frame.product, embeddings[mine.start:mine.stop].mean(0),
                                       descriptor))
        return results

    # --- answers ---------------------------------------------------------------------------------

    @property
    def lvlm(self):
        """The language model wrapper, loaded on first use (answers are only asked for flagged frames), with
        the trained adapters given to `use_lvlm_adapters`, if any."""
        if self._lvlm is None:
            from .lvlm import AnomalyLVLM, LvlmConfig

            lvlm = AnomalyLVLM(LvlmConfig(llm=self.config.llm), self.encoder.embed_dim, device=self.device)
            if self.lvlm_adapters is not None:
                try:
                    lvlm.load_adapters(self.lvlm_adapters[1])
                except ValueError as exc:      # answers still come, from the untrained adapters
                    log.error("lvlm_adapters_not_loaded", version=self.lvlm_adapters[0], error=str(exc)[:300])
                    self.lvlm_adapters = None
            self._lvlm = lvlm
        return self._lvlm

    def use_lvlm_adapters(self, version: str | None, weights: bytes | None) -> None:
        """Answer with these trained LVLM adapters (a registry version; None: the untrained ones) from the next
        call on. Raises ValueError, and keeps the adapters it has, when they do not fit this model's LLM."""
        if weights is not None and self._lvlm is not None:
            self._lvlm.load_adapters(weights)          # checks the shapes before it changes anything
        elif weights is None:
            self._lvlm = None                          # rebuilt, untrained, on first use
        self.lvlm_adapters = None if weights is None else (version, weights)

    def answer(self, scored: list[ScoredFrame], questions: list[str] | str | None = None,
               histories: list[list[tuple[str, str]]] | None = None, max_new_tokens: int | None = None) -> list[str]:
        """AnomalyGPT-style answers for the given (flagged) frames, in one batched generation.

        `questions` defaults to "Is there any anomaly in the image?"; `histories` holds the earlier
        (question, answer) turns of each conversation. Answers never contradict the verdicts. The
        opening question is answered from the verdict alone, so the LLM is loaded only for follow-ups.
        `max_new_tokens` caps the reply (default: the LVLM config's).
        """
        from .lvlm import first_answer, is_first_question

        if questions is None or isinstance(questions, str):
            questions = [questions] * len(scored)
        if all(is_first_question(q) for q in questions):
            return [first_answer(s.verdict) for s in scored]
        return self.lvlm.answer(scored, questions, histories, max_new_tokens=max_new_tokens)

    def explain(self, items: list[tuple[object, ScoredFrame]]) -> list[str]:
        """The worker's hook: `(frame, scored)` pairs of flagged frames -> their first answers."""
        return self.answer([scored for _, scored in items])


AnomalyModel = InspectionModel


def jitter(image: np.ndarray, rng: np.random.Generator, shift: float = 0.03, degrees: float = 5.0,
           scale: float = 0.03, light: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """A reference as if shot again: small random pose and lighting change.

    (S, S, 3) uint8 -> the view (S, S, 3) uint8 and where it shows real content (S, S) bool: pixels the
    warp filled in from outside the frame, and a margin of 5% around them, are not a part's surface and
    must not set the threshold.
    """
    H, W = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((W / 2, H / 2), rng.uniform(-degrees, degrees), 1 + rng.uniform(-scale, scale))
    matrix[:, 2] += rng.uniform(-shift, shift, 2) * (W, H)
    moved = cv2.warpAffine(image, matrix, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    inside = cv2.warpAffine(np.ones((H, W), np.uint8), matrix, (W, H), flags=cv2.INTER_NEAREST,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    margin = max(1, round(0.05 * max(H, W)))
    inside = cv2.erode(inside, np.ones((2 * margin + 1, 2 * margin + 1), np.uint8), borderType=cv2.BORDER_CONSTANT,
                       borderValue=0)
    lit = moved.astype(np.float32) * (1 + rng.uniform(-light, light)) + 255 * rng.uniform(-light, light)
    return np.clip(lit, 0, 255).astype(np.uint8), inside.astype(bool)


def _expand(prompts: torch.Tensor | list[torch.Tensor], batch: int) -> torch.Tensor | list[torch.Tensor]:
    """Text prompts (2, D) -> (B, 2, D) per frame; learned prototypes are shared by the batch as they are."""
    return prompts if isinstance(prompts, list) else prompts.expand(batch, -1, -1)


def _as_frame(item) -> Frame:
    if isinstance(item, Frame):
        return item
    if isinstance(item, tuple):
        return Frame(item[1], item[0], item[2] if len(item) > 2 else None)
    return Frame(item.image, item.product, getattr(item, "mm_per_px", None), getattr(item, "size", None))


def _precision(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    """(result, seconds) of one call; benchmarks use it."""
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started
