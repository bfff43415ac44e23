"""An expert: a base classifier bound to the sigma it is smoothed at, saved as a Hub-ready folder.

Folder format (``save_pretrained`` / ``Expert.from_pretrained``)::

    config.json         ExpertConfig (format version, kind, sigma, architecture, data, licence)
    model.safetensors   the classifier's state dict
    denoiser/           kind "denoised" only: diffusers UNet2DModel + DDPMScheduler, safetensors
    README.md           a model card

Kinds: "classifier" (a Gaussian-trained classifier, Cohen et al. 2019) and "denoised" (a one-step
diffusion denoiser then an off-the-shelf classifier, Carlini et al. 2023; one denoised folder
can serve several sigma, so its sigma may be given when loading).

huggingface_hub's PyTorchModelHubMixin is not used: its loader is non-strict, falls back to
unpickling ``pytorch_model.bin``, takes no endpoint and has no subfolder for a diffusers model.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from rsrouter.errors import UsageError
from rsrouter.experts.denoiser import OneStepDenoiser
from rsrouter.experts.formats import is_timm_config, is_transformers_vit, timm_fields
from rsrouter.experts.nets import build_classifier, count_parameters, normalize
from rsrouter.io import atomic_path, sha256_file, sha256_json, write_json, write_text
from rsrouter.progress import hub_progress
from rsrouter.smoothing import check_sigma

FORMAT_VERSION = 1
KINDS = ("classifier", "denoised")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
DENOISER_DIR = "denoiser"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
UNET_CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# How a denoised expert resizes the denoised image to the classifier's input size. The default is
# Carlini et al.'s (DRM.py: interpolate(mode="bicubic", antialias=True)); configs written before
# the field existed were computed with LEGACY_RESIZE and keep it.
RESIZE_MODES = ("bicubic-antialias", "bilinear-antialias", "bicubic", "bilinear", "nearest")
DEFAULT_RESIZE = "bicubic-antialias"
LEGACY_RESIZE = "bilinear"
# What an expert repo needs from the Hub (nothing else is downloaded).
EXPERT_PATTERNS = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, f"{DENOISER_DIR}/*.json"]
EXPERT_PATTERNS += [f"{DENOISER_DIR}/*.safetensors"]
# What a diffusers denoiser repo needs (UNet at the root or in unet/, scheduler likewise).
DENOISER_PATTERNS = ["*.json", "*.safetensors", "unet/*.json", "unet/*.safetensors"]
DENOISER_PATTERNS += ["scheduler/*.json", CARD_NAME]
# Config fields that change what the expert computes (the rest documents it).
FUNCTIONAL_FIELDS = (
    "kind",
    "sigma",
    "arch",
    "arch_args",
    "num_classes",
    "in_chans",
    "input_size",
    "mean",
    "std",
    "classifier_input_size",
)


@dataclass
class ExpertConfig:
    """Everything needed to rebuild an expert from its weights, and to describe it."""

    kind: str
    sigma: float | None
    arch: str
    num_classes: int
    in_chans: int
    input_size: list[int]
    arch_args: dict = field(default_factory=dict)
    mean: list[float] | None = None
    std: list[float] | None = None
    class_names: list[str] = field(default_factory=list)
    dataset: str = ""
    source: str = ""
    license: str = "unknown"
    training: dict = field(default_factory=dict)
    classifier_input_size: list[int] | None = None  # "denoised": the classifier's H, W
    denoiser_subfolder: str | None = None  # "denoised": where the diffusers files are
    resize_mode: str | None = None  # "denoised": one of RESIZE_MODES
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UsageError(f"expert kind must be one of {KINDS}, got {self.kind!r}.")
        if self.sigma == 0:  # trained on clean images: not bound to a sigma
            self.sigma = None
        if self.sigma is not None:
            self.sigma = check_sigma(self.sigma)
        self.input_size = _size(self.input_size)
        if self.classifier_input_size is not None:
            self.classifier_input_size = _size(self.classifier_input_size)
        if self.kind == "denoised":
            self.classifier_input_size = self.classifier_input_size or list(self.input_size)
            self.denoiser_subfolder = self.denoiser_subfolder or DENOISER_DIR
            self.resize_mode = check_resize_mode(self.resize_mode or DEFAULT_RESIZE)
        else:
            self.resize_mode = None  # a classifier sees its input as it is
        self.mean = [
            float(m) for m in (self.mean if self.mean is not None else [0.0] * self.in_chans)
        ]
        self.std = [float(s) for s in (self.std if self.std is not None else [1.0] * self.in_chans)]
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise UsageError(f"mean and std need one value per input channel ({self.in_chans}).")
        if any(s <= 0 for s in self.std):
            raise UsageError("std values must be positive.")
        self.class_names = [str(c) for c in self.class_names]
        if self.class_names and len(self.class_names) != self.num_classes:
            raise UsageError(f"{len(self.class_names)} class names for {self.num_classes} classes.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "config.json") -> ExpertConfig:
        version = data.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise UsageError(
                f"{where} has expert format version {version!r}; this rsrouter reads up to "
                f"{FORMAT_VERSION}: upgrade rsrouter."
            )
        known = {f.name for f in fields(cls)}
        missing = [
            k for k in ("kind", "arch", "num_classes", "in_chans", "input_size") if k not in data
        ]
        if missing:
            raise UsageError(f"{where} is not an rsrouter expert config (missing {missing}).")
        data = {k: v for k, v in data.items() if k in known}
        if data["kind"] == "denoised" and data.get("resize_mode") is None:
            data["resize_mode"] = LEGACY_RESIZE  # written before the field: what it computed
        return cls(**data)

    def functional(self) -> dict:
        """The fields that change the expert's output: part of its fingerprint.

        ``resize_mode`` counts unless it is LEGACY_RESIZE, so that an expert computing what it
        computed before the field existed keeps its fingerprint (routers pin them).
        """
        d = self.to_dict()
        out = {k: d[k] for k in FUNCTIONAL_FIELDS}
        if self.resize_mode not in (None, LEGACY_RESIZE):
            out["resize_mode"] = self.resize_mode
        return out


def check_resize_mode(mode: str, what: str = "resize_mode") -> str:
    if mode not in RESIZE_MODES:
        raise UsageError(f"{what} must be one of {', '.join(RESIZE_MODES)}, got {mode!r}.")
    return mode


def resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """``x`` resized to ``size`` with one of RESIZE_MODES."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    kind, _, antialias = mode.partition("-")
    return F.interpolate(x, size=size, mode=kind, align_corners=False, antialias=bool(antialias))


