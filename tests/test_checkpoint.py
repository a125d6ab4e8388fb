import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from asd_deploy.checkpoint import (CheckpointError, from_diffusers, load_checkpoint, read_state_dict,
                                   save_checkpoint, state_dict_hash, to_diffusers, to_diffusers_model)
from asd_deploy.model import build_model

from conftest import ODD


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_self_forcing_format_loads_identical_weights(tmp_path, tiny_cfg, tiny_model):
    other = build_model(tiny_cfg, seed=5)
    path = save_checkpoint(tmp_path / "sf.pt", generator=other.state_dict(), critic=other.state_dict(),
                           generator_ema=tiny_model.state_dict())
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"generator", "critic", "generator_ema"}
    assert all(k.startswith("model.") for k in raw["generator"])
    _same_weights(load_checkpoint(path, tiny_cfg), tiny_model)          # generator_ema preferred
    _same_weights(load_checkpoint(path, tiny_cfg, prefer="generator"), other)
    no_ema = save_checkpoint(tmp_path / "g.pt", generator=other.state_dict())
    _same_weights(load_checkpoint(no_ema, tiny_cfg), other)


def test_plain_safetensors_and_diffusers_formats(tmp_path, tiny_cfg, tiny_model):
    torch.save(tiny_model.state_dict(), tmp_path / "plain.pth")
    _same_weights(load_checkpoint(tmp_path / "plain.pth", tiny_cfg), tiny_model)
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, tmp_path / "w.safetensors")
    _same_weights(load_checkpoint(tmp_path / "w.safetensors", tiny_cfg), tiny_model)
    to_diffusers_model(tiny_model).save_pretrained(tmp_path / "diffusers")
    _same_weights(load_checkpoint(tmp_path / "diffusers", tiny_cfg), tiny_model)
    torch.save(to_diffusers(tiny_model.state_dict()), tmp_path / "diffusers_sd.pt")
    _same_weights(load_checkpoint(tmp_path / "diffusers_sd.pt", tiny_cfg), tiny_model)


def test_diffusers_conversion_is_a_bijection(tiny_model):
    sd = tiny_model.state_dict()
    d = to_diffusers(sd)
    assert "condition_embedder.time_proj.weight" in d and "blocks.0.attn2.to_out.0.bias" in d
    assert "blocks.0.norm2.weight" in d and "blocks.0.scale_shift_table" in d and "scale_shift_table" in d
    back = from_diffusers(d)
    assert back.keys() == sd.keys() and all(back[k] is sd[k] for k in sd)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/asd_deploy_pwned",))


def test_malicious_pickle_is_refused(tmp_path, tiny_cfg):
    if os.path.exists("/tmp/asd_deploy_pwned"):
        os.unlink("/tmp/asd_deploy_pwned")
    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump({"generator": _Evil()}, f)
    torch.save({"generator_ema": {"x": _Evil()}}, tmp_path / "evil_zip.pt")
    for p in (bad, tmp_path / "evil_zip.pt"):
        with pytest.raises(CheckpointError, match="refused to load"):
            load_checkpoint(p, tiny_cfg)
    assert not os.path.exists("/tmp/asd_deploy_pwned")


def test_strict_mismatch_lists_keys(tmp_path, tiny_cfg, tiny_model):
    sd = dict(tiny_model.state_dict())
    sd.pop("head.modulation")
    sd["extra.weight"] = torch.zeros(1)
    sd["blocks.0.ffn.0.weight"] = torch.zeros(3, 3)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "bad.pt", tiny_cfg)
    msg = str(e.value)
    assert "missing: 1 ['head.modulation']" in msg and "unexpected: 1 ['extra.weight']" in msg
    assert "blocks.0.ffn.0.weight: expected [160, 64], found [3, 3]" in msg
    with pytest.raises(CheckpointError, match="does not match config 'odd'"):
        load_checkpoint(tmp_path / "bad.pt", ODD)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pt")


