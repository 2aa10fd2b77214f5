"""The artifact stores live in `lineguard.artifacts` (the records, the model registry and the references share
them); this module keeps the storage room's imports working."""

from lineguard.artifacts import (  # noqa: F401
    ArtifactStore,
    ArtifactStoreError,
    LocalArtifactStore,
    S3ArtifactStore,
    StorageError,
    open_artifact_store,
    safe_name,
)
