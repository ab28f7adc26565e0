"""Typed exceptions. The CLI turns any of them into one line on stderr and exit code 2."""


class DtrainError(Exception):
    """Base class: a problem the user can fix, reported without a traceback."""


class ConfigError(DtrainError):
    """A setting is missing or malformed."""


class ServerError(DtrainError):
    """The embedded S3 server could not be built, started or reached."""


class StorageError(DtrainError):
    """An S3 operation failed: unreachable endpoint, bad credentials, missing bucket/key."""


class IntegrityError(StorageError):
    """Bytes that arrived differ from the bytes that were sent (size or checksum)."""


class DatasetError(DtrainError):
    """A dataset is unknown, malformed (IDX), or fails its checksum."""


class ClusterError(DtrainError):
    """The Ray cluster could not be started, reached or asked for enough resources."""


class TrainingError(DtrainError):
    """A training job was given bad parameters or failed."""


class ModelNotFoundError(DtrainError):
    """No model was found for a run id."""


class ManifestError(DtrainError):
    """A Kubernetes manifest failed schema or semantic validation."""
