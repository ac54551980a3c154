"""What Keel's two services and its client share: the error type and the gRPC plumbing."""

from keel_core.errors import ErrorCategory, KeelError

__all__ = ["ErrorCategory", "KeelError"]