def test_hash_tracks_content(tiny_cfg, tiny_model):
    sd = tiny_model.state_dict()
    h = state_dict_hash(sd)
    assert h == state_dict_hash({k: v.clone() for k, v in sd.items()})
    changed = dict(sd)
    changed["head.head.bias"] = sd["head.head.bias"] + 1e-3
    assert state_dict_hash(changed) != h


def test_atomic_write_leaves_nothing_on_interrupt(tmp_path):
    from asd_deploy.checkpoint import atomic_write

    def half_then_crash(tmp):
        open(tmp, "wb").write(b"half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "w.pt", half_then_crash)
    assert list(tmp_path.iterdir()) == []
    p = atomic_write(tmp_path / "w.pt", lambda tmp: torch.save({"a": torch.ones(1)}, tmp))
    assert (p.stat().st_mode & 0o777) == 0o666 & ~_umask() and list(tmp_path.iterdir()) == [p]


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def _corrupt_files(tmp_path, tiny_model):
    """Every way a checkpoint file can be damaged or foreign, each with what its message must say."""
    good = tmp_path / "good.pt"
    torch.save(tiny_model.state_dict(), good)
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, tmp_path / "good.safetensors")
    st = (tmp_path / "good.safetensors").read_bytes()
    legacy = tmp_path / "legacy.pt"
    torch.save(tiny_model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    files = {
        "empty.pt": (b"", "is empty"),
        "text.pt": (b"model weights go here\n", "neither a torch file"),
        "random.pt": (bytes(range(7, 256)) * 40, "neither a torch file"),
        "truncated.pt": (good.read_bytes()[: good.stat().st_size // 2], "truncated or corrupt torch zip"),
        "truncated_legacy.pt": (legacy.read_bytes()[: legacy.stat().st_size // 2], "truncated or corrupt torch pickle"),
        "truncated.safetensors": (st[: len(st) // 2], "not a whole safetensors file"),
        "oversized_header.safetensors": ((2 ** 62).to_bytes(8, "little") + b"{}", "not a whole safetensors file"),
        "random.safetensors": (bytes(range(256)) * 8, "not a whole safetensors file"),
    }
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    return {tmp_path / n: needle for n, (_, needle) in files.items()}


def test_damaged_files_are_named_for_what_they_are(tmp_path, tiny_cfg, tiny_model):
    """No EOFError / IndexError / KeyError / SafetensorError escapes, and damage is never called
    an unsafe pickle (that message is kept for files that really carry code)."""
    for path, needle in _corrupt_files(tmp_path, tiny_model).items():
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path, tiny_cfg)
        assert needle in str(e.value) and "refused" not in str(e.value), (path.name, str(e.value))
    (tmp_path / "renamed.pt").write_bytes((tmp_path / "good.safetensors").read_bytes())  # safetensors named .pt
    _same_weights(load_checkpoint(tmp_path / "renamed.pt", tiny_cfg), tiny_model)


def test_non_finite_and_non_float_weights_are_refused(tmp_path, tiny_cfg, tiny_model):
    sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    sd["blocks.1.ffn.2.weight"][3, 4] = float("nan")
    sd["head.head.bias"][0] = float("inf")
    torch.save(sd, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError,
                       match=r"2 tensors hold NaN or Inf: \['blocks.1.ffn.2.weight', 'head.head.bias'\]"):
        load_checkpoint(tmp_path / "nan.pt", tiny_cfg)
    ints = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    ints["head.head.weight"] = (ints["head.head.weight"] * 100).to(torch.int32)
    ints["blocks.0.norm3.bias"] = ints["blocks.0.norm3.bias"] > 0
    torch.save(ints, tmp_path / "ints.pt")
    with pytest.raises(CheckpointError, match="2 tensors are not floating point") as e:
        load_checkpoint(tmp_path / "ints.pt", tiny_cfg)
    assert "torch.int32" in str(e.value) and "torch.bool" in str(e.value)
