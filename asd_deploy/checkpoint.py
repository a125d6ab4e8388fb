"""Checkpoint loading and key conversion.

Owns: reading weights in every format users bring (Wan / Self-Forcing / ASD torch files, plain
state dicts, safetensors, diffusers `WanTransformer3DModel` folders or state dicts), the
Wan <-> diffusers key mapping, strict validation against a config, a content hash for engine
manifests, and atomic saving. Does not own: the model definition (`model.py`).

Torch files are read with `weights_only=True`: a pickle that would run code is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import torch

from .config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked, with what was expected and found."""


# Wan name -> diffusers name, for the per-block and top-level pieces (weights and biases alike).
_TOP = {
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
    "patch_embedding": "patch_embedding",
}
_BLOCK = {
    "modulation": "scale_shift_table",
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "norm3": "norm2",  # the affine norm before cross-attention
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}


def _rename(key: str, top: dict, block: dict) -> str:
    m = re.fullmatch(r"blocks\.(\d+)\.(.+?)(\.weight|\.bias)?", key)
    if m:
        i, name, suffix = m.group(1), m.group(2), m.group(3) or ""
        if name in block:
            return f"blocks.{i}.{block[name]}{suffix}"
    else:
        name, _, suffix = key.rpartition(".")
        if name in top and suffix in ("weight", "bias"):
            return f"{top[name]}.{suffix}"
        if key in top:
            return top[key]
    raise CheckpointError(f"no mapping for key {key!r}")


def to_diffusers(state_dict: dict) -> dict:
    """Wan / Self-Forcing keys -> diffusers `WanTransformer3DModel` keys (tensors shared)."""
    return {_rename(k, _TOP, _BLOCK): v for k, v in state_dict.items()}


def from_diffusers(state_dict: dict) -> dict:
    """diffusers `WanTransformer3DModel` keys -> Wan / Self-Forcing keys (tensors shared)."""
    top = {v: k for k, v in _TOP.items()}
    block = {v: k for k, v in _BLOCK.items()}
    return {_rename(k, top, block): v for k, v in state_dict.items()}


def is_diffusers_state_dict(sd: dict) -> bool:
    return any(k.startswith("condition_embedder.") or k == "proj_out.weight" for k in sd)


# ---------------------------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------------------------


def sniff_format(path: Path) -> str:
    """"zip" (torch.save), "pickle" (legacy torch.save), "safetensors", "empty" or "unknown",
    from the first bytes, so a damaged or foreign file is named for what it is."""
    with open(path, "rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:  # pickle PROTO opcode
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return "safetensors"  # u64 header length, then the JSON header
    return "unknown"


_SAFE_MODULES = ("torch", "collections", "_codecs")  # what torch's weights_only unpickler may import


def _code_references(path: Path, kind: str, limit: int = 1 << 26) -> list[str]:
    """The globals (module.name) outside torch's own that the file's pickle would import, read
    with pickletools without running anything; [] for damage that merely fails to parse."""
    import pickletools
    import zipfile

    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(name) if name else b""
        else:
            with open(path, "rb") as f:
                data = f.read(limit)
    except (OSError, zipfile.BadZipFile, KeyError):
        return []
    found, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str):
                strings = (strings + [arg])[-2:]
            if op.name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) == 2:
                found.append(".".join(strings))
    except Exception:  # garbage after the last whole opcode: keep what was read
        pass
    return [g for g in found if g.split(".")[0] not in _SAFE_MODULES]


def _corrupt(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"cannot read {path}: {what}. Expected a whole .pt/.pth (torch.save) or .safetensors "
                           f"file or a diffusers WanTransformer3DModel folder; re-copy or re-save it")


