"""formats/bnb_blocks.py against bitsandbytes' own quantize_4bit: the same bytes, tensor by tensor."""

from __future__ import annotations

import pytest
import torch

bnbf = pytest.importorskip("bitsandbytes.functional")

from loadgraph.formats import bnb_blocks


def _state_bytes(packed: torch.Tensor, state) -> dict[str, bytes]:
    out = {"packed": packed.contiguous().view(torch.uint8).numpy().tobytes()}
    for key, value in state.as_dict(packed=True).items():
        out[key] = value.contiguous().view(torch.uint8).numpy().tobytes()
    return out


def _weight(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rows * 31 + cols)
    weight = torch.randn(rows, cols, generator=generator) * 0.02
    weight[0, :64] = 0.0  # an all-zero block: absmax clamped, not a division by zero
    weight[-1, -1] = 3.0  # an outlier that sets its block's absmax
    return weight.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_same_bytes_as_bitsandbytes(monkeypatch, dtype, quant_type, double_quant):
    # Small groups, so these tensors cross several group boundaries, one group partial.
    monkeypatch.setattr(bnb_blocks, "GROUP_ELEMENTS", 64 * 7)
    for rows, cols in [(48, 128), (5, 64), (33, 192)]:
        weight = _weight(rows, cols, dtype)
        assert bnb_blocks.reproduces(weight, 64, quant_type)
        ours = bnb_blocks.quantize_4bit(weight, 64, double_quant, quant_type, torch.uint8)
        theirs = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type=quant_type,
                                    quant_storage=torch.uint8)
        assert _state_bytes(*ours) == _state_bytes(*theirs), (rows, cols)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_quant_storage_and_blocksize(storage):
    weight = _weight(64, 256, torch.bfloat16)
    for blocksize in (32, 128, 4096):
        ours = bnb_blocks.quantize_4bit(weight, blocksize, True, "nf4", storage)
        theirs = bnbf.quantize_4bit(weight, blocksize=blocksize, compress_statistics=True, quant_type="nf4",
                                    quant_storage=storage)
        assert ours[0].dtype == theirs[0].dtype == storage
        assert ours[0].shape == theirs[0].shape
        assert _state_bytes(*ours) == _state_bytes(*theirs), blocksize


def test_partial_blocks_and_bad_input_go_to_bitsandbytes():
    odd = _weight(3, 50, torch.bfloat16)  # 150 elements: a partial block of 22
    assert not bnb_blocks.reproduces(odd, 64, "nf4")
    ours = bnb_blocks.quantize_4bit(odd, 64, True, "nf4", torch.uint8)
    theirs = bnbf.quantize_4bit(odd, blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8)
    assert _state_bytes(*ours) == _state_bytes(*theirs)
    with pytest.raises(ValueError, match="blocksize"):
        bnb_blocks.quantize_4bit(_weight(4, 64, torch.bfloat16), 48, False, "nf4", torch.uint8)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_code_index_is_bucketize(quant_type):
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    bounds = _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))[0]
    table = bnb_blocks._cell_table(quant_type)
    assert table is not None
    cells = table[0]
    # Every bound and cell edge, and the floats a few ulps either side of each, plus a sweep.
    anchors = torch.cat([bounds, torch.arange(2 * cells + 1, dtype=torch.float32) / cells - 1,
                         torch.tensor([-1.0, -0.0, 0.0, 1.0])])
    near = [anchors]
    up, down = anchors.clone(), anchors.clone()
    for _ in range(6):
        up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-2.0))
        near += [up, down]
    generator = torch.Generator().manual_seed(7)
    values = torch.cat(near + [torch.rand(2_000_000, generator=generator) * 2 - 1]).clamp(-1, 1)
    ours = bnb_blocks._code_index(values, bounds, quant_type, True)
    assert torch.equal(ours.int(), torch.bucketize(values, bounds, out_int32=True))


def test_blocks_with_nan_or_infinity():
    weight = _weight(8, 128, torch.float32)
    weight[1, 3] = float("nan")
    weight[5, 70] = float("inf")
    ours = bnb_blocks.quantize_4bit(weight, 64, False, "nf4", torch.uint8)
    theirs = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4", quant_storage=torch.uint8)
    assert _state_bytes(*ours) == _state_bytes(*theirs)


def test_torch_mean_at_a_stated_thread_count():
    generator = torch.Generator().manual_seed(3)
    before = torch.get_num_threads()
    try:
        for n in (1000, 32768, 100_000, 262_144, 12_345 * 7):
            x = torch.rand(n, generator=generator) * 0.05
            for threads in (1, 2, 3, 4, 8, 16):
                torch.set_num_threads(threads)
                theirs = x.mean()
                torch.set_num_threads(1 if threads > 1 else 2)  # ours runs at another count
                ours = bnb_blocks.torch_mean(x, threads)
                assert ours.item() == theirs.item(), (n, threads)
                assert torch.get_num_threads() == (1 if threads > 1 else 2)  # put back
    finally:
        torch.set_num_threads(before)


def test_double_quant_offset_follows_the_stated_threads_not_this_process():
    weight = _weight(512, 1024, torch.bfloat16)  # 8192 blocks... and a 2-D weight of 512 Ki
    weight = torch.cat([weight] * 8)  # 65536 blocks: the absmax mean is split across threads
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            theirs = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8)
            torch.set_num_threads(3)
            ours = bnb_blocks.quantize_4bit(weight, 64, True, "nf4", torch.uint8, offset_threads=threads)
            assert _state_bytes(*ours) == _state_bytes(*theirs), threads
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("env,prefix", [({}, []), ({"OMP_NUM_THREADS": "1"}, []), ({"OMP_NUM_THREADS": "64"}, []),
                                        ({"OMP_NUM_THREADS": "64", "MKL_NUM_THREADS": "1"}, []), ({}, ["taskset", "-c", "0"])])
def test_default_threads_told_without_torch_are_torch_s(env, prefix):
    import shutil

    import os
    import subprocess
    import sys

    from loadgraph.stages.quantize import torch_default_threads

    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")} | env
    script = "import sys, torch; from loadgraph.stages.quantize import torch_default_threads; " \
             "assert 'torch' in sys.modules; print(torch.get_num_threads(), torch_default_threads())"
    if prefix and shutil.which(prefix[0]) is None:
        pytest.skip(f"no {prefix[0]} here")
    torch_says, we_say = subprocess.run([*prefix, sys.executable, "-c", script], env=clean, capture_output=True, text=True, check=True).stdout.split()
    assert torch_says == we_say
    assert torch_default_threads() >= 1
