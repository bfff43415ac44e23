"""Router bundles: push → pull round trip through the loopback Hub, pinned experts, the card."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard

from helpers import small_cnn_expert, tiny_unet
from rsrouter.composition.bundle import (
    bundle_pins,
    bundle_workspace,
    load_router,
    make_bundle,
    push_bundle,
)
from rsrouter.composition.cascade import multiscale_spec
from rsrouter.composition.certify_run import certify_workspace, load_run
from rsrouter.composition.dual import DualSmoothed
from rsrouter.composition.report import summarize, to_markdown, write_report
from rsrouter.errors import UsageError
from rsrouter.experts import Expert
from rsrouter.io import read_json
from rsrouter.registry import Workspace
from rsrouter.router.model import RouterModel

pytest_plugins = ["hub_server"]  # the `hub` fixture: a loopback Hub test double

SHAPE = (1, 28, 28)  # the bundled Fashion-MNIST subset, so a real report can be made
SIGMAS = {"low": 0.25, "high": 0.5}
CERTIFY = {"n0": 10, "n": 100, "alpha": 0.01, "seed": 3, "batch_size": 100}
SMALL_RUN = {"limit": 3, "n0": 10, "n": 40, "alpha": 0.01}


def _expert(sigma: float, seed: int) -> Expert:
    return small_cnn_expert(
        sigma, seed=seed, num_classes=10, input_size=SHAPE[1:], width=4,
        dataset="fashion-mnist-subset", license="mit",
    )  # fmt: skip


def _push_expert(api: HfApi, expert: Expert, repo_id: str, folder: Path) -> str:
    expert.save_pretrained(folder)
    api.create_repo(repo_id, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=folder).oid


@pytest.fixture
def published(hub, tmp_path):
    """Two experts and a router bundle on the loopback Hub; the local objects to compare with."""
    api = HfApi(endpoint=hub.endpoint, token="hf_test")
    ws = Workspace.init(tmp_path / "ws", dataset="fashion-mnist-subset")
    for i, (name, sigma) in enumerate(SIGMAS.items()):
        _push_expert(api, _expert(sigma, seed=i), f"org/expert-{name}", tmp_path / "src" / name)
        ws.add_expert(f"org/expert-{name}", sigma, name=name, endpoint=hub.endpoint,
                      cache_dir=tmp_path / "pusher-cache")  # fmt: skip
    experts = list(ws.load_experts().values())
    torch.manual_seed(7)
    router = RouterModel(
        arch="small_cnn", arch_args={"width": 4}, expert_names=list(SIGMAS),
        sigmas=list(SIGMAS.values()), fingerprints=[e.fingerprint for e in experts],
        in_chans=1, input_size=SHAPE[1:], sigma_e=0.5,
        info={"training": {"epochs": 3, "lr": 0.01},
              "table": {"n": 100, "alpha": 0.001, "dataset_fingerprint": "ab" * 32}},
    ).eval()  # fmt: skip
    router.save_pretrained(ws.artifacts / "router")
    run = certify_workspace(ws, progress=False, **SMALL_RUN)  # the card's results
    bundle = bundle_workspace(ws, repo_id="org/router")
    info = push_bundle(bundle, "org/router", endpoint=hub.endpoint, token="hf_test")
    pins = bundle_pins(read_json(bundle / "config.json"))
    local = DualSmoothed(router, router.sigma_e, experts, rule="agreement")  # the headline
    return {"api": api, "ws": ws, "bundle": bundle, "commit": info.oid, "local": local,
            "pins": pins, "router_dir": ws.artifacts / "router", "run": run}  # fmt: skip


def _card_table(run_path) -> str:
    """The report of a run as the card nests it (its headings two levels down)."""
    table = to_markdown(summarize(*load_run(run_path))).strip()
    return "\n".join("##" + x if x.startswith("#") else x for x in table.split("\n"))


def _routes(card: str) -> list[str]:
    """The headline dual row's routing shares (low, high) in the card's routing table."""
    row = next(x for x in card.splitlines() if "headline) | " in x and x.endswith("% |"))
    return [c.strip() for c in row.split("|")[2:4]]


def _route_all_to(router: RouterModel, expert: int) -> RouterModel:
    """The same router with its output layer set to pick ``expert`` whatever the input."""
    last = [m for m in router.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([10.0 if i == expert else -10.0 for i in range(2)]))
    return router


def _certify(model: DualSmoothed):
    x = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(11))
    return [c.to_dict() for c in model.certify_batch(x, **CERTIFY)]


def test_push_pull_round_trip_certifies_like_the_local_object(hub, published, tmp_path):
    model = load_router("org/router", endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
    assert isinstance(model, DualSmoothed)
    assert model.rule == "agreement"  # the rule the card's report headlines (no cascade here)
    assert model.router.expert_names == tuple(SIGMAS)
    assert model.sigmas == list(SIGMAS.values())
    assert _certify(model) == _certify(published["local"])
    files = published["api"].list_repo_files("org/router")
    assert {"config.json", "model.safetensors", "README.md", "curve.png"} <= set(files)
    assert not hub.unhandled


def test_card_has_metadata_table_curve_and_citation(published):
    card = ModelCard.load(published["bundle"] / "README.md")
    assert card.data.library_name == "rsrouter"
    assert card.data.license == "apache-2.0"
    assert {"randomized-smoothing", "certified-robustness"} <= set(card.data.tags)
    assert card.data.datasets == ["zalando-datasets/fashion_mnist"]
    assert _card_table(published["run"].path) in card.text
    assert "![Certified accuracy against radius](curve.png)" in card.text
    assert "Dual Randomized Smoothing: Beyond Global Noise Variance" in card.text
    assert 'rsrouter.load_router("org/router")' in card.text
    assert 'model.rule = "agreement"' in card.text
    assert "| table.n | 100 |" in card.text and "| training.lr | 0.01 |" in card.text
    for pin in published["pins"]:
        assert pin["commit"][:12] in card.text


def test_card_without_report_says_so_and_a_new_push_drops_the_old_curve(hub, published, tmp_path):
    api = published["api"]
    api.upload_file(path_or_fileobj=b"notes", path_in_repo="NOTES.txt", repo_id="org/router")
    bundle = make_bundle(published["router_dir"], tmp_path / "plain", published["pins"])
    text = (bundle / "README.md").read_text()
    assert "No certification report was found" in text and "curve.png" not in text
    assert not (bundle / "curve.png").exists()
    push_bundle(bundle, "org/router", endpoint=hub.endpoint, token="hf_test")
    files = set(api.list_repo_files("org/router"))
    assert "curve.png" not in files and {"NOTES.txt", "README.md", "config.json"} <= files


def test_new_expert_commits_do_not_change_the_pinned_router(hub, published, tmp_path):
    _push_expert(published["api"], _expert(0.25, seed=99), "org/expert-low", tmp_path / "new")
    model = load_router("org/router", endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
    assert _certify(model) == _certify(published["local"])


def test_missing_expert_revision_names_the_expert(hub, published, tmp_path):
    hub.drop_commit("org/expert-high", published["pins"][1]["commit"])
    with pytest.raises(UsageError, match="expert 'high'.*cannot be fetched.*has no revision"):
        load_router("org/router", endpoint=hub.endpoint, cache_dir=tmp_path / "cache")


def test_changed_expert_file_fails_the_hash_check(hub, published, tmp_path):
    hub.set_file("org/expert-low", "model.safetensors", b"not the weights",
                 revision=published["pins"][0]["commit"])  # fmt: skip
    with pytest.raises(
        UsageError, match="expert 'low': model.safetensors does not match the sha256"
    ):
        load_router("org/router", endpoint=hub.endpoint, cache_dir=tmp_path / "cache")


def test_offline_load_from_the_cache(hub, published, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    online = _certify(load_router("org/router", endpoint=hub.endpoint, cache_dir=cache))
    dead = "http://127.0.0.1:9"  # a closed port: any request would fail
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    seen = len(hub.requests)
    assert _certify(load_router("org/router", endpoint=dead, cache_dir=cache)) == online
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    model = load_router("org/router", endpoint=dead, cache_dir=cache, local_files_only=True)
    assert _certify(model) == online
    assert len(hub.requests) == seen
    with pytest.raises(UsageError, match="not in the local cache"):
        load_router("org/router", cache_dir=tmp_path / "empty", local_files_only=True)


def test_local_bundle_folder_loads_and_push_refuses_local_experts(hub, published, tmp_path):
    model = load_router(published["bundle"], endpoint=hub.endpoint, cache_dir=tmp_path / "c")
    assert _certify(model) == _certify(published["local"])
    local = [dict(p, source=str(tmp_path / "src" / p["name"]), commit=None, revision=None)
             for p in published["pins"]]  # fmt: skip
    bundle = make_bundle(published["router_dir"], tmp_path / "local-bundle", local)
    assert _certify(load_router(bundle)) == _certify(published["local"])
    with pytest.raises(UsageError, match="local folder: a revision names a Hub commit"):
        load_router(bundle, revision="main")
    with pytest.raises(UsageError, match="come from local folders"):
        push_bundle(bundle, "org/other", endpoint=hub.endpoint, token="hf_test")


def test_a_bundled_cascade_is_the_rule_load_router_certifies_with(published, tmp_path):
    """A router that carries the experts' cascade loads with it as its rule, the rule `router
    certify` headlines by default, and the card's usage says so."""
    router = RouterModel.from_pretrained(published["router_dir"])
    classes = published["local"].experts[0].num_classes
    spec = multiscale_spec(list(SIGMAS.values()), classes, p_skip=0.6)
    router.info["cascade"] = spec.to_dict()
    router.save_pretrained(tmp_path / "router")
    local = [dict(p, source=str(tmp_path / "src" / p["name"]), commit=None, revision=None)
             for p in published["pins"]]  # fmt: skip
    bundle = make_bundle(tmp_path / "router", tmp_path / "bundle", local)
    model = load_router(bundle)
    assert model.rule == "cascade" and model.cascade == spec
    assert 'model.rule = "cascade"' in (bundle / "README.md").read_text()  # the card says so
    experts = published["local"].experts
    assert _certify(model) == _certify(DualSmoothed(router, router.sigma_e, experts,
                                                    rule="cascade", cascade=spec))  # fmt: skip
    assert _certify(model) != _certify(published["local"])


def test_bundle_refuses_experts_the_router_was_not_trained_with(published, tmp_path):
    swapped = list(reversed(published["pins"]))
    with pytest.raises(UsageError, match="retrain it"):
        make_bundle(published["router_dir"], tmp_path / "b", swapped)
    changed = [dict(published["pins"][0], fingerprint="0" * 64), published["pins"][1]]
    with pytest.raises(UsageError, match="expert 'low' changed"):
        make_bundle(published["router_dir"], tmp_path / "b", changed)


def test_push_errors_are_one_sentence(hub, published):
    with pytest.raises(UsageError, match="could not reach the Hub"):
        push_bundle(published["bundle"], "org/x", endpoint="http://127.0.0.1:9", token="t")
    with pytest.raises(UsageError, match="refused to push to 'org/x' \\(HTTP 401\\)"):
        push_bundle(published["bundle"], "org/x", endpoint=hub.endpoint, token=False)


def test_a_plain_router_folder_is_not_a_bundle(published):
    with pytest.raises(UsageError, match="not a bundle"):
        load_router(published["router_dir"])


def test_missing_router_repo_is_one_sentence(hub, tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_router("org/nothing", endpoint=hub.endpoint, cache_dir=tmp_path / "cache")


def test_cli_push_then_pull(hub, published, tmp_path, capsys):
    import rsrouter.cli.hub  # noqa: F401  (registers push and pull)
    from rsrouter.cli.app import run

    ws = str(published["ws"].root)
    argv = ["push", "org/cli-router", "--endpoint", hub.endpoint, "--token", "t", "-w", ws]
    assert run([*argv, "--revision", "v2", "--private"]) == 0
    out = capsys.readouterr().out
    commit = HfApi(endpoint=hub.endpoint, token="t").model_info("org/cli-router", revision="v2").sha
    assert commit in out
    assert run(["pull", "org/cli-router", "--revision", "v2", "--endpoint", hub.endpoint,
                "--token", "t", "--cache-dir", str(tmp_path / "cache")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert commit in out and "low" in out and "high" in out
    assert run(["pull", "org/cli-router", "--revision", "v2", "--offline",
                "--cache-dir", str(tmp_path / "cache")]) == 0  # fmt: skip
    assert (
        run(
            [
                "pull",
                "org/cli-router",
                "--endpoint",
                hub.endpoint,
                "--token",
                "t",
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
        == 1
    )  # fmt: skip  (main has no bundle)
    assert "not an rsrouter router bundle" in capsys.readouterr().err


def test_card_carries_the_reported_run_of_this_router(hub, published):
    ws = published["ws"]
    other = certify_workspace(ws, progress=False, **{**SMALL_RUN, "n": 20})  # the newest run
    paths = write_report(*load_run(published["run"].path), ws.artifacts / "report")
    bundle = bundle_workspace(ws, repo_id="org/router")
    text = (bundle / "README.md").read_text()
    assert _card_table(published["run"].path) in text  # the run `router report` showed
    assert "\n### Certified accuracy" in text  # the report's title, nested under the card's
    assert (bundle / "curve.png").read_bytes() == paths["plot"].read_bytes()
    paths["summary"].unlink()  # no report: the newest run of this router
    bundle = bundle_workspace(ws, repo_id="org/router")
    assert _card_table(other.path) in (bundle / "README.md").read_text()
    assert read_json(bundle / "config.json")["bundle"]["certify_run"]["run"] == other.path.stem


def test_push_after_retraining_publishes_the_new_routers_table(hub, published, tmp_path, capsys):
    import rsrouter.cli.hub  # noqa: F401  (registers push)
    from rsrouter.cli.app import run

    ws, api = published["ws"], published["api"]
    argv = ["push", "org/retrained", "--endpoint", hub.endpoint, "--token", "t", "-w", str(ws.root)]
    router = RouterModel.from_pretrained(published["router_dir"])

    def card() -> str:
        path = api.hf_hub_download("org/retrained", "README.md", cache_dir=tmp_path / "c")
        return Path(path).read_text()

    _route_all_to(router, 0).save_pretrained(published["router_dir"])
    first = certify_workspace(ws, progress=False, **SMALL_RUN)
    assert run(argv) == 0
    assert _card_table(first.path) in card() and _routes(card()) == ["100.0 %", "0.0 %"]

    _route_all_to(router, 1).save_pretrained(published["router_dir"])  # retrained
    capsys.readouterr()
    assert run(argv) == 1  # no certify run of the new router yet: refused, nothing pushed
    err = capsys.readouterr().err
    assert "no `router certify` run of this router" in err and "router certify -w" in err
    assert err.count("\n") == 1 and _routes(card()) == ["100.0 %", "0.0 %"]

    second = certify_workspace(ws, progress=False, **SMALL_RUN)
    assert run(argv) == 0
    assert _card_table(second.path) in card()
    assert _routes(card()) == ["0.0 %", "100.0 %"]  # low, high


def test_bad_repo_ids_fail_before_anything_is_written(hub, published, capsys):
    import rsrouter.cli.hub  # noqa: F401  (registers push and push-expert)
    from rsrouter.cli.app import run

    ws = published["ws"]
    bundle = ws.artifacts / "bundle"
    before = {p: p.stat().st_mtime_ns for p in bundle.rglob("*")}
    for bad in ("org/na me", "org//x", "org/x--y", "a/b/c", "org/" + "x" * 100):
        argv = ["push", bad, "--endpoint", hub.endpoint, "--token", "t", "-w", str(ws.root)]
        assert run(argv) == 1
        err = capsys.readouterr().err
        assert "is not a Hub repo id" in err and err.count("\n") == 1
        assert run(["push-expert", "low", bad, "-w", str(ws.root)]) == 1
        assert "is not a Hub repo id" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in bundle.rglob("*")} == before


def test_router_with_a_diffusion_denoiser_round_trips(hub, published, tmp_path):
    from diffusers import DDPMScheduler

    unet = tiny_unet(sample_size=28, seed=5)
    local = published["local"]
    router = RouterModel(
        arch="small_cnn", arch_args={"width": 4}, expert_names=list(SIGMAS),
        sigmas=list(SIGMAS.values()), fingerprints=[e.fingerprint for e in local.experts],
        in_chans=1, input_size=SHAPE[1:], sigma_e=0.5, unet=unet,
        scheduler=DDPMScheduler(num_train_timesteps=1000),
    ).eval()  # fmt: skip
    router.save_pretrained(tmp_path / "dn-router")
    bundle = make_bundle(tmp_path / "dn-router", tmp_path / "dn-bundle", published["pins"])
    push_bundle(bundle, "org/dn-router", endpoint=hub.endpoint, token="hf_test")
    files = published["api"].list_repo_files("org/dn-router")
    assert "denoiser/unet/diffusion_pytorch_model.safetensors" in files
    model = load_router("org/dn-router", endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
    assert model.router.denoiser is not None
    x = torch.rand(1, *SHAPE, generator=torch.Generator().manual_seed(2))
    small = {**CERTIFY, "n0": 4, "n": 16}  # the UNet is the slow part: few samples suffice
    again = DualSmoothed(router, 0.5, local.experts, rule="agreement").certify_batch(x, **small)
    assert [c.to_dict() for c in model.certify_batch(x, **small)] == [c.to_dict() for c in again]


def test_load_router_is_exported_lazily():
    import rsrouter

    assert rsrouter.load_router is load_router


def test_a_workspace_with_local_experts_is_published_with_its_experts(hub, tmp_path, capsys):
    import rsrouter.cli.hub  # noqa: F401  (registers push and push-expert)
    from helpers import fashion_workspace
    from rsrouter.cli.app import run

    ws = fashion_workspace(tmp_path)  # experts gauss-0.25 and gauss-0.5 from local folders
    hub_args = ["--endpoint", hub.endpoint, "--token", "t", "-w", str(ws.root)]
    toml = ws.path.read_text()
    assert run(["push", "org/r", "--push-experts", *hub_args]) == 1  # no certify run yet:
    assert "no `router certify` run of this router" in capsys.readouterr().err
    assert ws.path.read_text() == toml  # ... refused before any expert was published
    certify_workspace(ws, progress=False, **SMALL_RUN)
    assert run(["push", "org/r", *hub_args]) == 1
    err = capsys.readouterr().err
    assert "router push-expert gauss-0.25 ORG/REPO" in err and "--push-experts" in err
    assert run(["push-expert", "gauss-0.25", "org/low", *hub_args]) == 0
    assert "org/low at commit" in capsys.readouterr().out
    assert run(["push", "org/r", "--push-experts", *hub_args]) == 0  # publishes gauss-0.5 too
    entries = Workspace.open(ws.root).experts
    assert [e.source for e in entries] == ["org/low", "org/r-gauss-0.5"]
    assert all(len(e.commit) == 40 for e in entries)
    assert run(["push-expert", "gauss-0.25", "org/again", *hub_args]) == 1
    assert "already comes from the Hub" in capsys.readouterr().err
    pulled = load_router("org/r", endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
    local = DualSmoothed(
        RouterModel.from_pretrained(ws.artifacts / "router"), 0.5,
        list(ws.load_experts().values()), rule="agreement",
    )  # fmt: skip
    assert _certify(pulled) == _certify(local)


def test_pull_makes_a_workspace_that_certifies_like_the_original(hub, published, tmp_path, capsys):
    import rsrouter.cli.hub  # noqa: F401  (registers pull)
    from rsrouter.cli.app import run

    target = tmp_path / "pulled"
    argv = ["pull", "org/router", "-w", str(target), "--endpoint", hub.endpoint, "--token", "t",
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert f"next: `router certify -w {target.resolve()}`" in out
    ws = Workspace.open(target)
    assert ws.names == list(SIGMAS) and all(e.commit for e in ws.experts)
    assert RouterModel.from_pretrained(ws.artifacts / "router").fingerprint == (
        RouterModel.from_pretrained(published["router_dir"]).fingerprint
    )
    again = certify_workspace(ws, progress=False, **SMALL_RUN)
    assert again.path.name == published["run"].path.name  # the same router, data and settings
    assert _strip_seconds(again.records) == _strip_seconds(published["run"].records)
    assert run(argv) == 1  # never over an existing workspace
    assert "already exists: pull into a new folder" in capsys.readouterr().err


def _strip_seconds(records):
    """Records without their timings (the same counts decide everything else)."""

    def rules(r):
        return {k: {f: v for f, v in d.items() if f != "seconds"} for k, d in r["rules"].items()}

    return [
        {**{k: v for k, v in r.items() if k not in ("seconds", "baselines")}, "rules": rules(r)}
        for r in records
    ]
