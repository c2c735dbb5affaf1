"""The errors minaf3 raises. Every failure a user can cause is one of these, raised early and naming the item.

Minaf3Error                      base of everything below
├── AudioError (ValueError)      audio that cannot be used: empty, NaN/Inf, wrong shape or type, undecodable
├── AudioFileError (OSError)     an audio source that cannot be read: missing file, failed download
├── CheckpointError (OSError)    a model folder that is missing, incomplete, corrupt or mismatched
├── ConfigError (ValueError)     a config.json or argument that is missing fields or holds wrong values
├── InputError (ValueError)      a prompt or conversation that cannot be processed
└── GenerationError (ValueError) generation settings or lengths the model cannot honour
"""


class Minaf3Error(Exception):
    """Base class of every error minaf3 raises on purpose."""


class AudioError(Minaf3Error, ValueError):
    """Audio data that cannot be used (empty, NaN or Inf, wrong shape or dtype, undecodable bytes)."""


class AudioFileError(Minaf3Error, OSError):
    """An audio source that cannot be read (missing file, unreadable file, failed download)."""


class CheckpointError(Minaf3Error, OSError):
    """A checkpoint folder that is missing, incomplete, corrupt, or does not match its config."""


class ConfigError(Minaf3Error, ValueError):
    """A configuration (config.json, processor config, argument) with missing or invalid fields."""


class InputError(Minaf3Error, ValueError):
    """A text prompt or conversation that cannot be turned into model inputs."""


class GenerationError(Minaf3Error, ValueError):
    """Generation settings or lengths the model or its cache cannot honour."""
