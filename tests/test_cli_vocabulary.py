"""One vocabulary across the tools: every command-line parser the project ships (the package's
subcommands, export.build, each training and benchmark tool) is captured as its `main` builds it,
and the shared words are checked to mean the same thing everywhere: `--ffe` is FFE with
`--no-ffe`, on by default; `--quiet` turns progress off; `--seed`/`--seeds` take seeds in
[0, 2**63); `--config` is a model preset; `--no-progress` and the old `--steps`/`--model` of the
training tools are hidden, deprecated spellings, never documented flags."""
import argparse
import importlib

import pytest

from asd_deploy.cli import seed_arg
from asd_deploy.config import PRESETS

TOOLS = ["asd_deploy.cli", "export.build", "training.train", "training.vae", "training.tiny_decoder",
         "training.ablation", "training.coherence", "training.longvideo", "training.prompt_check", "training.toybench",
         "training.package", "benchmarks.latency", "benchmarks.serving", "benchmarks.ceiling",
         "benchmarks.eager_vs_diffusers", "benchmarks.gpu"]
# `--config` values that are not presets: the embedded model
CONFIG_WORDS = set(PRESETS) | {"default"}


class _Captured(Exception):
    pass


def _parsers(module: str, monkeypatch) -> list[argparse.ArgumentParser]:
    """The parser `module.main` builds, and its subcommands' parsers."""
    seen = []

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise _Captured

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    with pytest.raises(_Captured):
        importlib.import_module(module).main([])
    out, todo = [], list(seen)
    while todo:
        p = todo.pop()
        out.append(p)
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                todo.extend(a.choices.values())
    return out


def _options(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in p._actions for s in a.option_strings}


@pytest.mark.parametrize("module", TOOLS)
def test_shared_flags_mean_the_same_everywhere(module, monkeypatch):
    for p in _parsers(module, monkeypatch):
        opts = _options(p)
        where = f"{module} ({p.prog})"
        if "--ffe" in opts:
            a = opts["--ffe"]
            assert isinstance(a, argparse.BooleanOptionalAction) and a.default is True, \
                f"{where}: --ffe must be --ffe/--no-ffe, on by default"
        if "--ffe-steps" in opts:
            assert opts["--ffe-steps"].default == 4, where
        if "--quiet" in opts:
            a = opts["--quiet"]
            assert a.nargs == 0 and a.const is True and a.default is False, f"{where}: --quiet is a switch"
        for name in ("--seed", "--seeds"):
            if name in opts:
                assert opts[name].type is seed_arg, f"{where}: {name} must take seeds in [0, 2**63)"
        if "--config" in opts:
            a = opts["--config"]
            assert a.default is None or a.default in CONFIG_WORDS, f"{where}: --config {a.default!r} is no preset"
            assert not a.choices or set(a.choices) <= CONFIG_WORDS, where
        for hidden in ("--no-progress", "--model" if module == "training.vae" else None):
            if hidden in opts:
                assert opts[hidden].help == argparse.SUPPRESS, f"{where}: {hidden} is a deprecated spelling"
        if "--steps" in opts and module.startswith("training.") and module not in (
                "training.toybench", "training.prompt_check", "training.longvideo"):
            # a training run's length is --max-steps; --steps is denoising steps elsewhere
            assert opts["--steps"].help == argparse.SUPPRESS, f"{where}: --steps is not a run length"


def test_every_tool_has_a_parser(monkeypatch):
    """The list above is every tool: each builds at least one parser, and the package's CLI has
    its subcommands."""
    progs = [p.prog for p in _parsers("asd_deploy.cli", monkeypatch)]
    assert any(p.endswith("generate") for p in progs) and any(p.endswith("serve") for p in progs), progs