def load_torch_file(path: Path):
    """A torch file read with `weights_only=True`; a damaged, foreign or code-carrying file raises
    `CheckpointError` saying which."""
    path = Path(path)
    kind = sniff_format(path)
    if kind == "empty":
        raise _corrupt(path, "the file is empty")
    if kind == "safetensors":
        return _read_safetensors(path)
    if kind == "unknown":
        raise _corrupt(path, "it is neither a torch file (zip or pickle) nor safetensors")
    try:  # only the zip format can be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except pickle.UnpicklingError as e:
        code = _code_references(path, kind)
        if code:
            raise CheckpointError(
                f"refused to load {path}: it is a pickle that needs more than tensors and plain "
                f"containers to load (it could run code: it names {code[:4]}). Re-save it as a plain state "
                f"dict or safetensors from a trusted environment") from None
        raise _corrupt(path, f"truncated or corrupt torch {kind} file ({str(e).splitlines()[0][:200]})") from None
    except Exception as e:  # EOFError, RuntimeError (bad zip), KeyError, IndexError, ...: damaged data
        first = (str(e).splitlines() or [""])[0][:200]
        raise _corrupt(path, f"truncated or corrupt torch {kind} file ({type(e).__name__}: {first})") from None


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError: truncated, oversized or malformed header
        raise _corrupt(path, f"not a whole safetensors file ({str(e).splitlines()[0][:200]})") from None


def _read_diffusers_folder(path: Path) -> dict:
    index = path / "diffusion_pytorch_model.safetensors.index.json"
    single = path / "diffusion_pytorch_model.safetensors"
    if single.exists():
        return _read_safetensors(single)
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise _corrupt(index, f"not a diffusers index ({type(e).__name__}: {e})") from None
        sd = {}
        for s in shards:
            sd.update(_read_safetensors(path / s))
        return sd
    found = sorted(p.name for p in path.iterdir())[:10]
    raise CheckpointError(f"{path} is a folder but holds no diffusers weights "
                          f"(diffusion_pytorch_model.safetensors or its .index.json); found {found}")


def unwrap_training_checkpoint(obj: dict, prefer: str = "generator_ema") -> dict:
    """Self-Forcing / ASD files hold `generator_ema`, `generator`, `critic`; keys carry `model.`."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"expected a dict of tensors or a training checkpoint; got {type(obj).__name__}")
    for key in (prefer, "generator_ema", "generator"):
        if key in obj and isinstance(obj[key], dict) and obj[key]:
            obj = obj[key]
            break
    else:
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        for prefix in ("model.", "_orig_mod.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def read_state_dict(path: str | os.PathLike, prefer: str = "generator_ema") -> dict:
    """Any supported format -> a state dict with Wan keys (not yet validated)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; expected a .pt/.pth/.safetensors "
                                f"file or a diffusers WanTransformer3DModel folder")
    if path.is_dir():
        sd = _read_diffusers_folder(path)
    elif path.suffix == ".safetensors":
        sd = _read_safetensors(path)
    else:
        sd = unwrap_training_checkpoint(load_torch_file(path), prefer)
    return from_diffusers(sd) if is_diffusers_state_dict(sd) else sd


def check_state_dict(state_dict: dict, config: ModelConfig) -> None:
    """Strict: raise listing missing, unexpected and wrong-shape keys against `config`."""
    from .model import CausalWanDiT

    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in CausalWanDiT(config).state_dict().items()}
    missing = sorted(set(want) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(want))
    wrong = sorted(f"{k}: expected {list(want[k])}, found {list(state_dict[k].shape)}"
                   for k in set(want) & set(state_dict) if tuple(state_dict[k].shape) != want[k])
    if missing or unexpected or wrong:
        def show(xs):
            return f"{len(xs)} " + (str(xs[:8]) + (" ..." if len(xs) > 8 else "") if xs else "")
        raise CheckpointError(
            f"checkpoint does not match config {config.name!r} (dim={config.dim}, "
            f"layers={config.num_layers}, heads={config.num_heads}):\n  missing: {show(missing)}\n"
            f"  unexpected: {show(unexpected)}\n  wrong shape: {show(wrong)}")


def load_checkpoint(path, config: ModelConfig, device="cpu", dtype=torch.float32, prefer="generator_ema"):
    """Build `CausalWanDiT(config)` on the meta device and assign the checkpoint's tensors."""
    from .model import CausalWanDiT

    sd = read_state_dict(path, prefer)
    check_state_dict(sd, config)
    check_weight_dtypes(sd, path)
    with torch.device("meta"):
        model = CausalWanDiT(config)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()},
                          strict=True, assign=True)
    check_finite(model.state_dict(), path)
    return model.eval()


