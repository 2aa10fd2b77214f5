"""The anomaly model: encoder -> feature-matching decoder -> automatic verdict -> AnomalyGPT-style answers.

Entry point: `InspectionModel` (alias `AnomalyModel`) in api.py. See README.md beside this file.

Example:
    >>> from inference.model import InspectionModel, Frame
    >>> model = InspectionModel()
    >>> model.add_references("bottle", [good_bgr])
    >>> [(verdict, anomaly_map)] = model.score([Frame(image_bgr, "bottle")])
"""

from .api import AnomalyModel, Frame, InspectionModel, ModelConfig, ScoredFrame
from .decoder import AnomalyDecoder, DecoderConfig, state_prompts
from .encoders import EncoderConfig, build_encoder
from .verdict import Calibration, ModelVerdict, VerdictConfig, calibrate, make_verdict

__all__ = [
    "AnomalyDecoder", "AnomalyModel", "Calibration", "DecoderConfig", "EncoderConfig", "Frame", "InspectionModel",
    "ModelConfig", "ModelVerdict", "ScoredFrame", "VerdictConfig", "build_encoder", "calibrate", "make_verdict",
    "state_prompts",
]
