"""The workspace expert registry: named, pinned, hash-verified experts (Hub or folder)."""

from rsrouter.registry.workspace import (
    WORKSPACE_FILE,
    ExpertEntry,
    Workspace,
    default_name,
    verify,
)

__all__ = ["WORKSPACE_FILE", "ExpertEntry", "Workspace", "default_name", "verify"]
