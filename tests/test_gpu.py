"""What runs on CUDA: the fused counting kernel (the same counts as the torch path, bit for bit) and the
chunked loss in bfloat16. The ``gpu`` tests run only where CUDA is; CPU CI checks that nothing here is
imported without it, and runs the kernel itself in Triton's interpreter when Triton is installed."""

import importlib.util
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from neuronreg.lape import counting, kernels
from neuronreg.lape.counting import count_activations, positive_counts
from neuronreg.models import find_mlp_sites

from support.tiny import ARCHS, tiny_model

CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def awkward(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random activations with NaNs of both signs, +-0.0, +-inf and positive and negative denormals."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g).to(dtype)
    tiny = torch.finfo(dtype).tiny
    specials = torch.tensor([float("nan"), -float("nan"), 0.0, -0.0, float("inf"), -float("inf"),
                             tiny / 2, -tiny / 2, tiny / 64, tiny], dtype=torch.float32).to(dtype)
    flat = x.view(-1)
    where = torch.randint(0, flat.numel(), (max(1, flat.numel() // 5),), generator=g)
    flat[where] = specials[torch.randint(0, len(specials), (where.numel(),), generator=g)]
    flat[: len(specials)] = specials[: min(len(specials), flat.numel())]  # every special at least once
    return x


SHAPES = [(1, 1), (3, 5), (31, 129), (64, 128), (257, 300), (4096, 1000)]


def torch_path_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation sums of the torch path, on CPU."""
    sums = torch.zeros(x.shape[1], dtype=torch.float64), torch.zeros(x.shape[1], dtype=torch.float64)
    counting.add_activation_sums(x.cpu(), *sums)
    return sums


def exact_sums(x: torch.Tensor) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per column: the sums of the activations and of the positive ones, each correctly rounded from the
    exact real sum (math.fsum), and the sums of their magnitudes. NaN counts 0 and +-inf the largest
    finite value, as torch.nan_to_num maps them."""
    values = torch.nan_to_num(x.cpu()).double().T.tolist()
    total = [math.fsum(column) for column in values]
    positive = [math.fsum(v for v in column if v > 0) for column in values]
    return total, positive, [math.fsum(abs(v) for v in column) for column in values], \
        [math.fsum(v for v in column if v > 0) for column in values]


# kernels' docstring: |kernel sum - float64 sum| <= 2**-19 * sum |x| + rows * 2**-143 (2**-119 where the
# hardware flushes denormals); the sums here start from ``base``, whose addition rounds once more.
RELATIVE_BOUND = 2.0 ** -19


def sums_within_bound(got: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, base: float = 0.0,
                      per_row: float = 2.0 ** -143) -> bool:
    """The fused sums against the exact sums and against the torch path's float64 sums, within the bound
    the kernel module states."""
    total, positive, magnitude, positive_magnitude = exact_sums(x)
    rows = x.shape[0]
    ok = True
    for sums, exact, scale in ((got[0], total, magnitude), (got[1], positive, positive_magnitude)):
        sums = sums.cpu().double() - base
        exact, scale = torch.tensor(exact, dtype=torch.float64), torch.tensor(scale, dtype=torch.float64)
        bound = RELATIVE_BOUND * scale + rows * per_row + 2.0 ** -52 * (exact.abs() + abs(base))
        ok &= bool(torch.all((sums - exact).abs() <= bound))
    for sums, want, scale in zip(got, torch_path_sums(x), (magnitude, positive_magnitude), strict=True):
        scale = torch.tensor(scale, dtype=torch.float64)
        bound = RELATIVE_BOUND * scale + rows * per_row + 2.0 ** -52 * (want.abs() + abs(base))
        ok &= bool(torch.all((sums.cpu() - base - want).abs() <= bound))
    return ok


def lopsided(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Columns a float32 sum of 32 rows gets wrong by close to the bound, beside huge and tiny values.

    Column 0: 1.0 every 128 rows, 2**-24 elsewhere: in float32 every 1 + 2**-24 rounds back to 1 (a tie,
    to even), so the tile that starts with 1.0 loses 31 * 2**-24, 1.85e-6 of the magnitude, just under
    2**-19; a float32 sum over more than one tile would lose up to 127 * 2**-24 (beyond the bound). Column 1: the
    dtype's largest value with both signs and small values (the small ones vanish beside it in any
    float sum). Column 2: +-2**100 cancelling, and 1.0: exact in float64 and in scaled float32 tiles.
    Column 3: values just above float32's denormals and denormals themselves (bfloat16/float32), which
    the tile scaling rounds. The rest: random of mixed magnitude (2**-60 .. 2**60).
    """
    g = torch.Generator().manual_seed(seed)
    info = torch.finfo(dtype)
    x = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x *= torch.exp2(torch.randint(-60, 61, (rows, cols), generator=g).double()).clamp(max=info.max / 4)
    x = x.clamp(-info.max, info.max)
    if cols > 0:
        x[:, 0] = 2.0 ** -24
        x[::128, 0] = 1.0
    if cols > 1:
        x[:, 1] = torch.where(torch.arange(rows) % 2 == 0, 3.0, -0.25).double()
        x[::3, 1] = info.max
        x[1::5, 1] = -info.max
    if cols > 2:
        x[:, 2] = 1.0
        big = min(2.0 ** 100, info.max / 2)
        x[: rows - rows % 2, 2] = torch.tensor([big, -big], dtype=torch.float64).repeat(rows // 2)
    if cols > 3:
        x[:, 3] = info.tiny * (1 + torch.arange(rows, dtype=torch.float64) % 7) / 3
    return x.to(dtype)


def test_the_kernel_module_imports_without_triton_or_cuda():
    code = "import sys, neuronreg.lape.counting, neuronreg.lape.kernels; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert not kernels.fused_counting_enabled(torch.zeros(2, 2))  # a CPU tensor: the torch path


def test_the_special_values_are_what_the_torch_path_counts_on_cpu():
    for dtype in DTYPES:
        x = awkward(64, 40, dtype)
        assert torch.equal(positive_counts(x), (x > 0).sum(0))
        # nan, -nan, 0.0, -0.0, inf, -inf, denormal, -denormal, smaller denormal, smallest normal
        assert (x.view(-1)[:10] > 0).tolist() == [False, False, False, False, True, False, True, False, True, True]
        assert x.view(-1)[8] != 0 and x.view(-1)[8].abs() < torch.finfo(dtype).tiny  # really a denormal


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_the_kernel_counts_like_the_torch_path_in_tritons_interpreter():
    """The very kernel, run on CPU tensors by Triton's interpreter (TRITON_INTERPRET=1)."""
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, sys.argv[1])
        from test_gpu import SHAPES, DTYPES, awkward, lopsided, sums_within_bound, exact_sums
        from neuronreg.lape import kernels
        from neuronreg.lape.kernels import add_positive_counts
        from neuronreg.lape.counting import positive_counts
        for dtype in DTYPES:
            for rows, cols in SHAPES[:-1] + [(100, 6)]:
                for x in (awkward(rows, cols, dtype), lopsided(rows, cols, dtype)):
                    into = torch.full((cols,), 7, dtype=torch.int64)
                    add_positive_counts(x, into)
                    assert torch.equal(into, positive_counts(x) + 7), (dtype, rows, cols)
                    sums = (torch.full((cols,), 0.5, dtype=torch.float64),
                            torch.full((cols,), 0.5, dtype=torch.float64))
                    into = torch.zeros(cols, dtype=torch.int64)
                    add_positive_counts(x, into, sums)
                    assert torch.equal(into, positive_counts(x)), (dtype, rows, cols)
                    assert sums_within_bound(sums, x, base=0.5), (dtype, rows, cols)
            x = awkward(50, 90, dtype)[:, ::3]  # not contiguous
            into = torch.zeros(30, dtype=torch.int64)
            add_positive_counts(x, into)
            assert torch.equal(into, positive_counts(x.contiguous()))
        # The tiles really are float32: column 0 of lopsided() loses the 31 terms 2**-24 of each tile that
        # starts with 1.0, where a float64 sum keeps them; the float64 kernel (FLOAT32_BLOCKS = False) too.
        x = lopsided(256, 4, torch.float32)
        for blocks32, lost in ((True, 2 * 31 * 2.0 ** -24), (False, 0.0)):
            kernels.FLOAT32_BLOCKS = blocks32
            sums = (torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
            add_positive_counts(x, torch.zeros(4, dtype=torch.int64), sums)
            exact = exact_sums(x)[0][0]
            assert exact == 2 + 254 * 2.0 ** -24
            assert abs((exact - float(sums[0][0])) - lost) <= 2.0 ** -50, (blocks32, exact - float(sums[0][0]))
            assert sums_within_bound(sums, x)
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


# -- on a GPU ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_the_fused_kernel_equals_the_torch_path_bit_for_bit(dtype, shape):
    assert kernels.triton_available(), "Triton is needed on CUDA machines (it comes with torch's CUDA wheels)"
    x = awkward(*shape, dtype).cuda()
    into = torch.full((shape[1],), 5, dtype=torch.int64, device="cuda")
    kernels.add_positive_counts(x, into)
    torch_path = positive_counts(x)  # the four-pass torch path, on the GPU
    assert torch.equal(into.cpu(), torch_path.cpu() + 5)
    assert torch.equal(into.cpu(), positive_counts(x.cpu()) + 5)  # and the CPU path
    assert torch.equal(into.cpu(), (x.cpu() > 0).sum(0) + 5)
    strided = x[:, ::2]
    into = torch.zeros(strided.shape[1], dtype=torch.int64, device="cuda")
    kernels.add_positive_counts(strided, into)
    assert torch.equal(into, positive_counts(strided))
    sums = tuple(torch.zeros(strided.shape[1], dtype=torch.float64, device="cuda") for _ in range(2))
    into.zero_()
    kernels.add_positive_counts(strided, into, sums)  # with the activation sums, in the same read
    assert torch.equal(into, positive_counts(strided))
    assert sums_within_bound(sums, strided, per_row=2.0 ** -119)
    if torch.cuda.device_count() > 1:  # counts that live on another GPU (a model split by device_map)
        into = torch.zeros(shape[1], dtype=torch.int64, device="cuda:1")
        kernels.add_positive_counts(x, into)
        assert torch.equal(into.cpu(), torch_path.cpu())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_the_kernel_handles_more_rows_than_a_float32_sum_counts_exactly():
    x = torch.ones((1 << 24) + 3, 2, dtype=torch.bfloat16, device="cuda")
    into = torch.zeros(2, dtype=torch.int64, device="cuda")
    kernels.add_positive_counts(x, into)
    assert into.tolist() == [(1 << 24) + 3] * 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_counting_a_tiny_model_on_cuda_gives_the_same_counts_fused_or_not(arch, dtype, monkeypatch):
    model = tiny_model(arch).to("cuda", dtype)
    sites = find_mlp_sites(model)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 80, (50,), generator=g) for _ in range(6)] + [torch.randint(3, 80, (17,), generator=g)]
    calls = []
    real = kernels.add_positive_counts
    monkeypatch.setattr(kernels, "add_positive_counts", lambda *args: (calls.append(1), real(*args)))
    fused = count_activations(model, sites, rows, batch_size=4, device="cuda")
    assert len(calls) == 3 * len(sites)  # 3 batches (4 rows, 2 rows, the short row alone), every layer
    monkeypatch.setenv(kernels.ENV, "0")
    torch_path = count_activations(model, sites, rows, batch_size=4, device="cuda")
    assert len(calls) == 3 * len(sites)
    assert fused.tokens == torch_path.tokens == 6 * 50 + 17
    assert torch.equal(fused.over_zero, torch_path.over_zero)
    # The statistics, fused into the same read, within the kernel's bound: 2**-19 of the magnitudes summed
    # (sum |x| = 2 * positive sum - sum), per batch and layer, so in total too.
    magnitude = 2 * torch_path.positive_sum - torch_path.activation_sum
    positive_magnitude = torch_path.positive_sum
    for name, scale in (("activation_sum", magnitude), ("positive_sum", positive_magnitude)):
        got, want = getattr(fused, name), getattr(torch_path, name)
        bound = RELATIVE_BOUND * scale * (1 + 1e-9) + fused.tokens * 2.0 ** -119 + 1e-15 * want.abs()
        assert got.dtype == torch.float64 and torch.all((got - want).abs() <= bound), name
    assert not counting._FUSED_FAILED


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_the_chunked_loss_in_bfloat16_on_cuda_matches_and_saves_memory():
    from transformers import LlamaConfig, LlamaForCausalLM

    from neuronreg.evaluation.heldout import chunked_token_nll, token_nll
    from neuronreg.finetune.deltas import attach_deltas

    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    ids = torch.randint(0, 32000, (1, 4096), device="cuda")
    results = []
    for chunked in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
        layers = attach_deltas(model, [torch.arange(0, 512, 7), torch.arange(3, 512, 5)])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        if chunked:
            loss, _ = chunked_token_nll(model, ids)
        else:
            loss, _ = token_nll(model, ids, chunked=False)
        loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        results.append((float(loss), [p.grad.float() for layer in layers for p in layer.parameters()], peak))
    (plain, g_plain, peak_plain), (chunk, g_chunk, peak_chunk) = results
    assert chunk == pytest.approx(plain, rel=1e-3)
    for a, b in zip(g_chunk, g_plain):  # bfloat16 logits rounded in other GEMM tiles: compare as vectors
        assert float((a - b).norm() / b.norm()) < 2e-2
    # 4096 x 32000 logits: 250 MiB in bf16, then 500 MiB float32 and its gradient in the plain loss.
    assert peak_chunk < peak_plain / 2, (peak_chunk, peak_plain)


@pytest.mark.slow
def test_the_gpu_benchmark_runs_its_code_paths_in_small_mode(tmp_path):
    """scripts/bench_gpu.py --small: every counting mode, fine-tuning method and checkpointing mode, the 4-bit
    base (when bitsandbytes is installed) and two gloo processes of the multi-GPU section, on a tiny config."""
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.py"
    out = tmp_path / "bench.json"
    args = ["--small", "--device", "cpu", "--rounds", "1", "--count-batches", "1", "--seqs", "32", "--warmup", "1",
            "--steps", "1", "--ddp-world", "2", "--json", str(out)]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    counting_result = result["counting"]
    assert set(counting_result["modes"]) == {"forward", "body", "body+gt0", "torch-path", "fused", "fused-f64",
                                             "fused-counts"}
    assert counting_result["fused_equals_torch_path"] is True
    assert counting_result["fused_sums_within_bound"] is True and counting_result["fused_f64_sums_agree"] is True
    rows = result["finetune"]
    assert len(rows) == 5 * 2 + 3 and all(row["status"] == "ok" for row in rows)
    def kind(label: str) -> str:  # a budget's label is its GiB: 0.000137G
        return "budget" if label.endswith("G") else label

    modes = {kind(row["checkpointing"]): row.get("layer_modes") for row in rows if row["method"] == "neuronreg"}
    assert modes == {"no": None, "hf": None, "full": "ff", "mlp": "mm", "budget": "fn"}
    nf4 = result["nf4"]
    if importlib.util.find_spec("bitsandbytes") is None:
        assert nf4["status"] == "bitsandbytes is not installed"
    else:
        assert nf4["status"] == "ok" and [row["status"] for row in nf4["rows"]] == ["ok"] * 3
        assert nf4["modules"] == 2 * 7 and nf4["bytes_after"] < nf4["bytes_before"] / 3
    assert {mode: row["status"] for mode, row in result["fast_counting"].items()} == {
        "graphs-counts": "needs CUDA", "graphs": "needs CUDA", "compile-gt0": "off (--compile)",
        "compile": "off (--compile)"}
    ddp = result["ddp"]
    assert ddp["status"] == "ok" and ddp["world"] == 2 and ddp["counts_equal_one_process"] is True
    assert [row["status"] for row in ddp["finetune"]] == ["ok", "ok"]
    assert "vs forward" in done.stdout and "neuronreg-plain" in done.stdout and "Issue 24's targets" in done.stdout
