"""Turn a bare state dict into an expert folder.

``export_expert`` takes a safetensors state dict (what a training script saves).
``convert_checkpoint`` is the one explicit opt-in to read a pickle checkpoint (.pt/.pth/.bin/.ckpt),
and only with ``torch.load(weights_only=True)``, which refuses arbitrary Python objects.
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import torch

from rsrouter.errors import UsageError
from rsrouter.experts.expert import PICKLE_SUFFIXES, Expert, check_state_dict
from rsrouter.experts.nets import build_classifier

NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "module", "ema")


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UsageError(
            f"{path} is a pickle checkpoint; rsrouter loads safetensors only: convert it "
            "explicitly with `router convert-checkpoint`."
        )
    _input_file(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise UsageError(f"{path} is not a safetensors file ({exc}).") from exc


def _input_file(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UsageError(
            f"{path} {'is a folder, not a file' if path.is_dir() else 'does not exist'}."
        )
    return path


def read_pickle_checkpoint(path: str | os.PathLike, key: str | None = None) -> dict:
    """The tensors of a pickle checkpoint, loaded with ``weights_only=True`` (no code runs)."""
    path = _input_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # the refusal below is what matters, not the names
            names = []
        what = f" ({', '.join(names[:3])})" if names else ""
        raise UsageError(
            f"{path} holds Python objects{what} besides tensors; torch.load(weights_only=True) "
            "refuses them and rsrouter never unpickles anything else."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, struct.error, KeyError, IndexError) as exc:
        # the legacy (non-zip) reader fails on stray bytes with whatever they provoke
        raise UsageError(f"{path} is not a PyTorch checkpoint.") from exc
    return unwrap(obj, key, path)


def unwrap(obj, key: str | None, where) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: under ``key``, or the usual nesting keys."""
    if key is not None:
        for part in key.split("."):
            if not isinstance(obj, dict) or part not in obj:
                raise UsageError(f"{where} has no entry {key!r}.")
            obj = obj[part]
    while isinstance(obj, dict) and not _is_state(obj):
        nested = [k for k in NESTED_KEYS if isinstance(obj.get(k), dict)]
        if not nested:
            break
        obj = obj[nested[0]]
    if not isinstance(obj, dict) or not _is_state(obj):
        raise UsageError(f"{where} holds no state dict of tensors (use --key to point at one).")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _is_state(obj: dict) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def fit_state_dict(state: dict, reference: dict, strip_prefix: str | None = None) -> dict:
    """Strip a wrapper prefix ("module.", "1.module.", …) so the keys match ``reference``."""
    if strip_prefix:
        state = {k.removeprefix(strip_prefix): v for k, v in state.items()}
    if set(state) == set(reference):
        return state
    first = next(iter(state))
    for ref in reference:
        if first.endswith(ref):
            prefix = first[: len(first) - len(ref)]
            if prefix and all(k.startswith(prefix) for k in state):
                stripped = {k[len(prefix) :]: v for k, v in state.items()}
                if set(stripped) == set(reference):
                    return stripped
    return state  # Expert.from_module names the differences


def expert_from_state_dict(
    state: dict,
    *,
    arch: str,
    sigma: float,
    num_classes: int,
    in_chans: int,
    input_size,
    arch_args: dict | None = None,
    strip_prefix: str | None = None,
    **config_fields,
) -> Expert:
    """A classifier expert from a state dict that fits ``build_classifier(arch, …)``."""
    arch_args = dict(arch_args or {})
    net = build_classifier(arch, num_classes, in_chans, **arch_args)
    state = fit_state_dict(state, net.state_dict(), strip_prefix)
    check_state_dict(net, state, arch)
    net.load_state_dict(state, strict=True)
    return Expert.from_module(
        net,
        sigma=sigma,
        arch=arch,
        num_classes=num_classes,
        in_chans=in_chans,
        input_size=input_size,
        arch_args=arch_args,
        **config_fields,
    ).eval()


def export_expert(weights: str | os.PathLike, out: str | os.PathLike, **kwargs) -> Path:
    """A safetensors state dict + architecture + sigma → an expert folder."""
    return expert_from_state_dict(read_safetensors(weights), **kwargs).save_pretrained(out)


def convert_checkpoint(
    checkpoint: str | os.PathLike, out: str | os.PathLike, *, key: str | None = None, **kwargs
) -> Path:
    """A pickle checkpoint (read with weights_only=True) → an expert folder of safetensors."""
    return expert_from_state_dict(
        read_pickle_checkpoint(checkpoint, key), **kwargs
    ).save_pretrained(out)