def check_weight_dtypes(state_dict: dict, source="weights") -> None:
    """Weights must be floating point: an int or bool tensor cast to float is not a trained weight."""
    bad = sorted(f"{k} ({v.dtype})" for k, v in state_dict.items() if not v.is_floating_point())
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} tensors are not floating point: {bad[:6]}"
                              f"{' ...' if len(bad) > 6 else ''}; expected fp32/fp16/bf16 weights")


def check_finite(tensors: dict, source="weights") -> None:
    """Raise naming the tensors that hold NaN or Inf. One flag per tensor stays on its device
    and the host reads them once (one sync, not one per tensor)."""
    names = [k for k, v in tensors.items() if v.is_floating_point() and v.numel()]
    if not names:
        return
    flags = torch.stack([torch.isfinite(tensors[k]).all().to(tensors[names[0]].device) for k in names]).cpu()
    if not bool(flags.all()):
        bad = [k for k, ok in zip(names, flags.tolist()) if not ok]
        raise CheckpointError(f"{source}: {len(bad)} tensors hold NaN or Inf: {bad[:6]}"
                              f"{' ...' if len(bad) > 6 else ''}; the checkpoint is damaged or its training "
                              f"diverged (it would give a blank video)")


def state_dict_hash(state_dict: dict) -> str:
    """sha256 over sorted keys, dtypes, shapes and bytes: the weights' identity in manifests."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()



def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask is process-wide and not thread-safe


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call `write(tmp_path)`, then rename onto `path`: a crash never leaves a file that loads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temp name keeps the suffix: writers such as ffmpeg pick the format from it
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a finished file gets the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_dir(path: str | os.PathLike, fill) -> Path:
    """Call `fill(tmp_dir)` on a new empty folder beside `path`, then put it in place of `path`. A
    folder under the final name is always whole; an old one is replaced only after `fill` succeeds,
    and a failing `fill` (say, a size check raising) leaves the old one as it was."""
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        fill(tmp)
        if dst.exists():  # a directory cannot be os.replace'd over a non-empty one
            dst.rename(old)
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return dst


def save_checkpoint(path, generator: dict, critic: dict | None = None, generator_ema: dict | None = None,
                    extra: dict | None = None) -> Path:
    """Self-Forcing format: top-level generator / critic / generator_ema, keys with `model.`."""
    def pref(sd):
        return {f"model.{k}": v.detach().cpu() for k, v in sd.items()} if sd is not None else None
    obj = {"generator": pref(generator)}
    if critic is not None:
        obj["critic"] = pref(critic)
    if generator_ema is not None:
        obj["generator_ema"] = pref(generator_ema)
    if extra:
        obj.update(extra)
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def diffusers_kwargs(config: ModelConfig) -> dict:
    """`WanTransformer3DModel` constructor arguments equal to `config` (text-to-video)."""
    return dict(patch_size=config.patch_size, num_attention_heads=config.num_heads,
                attention_head_dim=config.head_dim, in_channels=config.in_channels,
                out_channels=config.out_channels, text_dim=config.text_dim, freq_dim=config.freq_dim,
                ffn_dim=config.ffn_dim, num_layers=config.num_layers, cross_attn_norm=config.cross_attn_norm,
                qk_norm="rms_norm_across_heads" if config.qk_norm else None, eps=config.eps)


def to_diffusers_model(model):
    """diffusers' bidirectional `WanTransformer3DModel` with the same weights (an independent reference)."""
    from diffusers import WanTransformer3DModel

    ref = WanTransformer3DModel(**diffusers_kwargs(model.config))
    ref.load_state_dict(to_diffusers(model.state_dict()), strict=True)
    p = next(model.parameters())
    return (ref if p.dtype == torch.float32 else ref.to(dtype=p.dtype)).to(p.device).eval()
