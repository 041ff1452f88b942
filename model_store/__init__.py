"""The artifact room: versioned TorchScript policies with manifests. Imports neither offline nor service."""

from model_store.calibrations import Calibration
from model_store.files import atomic_write_bytes, sha256_file
from model_store.manifest import MAX_LAMBDA, OBJECTIVES, LambdaPoint, Manifest
from model_store.torchscript import ScoringModule, load_scripted, save_scripted
from model_store.versions import Artifact, ArtifactError, ModelStore

__all__ = [
    "MAX_LAMBDA",
    "OBJECTIVES",
    "Artifact",
    "ArtifactError",
    "Calibration",
    "LambdaPoint",
    "Manifest",
    "ModelStore",
    "ScoringModule",
    "atomic_write_bytes",
    "load_scripted",
    "save_scripted",
    "sha256_file",
]
