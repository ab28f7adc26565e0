"""dtrain: distributed training of an MNIST classifier with Ray Train, KubeRay and MinIO."""

from dtrain.versions import PACKAGE_VERSION as __version__

__all__ = ["__version__"]
