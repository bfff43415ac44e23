"""The workspace expert registry: named, pinned, hash-verified experts (Hub or folder)."""
