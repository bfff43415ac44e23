"""The whole dual-RS pipeline as one resumable function: experts → tables → router → certify →
report. `router demo` and the examples call it; every size is a parameter, so a test runs the
same code at a tiny size.

Each step reuses what a previous run left in the workspace: registered experts are not
retrained, cached table columns are not recomputed, router training resumes from its last epoch
checkpoint, and certification resumes from its JSONL records.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from rsrouter.errors import UsageError
from rsrouter.experts.train import (
    DenoiserConfig,
    TrainConfig,
    build_denoiser,
    train_classifier,
    train_denoiser,
    train_expert,
)
from rsrouter.io import read_json
from rsrouter.router.train import GATE_KINDS
from rsrouter.runtime import resolve_device
from rsrouter.smoothing import check_count, check_sigma

EXPERT_KINDS = ("classifier", "denoised")


@dataclass(frozen=True)
class PipelineConfig:
    """Every size and hyperparameter of one pipeline run (recorded in the report folder)."""

    workspace: Path = Path("demo-output")
    dataset: str = "fashion-mnist-subset"
    data_root: str | None = None
    sigmas: tuple[float, ...] = (0.25, 0.5, 1.0)
    train_limit: int | None = None  # train experts / the denoiser on the first K images only
    validation: int = 0  # training images held out as the "val" split for tuning (0: none)
    # experts
    expert_kind: str = "classifier"  # "classifier": one Gaussian-trained model per sigma;
    # "denoised": one classifier through a trained DDPM denoiser at every sigma
    expert_arch: str = "small_cnn"
    expert_arch_args: dict = field(default_factory=lambda: {"width": 8})
    expert_epochs: int = 5
    expert_batch_size: int = 128
    expert_lr: float = 2e-3
    consistency_lambda: float = 0.0
    classifier_noise: float = 0.0  # denoised kind: the classifier's training noise (0 = clean)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    # radius tables
    table_n: int = 100
    table_alpha: float = 0.001
    table_subset: float = 1.0
    # router
    router_kind: str = "learned"  # learned (the paper's), or gate / class-gate (fitted on val)
    gate_bins: int = 20  # score bins of a gate router's fit: its thresholds lie on their edges
    tune_limit: int | None = None  # a gate's fit reads the first K val images (None: all)
    cascade_fit: str = "regret"  # how the experts' cascade is fitted (tuning.CASCADE_FITS)
    router_arch: str = "small_cnn"
    router_arch_args: dict = field(default_factory=lambda: {"width": 8})
    router_denoiser: bool = False  # put the trained DDPM in front of the router (denoised kind)
    router_epochs: int = 10
    router_batch_size: int = 128
    router_lr: float = 0.01
    router_options: dict = field(default_factory=dict)  # more router-training keyword arguments
    # certification
    certify_limit: int | None = 200  # first K test images
    n0: int = 100
    n: int = 1000
    alpha: float = 0.001
    alpha_router: float | None = None
    # the headline rule (every rule is reported); None: the cascade where the router carries one
    # (a gate router fitted on val), else agreement (rules.headline_rule)
    rule: str | None = None
    batch_size: int = 1000
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        if self.expert_kind not in EXPERT_KINDS:
            raise UsageError(
                f"expert_kind must be one of {EXPERT_KINDS}, got {self.expert_kind!r}."
            )
        if not self.sigmas or len(set(self.sigmas)) != len(self.sigmas):
            raise UsageError("sigmas must be a non-empty list of distinct noise levels.")
        for sigma in self.sigmas:
            check_sigma(sigma)
        for name in ("expert_epochs", "router_epochs", "table_n", "n0", "n", "batch_size"):
            check_count(name, getattr(self, name))
        for name in ("train_limit", "certify_limit", "tune_limit"):
            if getattr(self, name) is not None:
                check_count(name, getattr(self, name))
        if self.classifier_noise < 0:
            raise UsageError("classifier_noise must be non-negative (0 = clean training).")
        if self.router_kind not in ("learned", *GATE_KINDS):
            raise UsageError(
                f"router_kind must be learned, gate or class-gate, got {self.router_kind!r}."
            )
        from rsrouter.composition.tuning import check_cascade_fit

        check_cascade_fit(self.cascade_fit)
        if self.router_kind in GATE_KINDS and not self.validation:
            raise UsageError("a gate router is fitted on a val split: set validation > 0.")
        if self.rule is not None:
            from rsrouter.composition.rules import check_rule

            check_rule(self.rule)
        if self.router_denoiser and self.expert_kind != "denoised":
            raise UsageError("router_denoiser needs expert_kind='denoised' (the trained DDPM).")
        if self.router_denoiser and self.router_kind != "learned":
            raise UsageError(
                "router_denoiser puts the DDPM in front of the learned router; a gate router has "
                "none: set router_kind='learned'."
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["workspace"] = str(self.workspace)
        return d


@dataclass
class PipelineResult:
    workspace: Path
    report_dir: Path
    table_markdown: str
    plot: Path
    summary: dict
    certified_now: int = 0  # inputs certified by this call (0 when all records were there)
    seconds: dict[str, float] = field(default_factory=dict)


def expert_name(sigma: float) -> str:
    return f"gauss-sigma{sigma:g}"


class _Timer:
    def __init__(self, log: Callable[[str], None]):
        self.seconds: dict[str, float] = {}
        self.log = log

    def step(self, name: str, fn, *args, **kwargs):
        self.log(name)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[name] = round(time.perf_counter() - start, 2)
        return out


# ---------------------------------------------------------------- steps


def open_workspace(config: PipelineConfig):
    """The workspace at ``config.workspace``, created (with the dataset recorded) if missing."""
    from rsrouter.registry import Workspace

    path = Path(config.workspace)
    if (path / "router.toml").is_file():
        return Workspace.open(path)
    return Workspace.init(path, dataset=config.dataset)


def configure_workspace(ws, config: PipelineConfig, experts: Sequence[str]) -> None:
    """Write the run's settings into router.toml, so that `router tables/train/certify` on this
    workspace later use (and reuse) the same tables, router and certificates. The config owns
    these tables: a key it leaves unset (None) is removed, so every rerun reads what its
    config says (a hand edit of router.toml belongs in the config)."""
    if ws.settings("data").get("dataset") != config.dataset:
        raise UsageError(
            f"{ws.path} is a workspace for dataset {ws.settings('data').get('dataset')!r}, "
            f"not {config.dataset!r}: use another folder."
        )
    sections = {
        "data": {
            "dataset": config.dataset,
            "root": config.data_root,
            "validation": config.validation or None,
        },
        "tables": {
            "n": config.table_n,
            "alpha": config.table_alpha,
            "subset": config.table_subset,
            "seed": config.seed,
            "batch_size": config.batch_size,
        },
        "router": {
            "kind": config.router_kind,
            "arch": config.router_arch,
            "arch_args": config.router_arch_args,
            "denoiser": experts[0] if config.router_denoiser else None,
        },
        "tune": {
            "bins": config.gate_bins,
            "limit": config.tune_limit,
            "cascade": config.cascade_fit,
        }
        if config.router_kind in GATE_KINDS
        else {},
        "train": {
            "epochs": config.router_epochs,
            "batch_size": config.router_batch_size,
            "lr": config.router_lr,
            "seed": config.seed,
            **config.router_options,
        },
        "certify": {
            "n0": config.n0,
            "n": config.n,
            "alpha": config.alpha,
            "alpha_router": config.alpha_router,
            "rule": config.rule,
            "seed": config.seed,
            "limit": config.certify_limit,
            "batch_size": config.batch_size,
        },
    }
    for section, values in sections.items():
        values = {k: v for k, v in values.items() if v is not None and v != {}}
        stale = set(ws.settings(section)) - set(values)  # e.g. a denoiser no longer asked for
        if stale or any(ws.settings(section).get(k) != v for k, v in values.items()):
            ws.doc[section] = values
            ws.save()


def load_split(config: PipelineConfig, split: str):
    """A split of the dataset; the training split cut to ``train_limit`` (for the experts)."""
    from rsrouter.data import load_split

    data = load_split(config.dataset, split, root=config.data_root, validation=config.validation)
    limit = config.train_limit if split == "train" else None
    if limit is not None and limit < len(data):
        data = data.subset(range(limit))
    return data


def train_gaussian_experts(ws, train, config: PipelineConfig, device) -> list[str]:
    """Train and register one Gaussian-augmented expert per sigma (skips registered names)."""
    names = []
    for sigma in config.sigmas:
        name = expert_name(sigma)
        names.append(name)
        if name in _registered(ws):
            continue
        tc = TrainConfig(
            sigma=sigma,
            epochs=config.expert_epochs,
            batch_size=config.expert_batch_size,
            lr=config.expert_lr,
            consistency_lambda=config.consistency_lambda,
            seed=config.seed,
        )
        expert = train_expert(
            train.images,
            train.labels,
            tc,
            arch=config.expert_arch,
            arch_args=config.expert_arch_args,
            class_names=list(train.class_names),
            dataset=train.name,
            device=device,
            progress=config.progress,
        )
        folder = expert.save_pretrained(Path(ws.root) / "experts" / name)
        ws.add_expert(str(folder), sigma=sigma, name=name)
    return names


def train_denoised_experts(ws, train, config: PipelineConfig, device) -> list[str]:
    """The paper's single-classifier mode: train a DDPM denoiser and one classifier, then
    register the pair once per sigma (the "denoised" expert kind, Carlini et al. 2023).

    The classifier is trained on clean images (Carlini et al.'s off-the-shelf classifier) unless
    ``classifier_noise`` asks for light Gaussian augmentation.
    """
    from rsrouter.experts import Expert
    from rsrouter.experts.nets import build_classifier
    from rsrouter.experts.train import Normalized

    names = [f"dds-sigma{s:g}" for s in config.sigmas]
    if all(n in _registered(ws) for n in names):
        return names
    root = Path(ws.root) / "experts"
    den_folder, cls_folder = root / "ddpm", root / "dds-classifier"
    if not (den_folder / "unet" / "config.json").is_file():
        unet, scheduler = build_denoiser(
            config.denoiser, train.images.shape[1], train.images.shape[-1]
        )
        train_denoiser(
            unet, scheduler, train.images, config.denoiser, device=device, progress=config.progress
        )
        scheduler.save_pretrained(den_folder / "scheduler")
        unet.cpu().save_pretrained(den_folder / "unet", safe_serialization=True)
    if not (cls_folder / "config.json").is_file():
        in_chans = train.images.shape[1]
        tc = TrainConfig(
            sigma=config.classifier_noise,
            epochs=config.expert_epochs,
            batch_size=config.expert_batch_size,
            lr=config.expert_lr,
            seed=config.seed,
        )
        torch.manual_seed(config.seed)
        classifier = build_classifier(
            config.expert_arch, len(train.class_names), in_chans, **config.expert_arch_args
        )
        mean, std = (0.5,) * in_chans, (0.5,) * in_chans
        model = Normalized(classifier, mean, std)
        train_classifier(
            model, train.images, train.labels, tc, device=device, progress=config.progress
        )
        expert = Expert.from_module(
            classifier.cpu(),
            sigma=tc.sigma,
            arch=config.expert_arch,
            arch_args=config.expert_arch_args,
            num_classes=len(train.class_names),
            in_chans=in_chans,
            input_size=tuple(train.images.shape[2:]),
            mean=mean,
            std=std,
            class_names=list(train.class_names),
            dataset=train.name,
            training={
                "method": "classifier of a denoised expert (Gaussian noise when sigma > 0)",
                **tc.to_dict(),
                "denoiser": config.denoiser.to_dict(),
            },
        )
        expert.save_pretrained(cls_folder)
    registered = _registered(ws)
    missing = [s for s, n in zip(config.sigmas, names, strict=True) if n not in registered]
    # at every missing sigma at once (loaded and hashed once); named "dds-sigma<σ>"
    ws.add_expert(str(cls_folder), sigma=missing, name="dds", denoiser=str(den_folder))
    return names


def _registered(ws) -> set[str]:
    return {e.name for e in ws.experts}


def build_radius_tables(ws, config: PipelineConfig, device):
    """The workspace's radius tables (only missing columns are computed)."""
    from rsrouter.router.tables import workspace_tables

    table, _ = workspace_tables(ws, device=device, progress=config.progress)
    return table


def train_the_router(ws, config: PipelineConfig, device):
    """Train the router on the tables (resumes from its last epoch checkpoint), or fit a gate
    router on the val split."""
    if config.router_kind in GATE_KINDS:
        from rsrouter.composition.tuning import train_gate_workspace

        return train_gate_workspace(ws, device=device, progress=config.progress)[0]
    from rsrouter.router.train import train_workspace

    router, history, folder = train_workspace(ws, device=device, progress=config.progress)
    return router


def certify_test_set(ws, config: PipelineConfig, device):
    """Dual certification of the first ``certify_limit`` test inputs, with every baseline."""
    from rsrouter.composition.certify_run import certify_workspace

    return certify_workspace(ws, device=device, progress=config.progress)


def write_report(ws, run, config: PipelineConfig) -> dict[str, Path]:
    """The report of a certification run, plus the pipeline settings that produced it."""
    from rsrouter.composition.report import write_report as write
    from rsrouter.io import write_json

    paths = write(read_json(run.meta_path), run.records, Path(ws.artifacts) / "report")
    paths["pipeline"] = Path(ws.artifacts) / "report" / "pipeline.json"
    write_json(paths["pipeline"], config.to_dict())
    return paths


# ---------------------------------------------------------------- the whole run


def run_pipeline(
    config: PipelineConfig,
    *,
    log: Callable[[str], None] = lambda msg: None,
    register: Callable[[object, object, PipelineConfig, torch.device], Sequence[str]] | None = None,
) -> PipelineResult:
    """Run (or resume) every step; ``register`` replaces the expert step (e.g. Hub experts)."""
    device = resolve_device(config.device)
    ws = open_workspace(config)
    timer = _Timer(log)
    if register is None:
        register = (
            train_gaussian_experts if config.expert_kind == "classifier" else train_denoised_experts
        )
    train = load_split(config, "train")
    names = timer.step("experts", register, ws, train, config, device)
    if [n for n in ws.names if n in names] != list(names):
        raise UsageError(f"the expert step registered {ws.names}, not {list(names)}.")
    configure_workspace(ws, config, names)
    if config.router_kind == "learned":  # a gate router needs no radius tables
        timer.step("radius tables", build_radius_tables, ws, config, device)
    timer.step("router", train_the_router, ws, config, device)
    run = timer.step("certify", certify_test_set, ws, config, device)
    paths = timer.step("report", write_report, ws, run, config)
    return PipelineResult(
        workspace=Path(ws.root),
        report_dir=paths["markdown"].parent,
        table_markdown=paths["markdown"].read_text(encoding="utf-8"),
        plot=paths["plot"],
        summary=read_json(paths["summary"]),
        certified_now=run.computed,
        seconds=timer.seconds,
    )


def with_overrides(config: PipelineConfig, **overrides) -> PipelineConfig:
    """A copy with the given fields replaced (None values are ignored)."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})


def demo_config(**overrides) -> PipelineConfig:
    """`router demo`'s sizes: the bundled subset on 2 CPU cores in well under 5 minutes."""
    return with_overrides(DEMO, **overrides)


# The demo's headline is the design that measured best in docs/results/routing.md: the experts'
# class-aware cascade (each expert in turn fires when its own smoothed probability of a class
# passes that class's threshold; order and thresholds fitted on a val split of 300 training
# images), which the class-gate router's fit carries; the class gate itself (the sigma = 1
# expert's own entropy picks the expert) is reported under every rule beside it. The paper's
# learned router stays available (`router train --kind learned`);
# docs/results/cpu-demo-router-study.md has its study.
DEMO = PipelineConfig(
    workspace=Path("demo-output"),
    dataset="fashion-mnist-subset",
    validation=300,
    expert_arch_args={"width": 16},
    expert_epochs=10,
    table_subset=0.3,
    router_kind="class-gate",
    gate_bins=10,
    router_epochs=10,
    certify_limit=200,
    n0=32,
    n=200,
)
