"""The README.md model card of a router bundle: Hub metadata, usage, results, citation, licence.

A pure function of the bundle's config and the last report, so the card always says what the
folder beside it holds; rendered with huggingface_hub's ``ModelCard`` / ``ModelCardData``.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from rsrouter.composition.rules import headline_rule

TAGS = ["randomized-smoothing", "certified-robustness", "dual-randomized-smoothing"]

# Hub ids of the datasets rsrouter loads by name, for the card's `datasets:` metadata.
HUB_DATASETS = {
    "fashion-mnist": "zalando-datasets/fashion_mnist",
    "fashion-mnist-subset": "zalando-datasets/fashion_mnist",
    "mnist": "ylecun/mnist",
    "cifar10": "uoft-cs/cifar10",
}

CITATION = """@inproceedings{sun2026dual,
  title     = {Dual Randomized Smoothing: Beyond Global Noise Variance},
  author    = {Sun, Chenhao and Mao, Yuhao and Vechev, Martin},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2026},
  url       = {https://github.com/eth-sri/Dual-Randomized-Smoothing}
}"""

DATA_LICENCES = {
    "fashion-mnist": "Fashion-MNIST: MIT, © 2017 Zalando SE",
    "fashion-mnist-subset": "Fashion-MNIST: MIT, © 2017 Zalando SE",
}

# Config keys the card shows in their own sections (everything else goes to "Training").
_SHOWN = {
    "format", "arch", "arch_args", "sigma_e", "experts", "sigmas", "fingerprints", "in_chans",
    "input_size", "mean", "std", "denoiser", "bundle", "class_map", "gate",
}  # fmt: skip


def _cell(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text.replace("|", "\\|").replace("\n", " ")


def _bands(row, order, names) -> str:
    """'h ≤ t1 → A; t1 < h ≤ t2 → B; h > t2 → C' for one threshold row (empty bands left out)."""
    bounds, out = [-1.0, *row, 1.0], []
    for k, e in enumerate(order):
        lo, hi = bounds[k], bounds[k + 1]
        if hi <= lo or hi < 0 or lo >= 1:
            continue
        if lo < 0 and hi >= 1:
            text = "every draw"
        elif lo < 0:
            text = f"h ≤ {hi:g}"
        else:
            text = f"h > {lo:g}" if hi >= 1 else f"{lo:g} < h ≤ {hi:g}"
        out.append(f"{text} → {_cell(names[e] if e < len(names) else e)}")
    return "; ".join(out)


def _gate_routes(config: dict, names: list[str]) -> str:
    gate, labels = config["gate"], config.get("class_names") or []
    head = (
        f", a copy of expert {_cell(config.get('init', '—'))} whose normalised entropy h on each "
        "noisy draw picks the expert (a gate, thresholds fitted on a validation split): "
    )
    rows = gate.get("class_thresholds")
    if rows is None:
        return head + _bands(gate["thresholds"], gate["order"], names)
    return (
        head
        + "per class the copy predicts on the draw, "
        + "; ".join(
            f"{_cell(labels[c]) if c < len(labels) else c}: {_bands(row, gate['order'], names)}"
            for c, row in enumerate(rows)
        )
    )


def _experts_table(config: dict) -> str:
    pins = config.get("bundle", {}).get("experts", [])
    rows = ["| # | expert | σ | kind | source | commit |", "|---|---|---|---|---|---|"]
    for i, pin in enumerate(pins):
        commit = (pin.get("commit") or "")[:12] or "—"
        rows.append(
            f"| {i} | {_cell(pin['name'])} | {pin['sigma']:g} | {_cell(pin.get('kind', '—'))} "
            f"| {_cell(pin.get('source', '—'))} | `{commit}` |"
        )
    return "\n".join(rows)


def _training_table(config: dict) -> str:
    """Every other config entry (training hyperparameters, table n/alpha, data fingerprint)."""
    rows = []
    for key, value in sorted(config.items()):
        if key in _SHOWN:
            continue
        if isinstance(value, dict):
            rows += [f"| {_cell(f'{key}.{k}')} | {_cell(v)} |" for k, v in sorted(value.items())]
        else:
            rows.append(f"| {_cell(key)} | {_cell(value)} |")
    if not rows:
        return "No training record is stored in config.json."
    return "\n".join(["| setting | value |", "|---|---|", *rows])


def _demote(markdown: str) -> str:
    """Nest the report's headings under the card's "Certified accuracy" section."""
    return "\n".join("##" + line if line.startswith("#") else line for line in markdown.split("\n"))


def card_data(config: dict, *, license: str, dataset: str | None) -> ModelCardData:
    """The YAML header: licence, library, tags and (when known on the Hub) the dataset."""
    datasets = [HUB_DATASETS[dataset]] if dataset in HUB_DATASETS else None
    return ModelCardData(
        license=license,
        library_name="rsrouter",
        tags=TAGS,
        datasets=datasets,
        pipeline_tag="image-classification",
    )


def render_card(
    config: dict,
    *,
    repo_id: str | None = None,
    license: str = "apache-2.0",
    dataset: str | None = None,
    report_md: str | None = None,
    has_curve: bool = False,
) -> ModelCard:
    """The model card of a bundle whose config.json is ``config``.

    ``report_md`` is the certified-accuracy table of the last ``router report`` (markdown) and
    ``has_curve`` says whether ``curve.png`` sits in the bundle; without them the card says so.
    """
    name = repo_id or "this router"
    pins = config.get("bundle", {}).get("experts", [])
    sigmas = ", ".join(f"{p['sigma']:g}" for p in pins)
    denoiser = "a one-step diffusion denoiser, then " if config.get("denoiser") else ""
    routes = ""
    if config.get("gate"):
        routes = _gate_routes(config, [p["name"] for p in pins])
    elif config.get("class_map"):
        names = [p["name"] for p in pins]
        labels = config.get("class_names") or []
        groups = {}
        for c, e in enumerate(config["class_map"]):
            groups.setdefault(e, []).append(_cell(labels[c]) if c < len(labels) else str(c))
        routes = (
            f", a copy of expert {_cell(config.get('init', '—'))} whose predicted class picks the "
            "expert (class map, not trained): "
            + "; ".join(
                f"classes {', '.join(cs)} → {_cell(names[e] if e < len(names) else e)}"
                for e, cs in sorted(groups.items())
            )
        )
    if config.get("cascade"):
        routes += (
            ". The bundle also holds a class-aware cascade of the experts, fitted on a "
            'validation split (`cascade` below; `rule="cascade"`): each expert in turn fires '
            "when its own smoothed probability of a class passes that class's threshold, and no "
            "router is read"
        )
        tuning = config.get("tuning") or {}
        fit = tuning.get("cascade_fit")  # routers fitted since session 15 record how
        if fit:
            meaning = tuning.get("cascade_fit_meaning")
            routes += f" (fit {_cell(f'{fit}: {meaning}' if meaning else fit)})"
    results = (
        _demote(report_md.strip())
        if report_md
        else "No certification report was found when this bundle was made: run `router certify` "
        "and `router report` in the workspace, then `router push` again."
    )
    if has_curve:
        results += "\n\n![Certified accuracy against radius](curve.png)"
    shown = Path(dataset).name if dataset else "not recorded"  # never a local path
    data_licence = DATA_LICENCES.get(dataset or "", f"dataset: {shown}")
    load_arg = f'"{repo_id}"' if repo_id else '"path/to/bundle"'
    body = f"""
