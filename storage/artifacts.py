"""The artifact stores live in `lineguard.artifacts` (the records, the model registry and the references share
them); this module keeps the storage room's imports working."""

from lineguard.artifacts import (  # noqa: F401
    ArtifactStore,
    ArtifactStoreError,
    LocalArtifactStore,
    S3ArtifactStore,
    StorageError,
    artifact_key,
    key_part,
    key_parts,
    open_artifact_store,
)
