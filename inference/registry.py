"""The model registry: every version of a product's model state, what it was built from, and which is live.

A version is one product's `ProductState` (references, memory, prototypes, calibration), saved as one bundle
in the artifact store (a directory or S3, as the records' images), plus a row of the `model_versions` table in
the records database: product, number, status, parent, metrics and lineage (the label ids it learned from,
the code and encoder that built it).

    >>> registry = ModelRegistry.from_settings(settings)
    >>> v = registry.register("disc", state, model.version, parent=None, metrics={...}, lineage={...})
    >>> registry.promote(v.version)          # live; the previous live version is retired
    >>> registry.rollback("disc")            # the version that was live before it, or None (the references)
    >>> registry.install(model, registry.live("disc").version)

Statuses: `candidate` (built, not judged), `rejected` (the evaluation gate said no), `live` (at most one per
product), `retired` (was live). With no live version a product runs on its references alone, as before.
Workers load a released version when a `ModelUpdate(kind="model_released")` names it (see inference/worker.py).
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import cv2
import numpy as np
import torch
from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    select,
    update,
)

from lineguard.artifacts import ArtifactStore, StorageError, artifact_key, open_artifact_store
from lineguard.db import engine, private_sqlite, require_current
from lineguard.settings import Settings

from .model.decoder import ReferenceMemory
from .model.verdict import Calibration

BUNDLE_FORMAT = 1
STATUSES = ("candidate", "rejected", "live", "retired")
LVLM_PRODUCT = "lvlm"    # versions of the LVLM's trained adapters (one set serves every product; training/lvlm.py)

metadata = MetaData()     # the table as the code queries it; lineguard/migrations creates and changes it
model_versions = Table(
    "model_versions", metadata,
    Column("version", String(160), primary_key=True),        # "<product>.v<number>"
    Column("product", String(128), nullable=False, index=True),
    Column("number", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("parent", String(160)),
    Column("model_code", String(200), nullable=False),       # InspectionModel.version that built it
    Column("bundle_uri", Text, nullable=False),
    Column("metrics", Text, nullable=False, default="{}"),
    Column("lineage", Text, nullable=False, default="{}"),
    Column("note", Text, nullable=False, default=""),
    Column("created_at", DateTime, nullable=False),
    Column("promoted_at", DateTime),
    Column("rolled_back_at", DateTime),
)


class RegistryError(Exception):
    """A version is unknown, unreadable or does not fit the model that should load it."""


@dataclass
class ModelVersion:
    version: str
    product: str
    number: int
    status: str
    parent: str | None
    model_code: str
    bundle_uri: str
    metrics: dict
    lineage: dict
    note: str
    created_at: datetime
    promoted_at: datetime | None

    def summary(self) -> dict:
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat()
        data["promoted_at"] = self.promoted_at.isoformat() if self.promoted_at else None
        return data


# --- bundles ---------------------------------------------------------------------------------------

def state_bytes(state) -> bytes:
    """A ProductState as bytes (torch.save of tensors and plain values; images as PNG)."""
    memory = state.memory
    prompts = state.prompts
    payload = {
        "format": BUNDLE_FORMAT,
        "memory": None if memory is None else {"banks": [b.detach().cpu() for b in memory.banks],
                                                "n_references": memory.n_references, "n_views": memory.n_views},
        "calibration": asdict(state.calibration),
        "prompts": (None if prompts is None else [p.detach().cpu() for p in prompts] if isinstance(prompts, list)
                    else prompts.detach().cpu()),
        "prompts_is_list": isinstance(prompts, list),
        "semantic_offset": float(state.semantic_offset),
        "references": [torch.from_numpy(cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))[1].copy())
                       for image in state.references],
        "tiling": [state.tiling.cols, state.tiling.rows, float(state.tiling.overlap)],
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def state_from_bytes(data: bytes, device: torch.device | str = "cpu"):
    """Inverse of `state_bytes`; tensors land on `device`."""
    from .model.api import ProductState
    from .model.tiles import Tiling

    payload = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    if payload.get("format") != BUNDLE_FORMAT:
        raise RegistryError(f"bundle format {payload.get('format')} is not {BUNDLE_FORMAT}")
    memory = payload["memory"]
    memory = None if memory is None else ReferenceMemory(memory["banks"], memory["n_references"], memory["n_views"])
    references = [cv2.imdecode(t.numpy(), cv2.IMREAD_COLOR)[..., ::-1].copy() for t in payload["references"]]
    cols, rows, overlap = payload.get("tiling", (1, 1, 0.125))      # bundles before tiles: whole frames
    return ProductState(memory, Calibration(**payload["calibration"]), payload["prompts"],
                        payload["semantic_offset"], references, tiling=Tiling(int(cols), int(rows), float(overlap)))


# --- the registry ----------------------------------------------------------------------------------

class ModelRegistry:
    def __init__(self, db_url: str, artifacts: ArtifactStore):
        require_current(db_url)     # the migrations own `model_versions` (lineguard db upgrade); never created here
        if db_url.startswith("sqlite:///"):
            private_sqlite(db_url, create=False)
        self.engine = engine(db_url)
        self.artifacts = artifacts

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelRegistry:
        return cls(settings.records_db_url(), open_artifact_store(settings.artifacts_location()))

    def close(self) -> None:
        self.engine.dispose()

    # -- reads -----------------------------------------------------------------------------------------
    def versions(self, product: str | None = None) -> list[ModelVersion]:
        """Every version (of one product), newest first."""
        query = select(model_versions).order_by(model_versions.c.created_at.desc(), model_versions.c.number.desc())
        if product is not None:
            query = query.where(model_versions.c.product == product)
        with self.engine.connect() as conn:
            return [_version(row) for row in conn.execute(query)]

    def get(self, version: str) -> ModelVersion:
        with self.engine.connect() as conn:
            row = conn.execute(select(model_versions).where(model_versions.c.version == version)).first()
        if row is None:
            raise RegistryError(f"no model version {version!r}")
        return _version(row)

    def live(self, product: str) -> ModelVersion | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(model_versions).where(model_versions.c.product == product,
                                                            model_versions.c.status == "live")).first()
        return _version(row) if row else None

    def bundle(self, version: str) -> bytes:
        """The stored bytes of a version (a product state's bundle, or the LVLM's adapters)."""
        try:
            return self.artifacts.get(self.get(version).bundle_uri)
        except StorageError as exc:
            raise RegistryError(f"the bundle of {version} cannot be read: {exc}") from exc

    def live_adapters(self) -> tuple[str, bytes] | None:
        """(version, weights) of the live LVLM adapters, or None (the LVLM runs untrained adapters)."""
        live = self.live(LVLM_PRODUCT)
        return (live.version, self.bundle(live.version)) if live else None

    def load_state(self, version: str, device: torch.device | str = "cpu"):
        found = self.get(version)
        try:
            return state_from_bytes(self.artifacts.get(found.bundle_uri), device)
        except StorageError as exc:
            raise RegistryError(f"the bundle of {version} cannot be read: {exc}") from exc

    def checked_state(self, model, version: str, product: str | None = None):
        """The state of `version`, after checking that `model` can run it (and that it is `product`'s);
        tagged with its version. Raises RegistryError otherwise."""
        found = self.get(version)
        if product is not None and found.product != product:
            raise RegistryError(f"{version} is a version of {found.product}, not {product}")
        if found.model_code != model.version:
            raise RegistryError(f"{version} was built by {found.model_code}; this model is {model.version}")
        state = self.load_state(version, model.device)
        state.version = version
        return state

    def install(self, model, version: str) -> ModelVersion:
        """Load `version` into `model` (its product's state), after checking the model can run it."""
        found = self.get(version)
        model.states[found.product] = self.checked_state(model, version)
        return found

    # -- writes ----------------------------------------------------------------------------------------
    def register(self, product: str, state, model_code: str, *, parent: str | None, metrics: dict,
                 lineage: dict, status: str = "candidate", note: str = "", bundle: bytes | None = None) -> ModelVersion:
        """A new version of `product`: its state saved as a bundle (or `bundle` as given: the LVLM's adapters,
        which are no product's state) and a row of the index table."""
        if status not in ("candidate", "rejected"):
            raise ValueError("a new version is a candidate or rejected; promote it to make it live")
        with self.engine.begin() as conn:
            last = conn.execute(select(model_versions.c.number).where(model_versions.c.product == product)
                                .order_by(model_versions.c.number.desc())).first()
            number = (last[0] if last else 0) + 1
            version = f"{product}.v{number:04d}"
            uri = self.artifacts.put(artifact_key("registry", product, f"{version}.pt"),
                                     bundle if bundle is not None else state_bytes(state))
            conn.execute(model_versions.insert().values(
                version=version, product=product, number=number, status=status, parent=parent,
                model_code=model_code, bundle_uri=uri, metrics=json.dumps(metrics), lineage=json.dumps(lineage),
                note=note, created_at=_now()))
        return self.get(version)

    def promote(self, version: str) -> ModelVersion:
        """Make `version` its product's live version; the one live before is retired."""
        found = self.get(version)
        with self.engine.begin() as conn:
            conn.execute(update(model_versions).where(model_versions.c.product == found.product,
                                                      model_versions.c.status == "live")
                         .values(status="retired"))
            conn.execute(update(model_versions).where(model_versions.c.version == version)
                         .values(status="live", promoted_at=_now()))
        return self.get(version)

    def rollback(self, product: str) -> ModelVersion | None:
        """Retire the live version and bring back the one promoted before it; None when there was none
        (the product then runs on its references alone). Raises RegistryError when nothing is live."""
        live = self.live(product)
        if live is None:
            raise RegistryError(f"{product} has no live version to roll back")
        with self.engine.connect() as conn:
            rolled_back = set(conn.execute(select(model_versions.c.version).where(
                model_versions.c.product == product, model_versions.c.rolled_back_at.is_not(None))).scalars())
        earlier = [v for v in self.versions(product) if v.promoted_at is not None and v.version != live.version
                   and v.version not in rolled_back and v.promoted_at <= live.promoted_at]
        earlier.sort(key=lambda v: v.promoted_at, reverse=True)
        with self.engine.begin() as conn:
            conn.execute(update(model_versions).where(model_versions.c.version == live.version)
                         .values(status="retired", rolled_back_at=_now()))
            if earlier:
                conn.execute(update(model_versions).where(model_versions.c.version == earlier[0].version)
                             .values(status="live", promoted_at=_now()))
        return self.get(earlier[0].version) if earlier else None


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _version(row) -> ModelVersion:
    def utc(value):
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value

    return ModelVersion(version=row.version, product=row.product, number=row.number, status=row.status,
                        parent=row.parent, model_code=row.model_code, bundle_uri=row.bundle_uri,
                        metrics=json.loads(row.metrics or "{}"), lineage=json.loads(row.lineage or "{}"),
                        note=row.note or "", created_at=utc(row.created_at), promoted_at=utc(row.promoted_at))