def _size(value) -> list[int]:
    size = [int(value)] * 2 if isinstance(value, int) else [int(v) for v in value]
    if len(size) != 2 or min(size) <= 0:
        raise UsageError(f"an input size is (height, width), got {value!r}.")
    return size


class Expert(nn.Module):
    """Noisy [0, 1] images (B, C, H, W) → logits (B, K); normalisation and denoising inside."""

    def __init__(self, config: ExpertConfig, classifier: nn.Module, unet=None, scheduler=None):
        super().__init__()
        if config.sigma is None and config.kind == "denoised":
            raise UsageError("a denoised expert needs its sigma: pass sigma=.")
        if (config.kind == "denoised") != (unet is not None and scheduler is not None):
            raise UsageError('a "denoised" expert needs a UNet and a scheduler; a classifier none.')
        self.config = config
        self.classifier = classifier
        self.scheduler = scheduler
        self.denoiser = OneStepDenoiser(unet, scheduler, config.sigma) if unet is not None else None
        self.register_buffer("mean", torch.tensor(config.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, -1, 1, 1), persistent=False)
        self._file_hashes: dict[str, str] | None = None
        self._hashed_version: int | None = None

    # ---- the contract
    @property
    def sigma(self) -> float:
        if self.config.sigma is None:
            raise UsageError(
                f"this {self.config.arch} classifier was trained without noise and is bound to no "
                "sigma: register it with a sigma, or as the classifier of a denoised expert."
            )
        return float(self.config.sigma)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.config.in_chans, *self.config.input_size)

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def class_names(self) -> list[str]:
        return self.config.class_names or [str(k) for k in range(self.num_classes)]

    @property
    def num_parameters(self) -> int:
        return count_parameters(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.denoiser is not None:
            x = self.denoiser(x)
            x = resize(x, tuple(self.config.classifier_input_size), self.config.resize_mode)
        return self.classifier(normalize(x, self.mean, self.std))

    # ---- identity
    @property
    def fingerprint(self) -> str:
        """sha256 of the functional config (with sigma) and of each weight file's sha256.

        Computed from the files an expert was loaded from or saved to; an expert whose weights
        changed in place since (training, load_state_dict) is hashed again.
        """
        if self._file_hashes is None or self._hashed_version != self._weights_version():
            with tempfile.TemporaryDirectory(prefix="rsrouter-fingerprint-") as tmp:
                self._write_weights(Path(tmp))
        return fingerprint_of(self.config, self._file_hashes)

    @property
    def file_hashes(self) -> dict[str, str]:
        """sha256 of every weight and diffusers config file, by path inside the folder."""
        self.fingerprint  # noqa: B018  (refreshes the hashes if the weights changed)
        return dict(self._file_hashes)

    def _weights_version(self) -> int:
        """torch bumps a tensor's _version on every in-place change (optimizer steps, copy_)."""
        try:
            return sum(t._version for t in self.state_dict(keep_vars=True).values())
        except RuntimeError:  # inference-mode tensors keep no version counter
            return -1

    def adopt_file_hashes(self, file_hashes: dict[str, str]) -> None:
        """Take already-verified file hashes (the registry's) instead of hashing again."""
        self._file_hashes = dict(file_hashes)
        self._hashed_version = self._weights_version()

    def with_sigma(self, sigma: float) -> Expert:
        """The same denoised expert at another sigma (the UNet and classifier are shared)."""
        if self.kind != "denoised" and self.config.sigma is not None:
            raise UsageError(
                f"a Gaussian-trained classifier is bound to sigma={self.sigma}; only a denoised "
                "expert can serve another sigma."
            )
        config = ExpertConfig.from_dict({**self.config.to_dict(), "sigma": sigma})
        unet = self.denoiser.unet if self.denoiser is not None else None
        other = Expert(config, self.classifier, unet, self.scheduler)
        other._file_hashes, other._hashed_version = self._file_hashes, self._hashed_version
        return other

    # ---- construction
    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        sigma: float,
        arch: str,
        num_classes: int,
        in_chans: int,
        input_size,
        arch_args: dict | None = None,
        **config_fields,
    ) -> Expert:
        """Wrap a trained classifier built by ``build_classifier(arch, …)`` as a classifier expert.

        Its state dict must fit that architecture, so the saved folder reloads exactly.
        """
        config = ExpertConfig(
            kind="classifier",
            sigma=sigma,
            arch=arch,
            num_classes=num_classes,
            in_chans=in_chans,
            input_size=input_size,
            arch_args=dict(arch_args or {}),
            **config_fields,
        )
        reference = build_classifier(arch, num_classes, in_chans, **config.arch_args)
        check_state_dict(reference, module.state_dict(), arch)
        return cls(config, module)

    @classmethod
    def from_parts(
        cls,
        classifier_config: ExpertConfig,
        classifier: nn.Module,
        unet,
        scheduler,
        *,
        sigma: float,
        **config_fields,
    ) -> Expert:
        """A denoised expert: ``unet`` + ``scheduler`` one-step denoise, then ``classifier``.

        ``classifier_config`` describes the classifier (its sigma, if any, is replaced); the
        resize to the classifier's input size is DEFAULT_RESIZE unless ``resize_mode`` is given.
        """
        in_chans, out_chans = int(unet.config.in_channels), int(unet.config.out_channels)
        if out_chans not in (in_chans, 2 * in_chans):  # 2C: epsilon + learned variance
            raise UsageError(
                f"the denoiser's UNet takes {in_chans} channels and returns {out_chans}; a "
                f"denoiser returns epsilon ({in_chans}), or epsilon and a learned variance "
                f"({2 * in_chans})."
            )
        if in_chans != classifier_config.in_chans:
            raise UsageError(
                f"the denoiser works on {in_chans}-channel images but the classifier takes "
                f"{classifier_config.in_chans}."
            )
        base = classifier_config.to_dict()
        base.update(
            kind="denoised",
            sigma=sigma,
            input_size=_size(unet.config.sample_size),
            classifier_input_size=classifier_config.input_size,
            denoiser_subfolder=DENOISER_DIR,
            resize_mode=DEFAULT_RESIZE,
        )
        base.update(config_fields)
        return cls(ExpertConfig.from_dict(base), classifier, unet, scheduler)

    # ---- folders
    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write config.json, model.safetensors (+ denoiser/) and README.md; return the folder."""
        folder = Path(save_directory)
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"{folder} is a file; an expert is saved to a folder.")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the folder {folder} ({exc.strerror}).") from exc
        self._write_weights(folder)
        write_json(folder / CONFIG_NAME, self.config.to_dict())
        write_text(folder / CARD_NAME, model_card(self))
        return folder

    def _write_weights(self, folder: Path) -> None:
        from safetensors.torch import save_model

        with atomic_path(folder / WEIGHTS_NAME) as tmp:
            save_model(self.classifier, str(tmp))
        if self.denoiser is not None:
            sub = folder / self.config.denoiser_subfolder
            self.denoiser.unet.save_pretrained(sub, safe_serialization=True)
            self.scheduler.save_pretrained(sub)
        self._file_hashes = weight_file_hashes(folder, self.config)
        self._hashed_version = self._weights_version()

    @classmethod
    def from_pretrained(
        cls,
        dir_or_repo: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        endpoint: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        sigma: float | None = None,
        device: str | torch.device = "cpu",
    ) -> Expert:
        """Load an expert folder, or fetch a Hub repo (only the files an expert needs) first."""
        folder = Path(dir_or_repo)
        if not folder.is_dir():
            folder, _ = fetch_snapshot(
                str(dir_or_repo),
                revision=revision,
                cache_dir=cache_dir,
                endpoint=endpoint,
                token=token,
                local_files_only=local_files_only,
                allow_patterns=EXPERT_PATTERNS,
            )
        return load_folder(folder, sigma=sigma, device=device)


def fingerprint_of(config: ExpertConfig, file_hashes: dict[str, str]) -> str:
    return sha256_json({"config": config.functional(), "files": dict(sorted(file_hashes.items()))})


def check_state_dict(reference: nn.Module, state: dict, arch: str) -> None:
    """Refuse weights that do not fit, showing the expected and found names side by side and
    the option that renames them when one does."""
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want == got:
        return
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    if not missing and not extra:
        diff = [f"{k} {list(want[k])} but {list(got[k])}" for k in want if want[k] != got[k]]
        raise UsageError(
            f"the weights do not fit architecture {arch!r} with these arguments: expected "
            f"shapes differ ({'; '.join(diff[:3])}); check --arch and --arch-arg."
        )
    raise UsageError(
        f"the weights do not fit architecture {arch!r} with these arguments: expected names "
        f"{_first(missing)} but found {_first(extra)} ({len(missing)} missing, {len(extra)} "
        f"unexpected); {rename_hint(missing, extra)}."
    )


def _first(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f", … ({len(names)} in all)" if len(names) > n else "")


def rename_hint(missing: list[str], extra: list[str]) -> str:
    """The option that turns the found names into the expected ones, when one does."""
    for name in extra:
        for want in missing:
            if name.endswith("." + want):
                prefix = name[: len(name) - len(want)]
                stripped = {k[len(prefix) :] for k in extra if k.startswith(prefix)}
                if set(missing) <= stripped:  # every expected name is there under the prefix
                    return f"remove their prefix with `--strip-prefix {prefix}`"
    if any(k.rsplit(".", 1)[0].endswith(("layer1.0.conv1", "module.conv1")) for k in extra):
        return (
            "for a checkpoint of Cohen et al., Salman et al. or Jeong & Shin use `--format cohen "
            "--dataset cifar10` (or imagenet), which reads the architecture from the file"
        )
    return "check --arch and --arch-arg, or remove a wrapper prefix with --strip-prefix"


def weight_files(folder: Path, config: ExpertConfig) -> list[str]:
    """The files (relative paths) whose bytes determine what the expert computes."""
    names = [WEIGHTS_NAME]
    if config.kind == "denoised":
        names += [
            p.relative_to(folder).as_posix()
            for p in denoiser_paths(folder / config.denoiser_subfolder)
        ]
    return names


def weight_file_hashes(folder: Path, config: ExpertConfig) -> dict[str, str]:
    return {name: sha256_file(folder / name) for name in weight_files(folder, config)}


def refuse_pickles(folder: Path, wanted: str) -> None:
    """Raise the one-sentence refusal when ``wanted`` is absent (pickles named if present)."""
    pickles = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.suffix.lower() in PICKLE_SUFFIXES
    )
    if pickles:
        raise UsageError(
            f"{folder} has no {wanted}, only pickle checkpoints ({', '.join(pickles[:3])}); "
            "rsrouter loads safetensors only: convert one explicitly (`router convert-checkpoint "
            "--help` shows how; `--format cohen` reads a Cohen et al. checkpoint)."
        )
    raise UsageError(f"{folder} has no {wanted}: it is not an rsrouter expert folder.")


def read_config(folder: Path) -> ExpertConfig:
    path = folder / CONFIG_NAME
    if not path.is_file():
        refuse_pickles(folder, CONFIG_NAME)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}).") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not an rsrouter expert config.")
    if is_timm_config(data):  # a timm Hub folder is used as it is
        return ExpertConfig.from_dict(timm_fields(data, path), where=str(path))
    if is_transformers_vit(data):
        out = shlex.quote(str(folder.with_name(folder.name + "-rsrouter")))
        raise UsageError(
            f"{folder} is a transformers ViT folder: convert it to an expert folder first with "
            f"`router convert-checkpoint {shlex.quote(str(folder))} {out}`."
        )
    return ExpertConfig.from_dict(data, where=str(path))


def resolve_sigma(config: ExpertConfig, sigma: float | None, where) -> ExpertConfig:
    """The sigma to bind: a classifier keeps its own; a denoised expert takes the one asked."""
    if sigma is None:
        if config.sigma is None and config.kind == "denoised":
            raise UsageError(f"{where} is a denoised expert without a sigma: pass one (--sigma).")
        return config
    sigma = check_sigma(sigma)
    if config.kind == "classifier" and config.sigma is not None and config.sigma != sigma:
        raise UsageError(
            f"{where} was trained at sigma={config.sigma}, not {sigma}: a Gaussian-trained "
            "classifier is only certified at its own sigma."
        )
    return ExpertConfig.from_dict({**config.to_dict(), "sigma": sigma})


def load_classifier(folder: Path, config: ExpertConfig, device) -> nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    if not (folder / WEIGHTS_NAME).is_file():
        refuse_pickles(folder, WEIGHTS_NAME)
    net = build_classifier(config.arch, config.num_classes, config.in_chans, **config.arch_args)
    try:
        load_model(net, str(folder / WEIGHTS_NAME), strict=True, device=str(device))
    except (RuntimeError, SafetensorError) as exc:
        raise UsageError(
            f"{folder / WEIGHTS_NAME} does not fit architecture {config.arch!r} "
            f"({str(exc).splitlines()[0][:160]})."
        ) from exc
    return net.to(device).eval()


def denoiser_dirs(folder: Path) -> tuple[Path, Path]:
    """Where the UNet and the scheduler config are: the folder itself, or unet/ + scheduler/."""
    unet_dir = folder / "unet" if (folder / "unet" / UNET_CONFIG).is_file() else folder
    sched = folder / "scheduler" if (folder / "scheduler" / SCHEDULER_CONFIG).is_file() else folder
    return unet_dir, sched


def denoiser_paths(folder: Path) -> list[Path]:
    """The files a denoiser is loaded from: UNet config and weights, scheduler config."""
    unet_dir, sched_dir = denoiser_dirs(folder)
    return [unet_dir / UNET_CONFIG, unet_dir / UNET_WEIGHTS, sched_dir / SCHEDULER_CONFIG]


def check_denoiser_folder(
    folder: Path, hub_repo: str | None = None, revision: str | None = None, endpoint=None
) -> list[Path]:
    """``denoiser_paths(folder)``, refusing a missing file in one sentence; a UNet published
    as a pickle gets the `router convert-denoiser` command that converts it (``hub_repo``,
    ``revision``, ``endpoint``: where a Hub snapshot came from)."""
    unet_config, unet_weights, scheduler_config = paths = denoiser_paths(folder)
    if not unet_config.is_file():
        raise UsageError(f"{hub_repo or folder} has no diffusers UNet (config.json).")
    if not unet_weights.is_file():
        hub = (hub_repo, revision, endpoint)
        raise UsageError(missing_unet_weights(unet_weights.parent, folder, *hub))
    if not scheduler_config.is_file():
        raise UsageError(f"{folder} has no {SCHEDULER_CONFIG} (a diffusers DDPM scheduler).")
    return paths


def missing_unet_weights(unet_dir: Path, folder: Path, hub_repo, revision, endpoint=None) -> str:
    """Why a denoiser has no safetensors UNet, and the command that makes one."""
    import shlex

    source = hub_repo or str(folder)
    name = (hub_repo.rsplit("/", 1)[-1] if hub_repo else Path(folder).resolve().name) or "unet"
    command = f"router convert-denoiser {shlex.quote(source)} {shlex.quote(name + '-safetensors')}"
    command += " --format diffusers"
    for flag, value in (("--revision", revision), ("--endpoint", endpoint if hub_repo else None)):
        command += f" {flag} {shlex.quote(value)}" if value else ""
    advice = f"convert it with `{command}` and pass that folder as --denoiser"
    if hub_repo:
        at = f" at revision {revision}" if revision else ""
        return (
            f"Hub repo {hub_repo}{at} has no {UNET_WEIGHTS}; if it publishes the UNet as a "
            f"pickle (diffusion_pytorch_model.bin), {advice}."
        )
    pickles = sorted(p.name for p in unet_dir.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        return (
            f"{unet_dir} has no {UNET_WEIGHTS}, only a pickle ({', '.join(pickles[:3])}); "
            f"rsrouter loads safetensors only: {advice}."
        )
    return f"{unet_dir} has no {UNET_WEIGHTS}: it is not a diffusers UNet folder."


def load_denoiser(folder: Path, device="cpu"):
    """(UNet2DModel, DDPMScheduler) from a diffusers folder; safetensors only."""
    from diffusers import DDPMScheduler, UNet2DModel

    unet_config, _, scheduler_config = check_denoiser_folder(folder)
    unet_dir, sched_dir = unet_config.parent, scheduler_config.parent
    try:
        unet = UNet2DModel.from_pretrained(
            unet_dir, use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False
        )
        scheduler = DDPMScheduler.from_pretrained(sched_dir, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UsageError(
            f"{folder} is not a loadable diffusers UNet2DModel + DDPMScheduler."
        ) from exc
    return unet.to(device).eval(), scheduler


def load_folder(
    folder: str | os.PathLike, *, sigma: float | None = None, device="cpu", file_hashes=None
) -> Expert:
    """An expert from a local folder; ``file_hashes`` (already verified) saves hashing again."""
    folder = Path(folder)
    config = resolve_sigma(read_config(folder), sigma, folder)
    classifier = load_classifier(folder, config, device)
    unet = scheduler = None
    if config.kind == "denoised":
        unet, scheduler = load_denoiser(folder / config.denoiser_subfolder, device)
    expert = Expert(config, classifier, unet, scheduler).to(device).eval()
    expert.adopt_file_hashes(file_hashes or weight_file_hashes(folder, config))
    return expert


def fetch_snapshot(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir=None,
    endpoint: str | None = None,
    token=None,
    local_files_only: bool = False,
    allow_patterns=None,
) -> tuple[Path, str]:
    """Download (or find in the cache) a pinned snapshot of a Hub repo: (folder, commit hash)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        with hub_progress(where, enabled=not local_files_only) as bar:  # rich bars, never tqdm's
            path = snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                endpoint=endpoint,
                token=token,
                local_files_only=local_files_only,
                allow_patterns=allow_patterns,
                tqdm_class=bar,
            )
    except RepositoryNotFoundError as exc:
        raise UsageError(
            f"Hub repo {repo_id!r} does not exist or is private (pass --token)."
        ) from exc
    except RevisionNotFoundError as exc:
        raise UsageError(f"Hub repo {repo_id!r} has no revision {revision!r}.") from exc
    except LocalEntryNotFoundError as exc:
        raise UsageError(
            f"Hub repo {where!r} is not in the local cache and the Hub cannot be reached "
            "(offline or no network)."
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise UsageError(
            f"could not fetch Hub repo {where!r}: {str(exc).splitlines()[0][:200]}"
        ) from exc
    path = Path(path)
    commit = path.name if path.parent.name == "snapshots" else (revision or "")
    return path, commit


def model_card(expert: Expert) -> str:
    """A Hub model card: metadata header, what the expert is, how to load it."""
    from huggingface_hub import ModelCard, ModelCardData

    c = expert.config
    data = ModelCardData(
        library_name="rsrouter",
        license=c.license if c.license and c.license != "unknown" else None,
        tags=["randomized-smoothing", "certified-robustness", f"rsrouter-{c.kind}"],
        datasets=[c.dataset] if c.dataset else None,
    )
    sigma = "none (trained on clean images)" if c.sigma is None else c.sigma
    if c.kind == "classifier" and c.sigma is None:
        what = (
            f"a classifier (`{c.arch}`) trained on clean images, bound to no σ: the classifier "
            "of a denoised expert (`router add-expert CLASSIFIER --denoiser DENOISER --sigma …`)"
        )
    elif c.kind == "classifier":
        what = f"a Gaussian-trained classifier (`{c.arch}`) smoothed at σ = {c.sigma}"
    else:
        h, w = c.classifier_input_size
        what = (
            "a one-step diffusion denoiser (diffusers `UNet2DModel` in "
            f"`{c.denoiser_subfolder}/`), a {c.resize_mode} resize to {h}×{w}, then `{c.arch}`, "
            f"smoothed at σ = {c.sigma}"
        )
    shape = "×".join(str(s) for s in expert.input_shape)
    lines = [
        f"# rsrouter expert: {c.arch}, σ = {sigma}",
        "",
        f"A randomized-smoothing expert for rsrouter: {what}.",
        f"Input: noisy images in [0, 1] of shape {shape}; output: logits over {c.num_classes} "
        "classes. Normalisation (mean/std in `config.json`) is applied inside, after the noise.",
        "",
        f"- dataset: {c.dataset or 'not recorded'}",
        f"- source: {c.source or 'not recorded'}",
        f"- parameters: {expert.num_parameters:,}",
        f"- classes: {', '.join(expert.class_names)}",
        f"- fingerprint: `{expert.fingerprint}`",
    ]
    if c.training:
        lines.append(f"- training: `{json.dumps(c.training, sort_keys=True)}`")
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        f"router add-expert <this repo or folder> --sigma {c.sigma or 0.25}",
        "```",
        "",
        "```python",
        "from rsrouter.experts import Expert",
        f'expert = Expert.from_pretrained("<this repo or folder>", sigma={c.sigma or 0.25})',
        "```",
        "",
        "Weights are safetensors only.",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))