# {name}: a Dual Randomized Smoothing router

A router, itself randomized-smoothed with a global σ_e = {config["sigma_e"]:g}, picks for each
input which of {len(pins)} expert randomized-smoothing classifiers (σ = {sigmas}) certifies it.
The certified ℓ2 radius is min(R_σ, R_c): the router's radius and the chosen expert's, at total
failure probability α = α_router + α_expert (Sun, Mao & Vechev, ICLR 2026, Theorem 4.2).
Router base model: {denoiser}`{config["arch"]}` on inputs of shape
{config["in_chans"]}×{"×".join(str(s) for s in config["input_size"])} in [0, 1]{routes}.

## Experts

Each expert is pinned to the commit and file hashes it was trained with; loading fails if any of
them changed.

{_experts_table(config)}

## Usage

```bash
pip install rsrouter
router pull {repo_id or "ORG/NAME"}   # fetches the router and its pinned experts, checks hashes
router pull {repo_id or "ORG/NAME"} -w my-router   # the same, as a workspace for `router certify`
```

```python
import rsrouter

model = rsrouter.load_router({load_arg})   # an rsrouter.composition.DualSmoothed
# model.rule = "{headline_rule(None, config)}" (the results below have a row for every rule)
cert = model.certify(x, n0=100, n=10_000, alpha=0.001, seed=0, index=0)  # x: (C, H, W)
print(cert.prediction, cert.radius, cert.expert)  # class (-1 = abstain), radius, expert index
```

## Certified accuracy

{results}

## Training

{_training_table(config)}

## Citation

```bibtex
{CITATION}
```

## Licence

This router is released under the `{license}` licence. Each expert keeps the licence of its
own repository, and the training data keeps its own ({data_licence}).
"""
    header = card_data(config, license=license, dataset=dataset).to_yaml()
    return ModelCard(f"---\n{header}\n---\n{body}")
