"""Errors raised by the prefix store; the API layer maps each to an HTTP status."""


class PrefixStoreError(Exception):
    """Base class for every error this package raises on purpose."""


class InvalidPrefix(PrefixStoreError):
    """The upload is not a usable prefix (not safetensors, wrong keys/shape/dtype, NaN/Inf, bad config)."""


class ModelMismatch(PrefixStoreError):
    """The prefix is well-formed but made for another model (shape or fingerprint)."""


class StoreUnavailable(PrefixStoreError):
    """Redis cannot be reached or answered with an error."""
