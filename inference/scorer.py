"""Build the model the worker runs. `InspectionModel` already speaks the worker's `Scorer` protocol."""

from __future__ import annotations


def build_scorer(encoder: str | None = None, device: str = "auto", text: bool = True, llm: str | None = None,
                 batch_size: int = 16):
    """The default model: efficientnet-lite0 memory bank, CUDA when present; `encoder` as in `lineguard eval`.
    `batch_size` is the frames per encoder pass on CUDA (the worker's `max_batch` is the most it is handed)."""
    from inference.model.api import InspectionModel, ModelConfig
    from inference.model.encoders import EncoderConfig

    encoder_config = EncoderConfig.parse(encoder) if encoder else EncoderConfig()
    return InspectionModel(ModelConfig(encoder=encoder_config, device=device, llm=llm, batch_size=batch_size))
