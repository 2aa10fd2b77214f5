"""Build the model the worker runs. `InspectionModel` already speaks the worker's `Scorer` protocol."""

from __future__ import annotations


def build_scorer(encoder: str | None = None, device: str = "auto", text: bool = True, llm: str | None = None):
    """The default model: efficientnet-lite0 memory bank, CUDA when present; `encoder` as in `lineguard eval`."""
    from inference.model.api import InspectionModel, ModelConfig
    from inference.model.encoders import EncoderConfig

    encoder_config = EncoderConfig.parse(encoder) if encoder else EncoderConfig()
    return InspectionModel(ModelConfig(encoder=encoder_config, device=device, llm=llm))
