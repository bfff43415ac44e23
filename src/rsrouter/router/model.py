"""The router g_e: a classifier over experts, smoothed with the global sigma_e.

Its base model maps a noisy [0, 1] batch x + δ_e to one logit per expert: optionally a one-step
diffusion denoiser at sigma_e first (the paper's design), then per-channel normalisation, then
the classifier. It is a valid ``base`` for ``rsrouter.smoothing`` at ``sigma = sigma_e``.

A class-map router (``class_map`` set) is an image classifier instead, usually a copy of the
sigma_e expert: the class it predicts on x + δ_e picks the expert through a fixed table
(class_map[c] = expert index), so nothing is trained. Smoothed at sigma_e it is an ordinary
router: CERTIFY counts its votes per expert and certifies the majority.

A gate router (``gate`` set, ``router/gate.py``) is such a copy too: the normalised entropy of
its softmax on x + δ_e picks the expert through fitted thresholds (ACES for K experts).

A self-describing folder: ``config.json`` + ``model.safetensors`` (+ ``denoiser/unet`` and
``denoiser/scheduler`` in diffusers format).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from rsrouter.errors import UsageError
from rsrouter.experts.denoiser import OneStepDenoiser
from rsrouter.experts.expert import load_denoiser
from rsrouter.experts.nets import build_classifier, normalize
from rsrouter.io import read_json, reading, sha256_json, write_json, write_safetensors
from rsrouter.router.gate import (
    check_gate,
    normalized_entropy,
    route_by_class_score,
    route_by_score,
)
from rsrouter.smoothing import check_sigma

FORMAT = "rsrouter.router/1"


class RouterModel(nn.Module):
    """Router base model: noisy images (B, C, H, W) in [0, 1] → logits (B, E) over experts."""

    def __init__(
        self,
        *,
        arch: str,
        expert_names: Sequence[str],
        sigmas: Sequence[float],
        fingerprints: Sequence[str],
        in_chans: int,
        input_size: Sequence[int],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        sigma_e: float | None = None,
        arch_args: dict | None = None,
        unet: nn.Module | None = None,
        scheduler=None,
        info: dict | None = None,
        class_map: Sequence[int] | None = None,
        gate: dict | None = None,
    ):
        super().__init__()
        if not expert_names or not len(expert_names) == len(sigmas) == len(fingerprints):
            raise UsageError("a router needs one name, sigma and fingerprint per expert.")
        if len(set(expert_names)) != len(expert_names):
            raise UsageError("expert names of a router must be distinct.")
        if (unet is None) != (scheduler is None):
            raise UsageError("a router denoiser needs both a UNet and its scheduler.")
        self.arch, self.arch_args = arch, dict(arch_args or {})
        self.expert_names = tuple(str(n) for n in expert_names)
        self.sigmas = tuple(check_sigma(float(s)) for s in sigmas)
        self.fingerprints = tuple(str(f) for f in fingerprints)
        self.sigma_e = check_sigma(float(sigma_e if sigma_e is not None else max(self.sigmas)))
        self.in_chans, self.input_size = int(in_chans), tuple(int(s) for s in input_size)
        self.mean = tuple(float(m) for m in (mean if mean is not None else [0.5] * in_chans))
        self.std = tuple(float(s) for s in (std if std is not None else [0.5] * in_chans))
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise UsageError(f"mean and std need {self.in_chans} values, one per channel.")
        self.info = dict(info or {})
        self.scheduler = scheduler
        self.denoiser = OneStepDenoiser(unet, scheduler, self.sigma_e) if unet is not None else None
        try:
            self.class_map = None if class_map is None else tuple(int(e) for e in class_map)
        except (TypeError, ValueError) as exc:
            raise UsageError(
                f"class_map must be a list of expert indices, got {class_map!r}."
            ) from exc
        if self.class_map is not None:
            if not self.class_map or not all(
                0 <= e < len(self.expert_names) for e in self.class_map
            ):
                raise UsageError(
                    "class_map must send every class to an expert index "
                    f"0..{len(self.expert_names) - 1}."
                )
            self.register_buffer("_routes", torch.tensor(self.class_map), persistent=False)
        self.gate = None if gate is None else check_gate(gate, self.sigmas)
        if self.gate is not None:
            if self.class_map is not None:
                raise UsageError("a router is a class-map router or a gate router, not both.")
            self.register_buffer(
                "_thresholds", torch.tensor(self.gate["thresholds"]), persistent=False
            )
            self.register_buffer("_order", torch.tensor(self.gate["order"]), persistent=False)
            rows = self.gate.get("class_thresholds")
            if rows is not None:
                self.register_buffer("_rows", torch.tensor(rows), persistent=False)
            outputs = self.gate["classes"]
        elif self.class_map is not None:
            outputs = len(self.class_map)
        else:
            outputs = len(self.expert_names)
        self.classifier = build_classifier(arch, outputs, self.in_chans, **self.arch_args)

    @classmethod
    def create(cls, *, seed: int = 0, **kwargs) -> RouterModel:
        """A new router whose random initial weights depend only on ``seed``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(**kwargs)

    # -- the smoothing-base contract
    @property
    def sigma(self) -> float:
        return self.sigma_e

    @property
    def num_classes(self) -> int:
        return len(self.expert_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_chans, *self.input_size)

    @property
    def kind(self) -> str:
        """learned (the paper's), class-map, gate or class-gate."""
        if self.gate:
            return "class-gate" if "class_thresholds" in self.gate else "gate"
        return "class-map" if self.class_map is not None else "learned"

    def expert_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's logits on x (after the denoiser, if any)."""
        if self.denoiser is not None:
            x = self.denoiser(x)
        return self.classifier(normalize(x, self.mean, self.std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.expert_logits(x)
        if self.gate is not None and "class_thresholds" in self.gate:
            score = normalized_entropy(logits)
            routes = route_by_class_score(score, logits.argmax(dim=-1), self._rows, self._order)
        elif self.gate is not None:
            routes = route_by_score(normalized_entropy(logits), self._thresholds, self._order)
        elif self.class_map is not None:
            routes = self._routes[logits.argmax(dim=1)]  # one vote for the mapped expert
        else:
            return logits
        return torch.nn.functional.one_hot(routes, self.num_classes).to(logits.dtype)

    def trainable_parameters(self):
        """The classifier's parameters: a denoiser in front stays frozen."""
        return self.classifier.parameters()

    # -- folder format
    def config(self) -> dict:
        return {
            "format": FORMAT,
            "arch": self.arch,
            "arch_args": self.arch_args,
            "sigma_e": self.sigma_e,
            "experts": list(self.expert_names),
            "sigmas": list(self.sigmas),
            "fingerprints": list(self.fingerprints),
            "in_chans": self.in_chans,
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "denoiser": self.denoiser is not None,
            **({"class_map": list(self.class_map)} if self.class_map is not None else {}),
            **({"gate": dict(self.gate)} if self.gate is not None else {}),
            **self.info,
        }

    @property
    def fingerprint(self) -> str:
        """sha256 of the config and every weight: changes when anything that routes changes."""
        digest = hashlib.sha256(sha256_json(self.config()).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write config.json, model.safetensors (classifier) and denoiser/ (diffusers format)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.denoiser is not None:
            self.denoiser.unet.save_pretrained(
                folder / "denoiser" / "unet", safe_serialization=True
            )
            self.scheduler.save_pretrained(folder / "denoiser" / "scheduler")
        write_safetensors(
            folder / "model.safetensors", self.classifier.state_dict(), metadata={"format": FORMAT}
        )
        write_json(folder / "config.json", self.config())
        return folder

    @classmethod
    def from_config(cls, config: dict, *, unet=None, scheduler=None) -> RouterModel:
        if config.get("format") != FORMAT:
            raise UsageError("this config.json does not describe an rsrouter router.")
        known = {
            "format", "arch", "arch_args", "sigma_e", "experts", "sigmas", "fingerprints",
            "in_chans", "input_size", "mean", "std", "denoiser", "class_map", "gate",
        }  # fmt: skip
        return cls(
            arch=config["arch"],
            arch_args=config.get("arch_args") or {},
            expert_names=config["experts"],
            sigmas=config["sigmas"],
            fingerprints=config["fingerprints"],
            in_chans=config["in_chans"],
            input_size=config["input_size"],
            mean=config["mean"],
            std=config["std"],
            sigma_e=config["sigma_e"],
            unet=unet,
            scheduler=scheduler,
            info={k: v for k, v in config.items() if k not in known},
            class_map=config.get("class_map"),
            gate=config.get("gate"),
        )

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, device: str | torch.device = "cpu"):
        """Load a router folder written by ``save_pretrained`` (safetensors only)."""
        folder = Path(folder)
        config = read_json(folder / "config.json")
        unet = scheduler = None
        if config.get("denoiser"):
            unet, scheduler = load_denoiser(folder / "denoiser")
        router = cls.from_config(config, unet=unet, scheduler=scheduler)
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise UsageError(f"{weights} does not exist.")
        try:
            with reading(weights, "run `router train` again to rewrite it"):
                router.classifier.load_state_dict(load_file(str(weights)))
        except RuntimeError as exc:
            raise UsageError(f"{weights} does not fit the architecture in config.json.") from exc
        return router.to(device).eval()

    def check_experts(self, names: Sequence[str], fingerprints: Sequence[str]) -> None:
        """Refuse to route for experts other than the ones (in the order) it was trained on."""
        if tuple(names) != self.expert_names:
            raise UsageError(
                f"the router was trained for experts {list(self.expert_names)} in that order, "
                f"but the workspace has {list(names)}: retrain it with `router train`."
            )
        if len(fingerprints) != len(names):
            raise UsageError("check_experts needs one fingerprint per expert name.")
        pairs = zip(names, fingerprints, self.fingerprints, strict=True)
        changed = [n for n, a, b in pairs if a != b]
        if changed:
            raise UsageError(
                f"expert(s) {', '.join(changed)} changed since the router was trained: "
                "rebuild the tables and retrain it."
            )
