"""The Triton kernels compiled for an H200 (sm_90) on the CPU, every variant the layers launch.

Triton's interpreter (the other kernel tests) runs the Python, not the compiler: a kernel whose two constexpr
branches give one name two shapes runs there and fails to compile on the GPU (the joint down kernel did, costing
a device call). Compiling to a cubin needs no GPU: Triton ships its own ptxas.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

H200 = GPUTarget("cuda", 90, 32)


def compile_for_h200(fn, signature: dict[str, str], constexprs: dict, warps: int) -> None:
    kernel = triton.compile(
        ASTSource(fn=fn, signature={**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs=constexprs),
        target=H200,
        options={"num_warps": warps},
    )
    assert kernel.asm["cubin"], fn.__name__


@pytest.mark.parametrize("joint", [False, True])
def test_the_expert_gemv_kernels_compile(joint):
    from shards.expert_gemv import DOWN_TILE, GATE_UP_TILE, _down_kernel, _gate_up_kernel

    rows, cols, warps = GATE_UP_TILE
    compile_for_h200(
        _gate_up_kernel,
        {"x_ptr": "*bf16", "w13_ptr": "*bf16", "slot_ptr": "*i64", "act_ptr": "*bf16", "dim": "i32", "hidden": "i32",
         "n_local": "i32"},
        {"K": 2, "ROWS": rows, "COLS": cols},
        warps,
    )  # fmt: skip
    rows, cols, warps = DOWN_TILE
    compile_for_h200(
        _down_kernel,
        {"act_ptr": "*bf16", "w2_ptr": "*bf16", "slot_ptr": "*i64", "weight_ptr": "*bf16", "out_ptr": "*bf16",
         "dim": "i32", "hidden": "i32", "n_local": "i32"},
        {"K": 2, "ROWS": rows, "COLS": cols, "JOINT": joint, "K_PAD": 2},
        warps,
    )  # fmt: skip


@pytest.mark.parametrize("dot", [False, True])
@pytest.mark.parametrize("write", [False, True])
def test_the_decode_attention_kernels_compile(dot, write):
    from shards.decode_attention import CUDA_CORE_SHAPE, DOT_SHAPE
    from shards.decode_attention_kernels import merge_runs, run_attention

    block, _, warps = DOT_SHAPE if dot else CUDA_CORE_SHAPE
    pad = 16 if dot else 4
    for single in (False, True):
        compile_for_h200(
            run_attention,
            {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "knew_ptr": "*bf16", "vnew_ptr": "*bf16",
             "slot_ptr": "*i64", "pos_ptr": "*i64", "out_ptr": "*bf16", "acc_ptr": "*fp32", "stats_ptr": "*fp32",
             "span": "i32", "rows": "i32", "capacity": "i32", "n_kv": "i32", "scale": "fp32"},
            {"GROUP": 4, "GROUP_PAD": pad, "HEAD_DIM": 128, "BLOCK": block, "SINGLE": single, "DOT": dot,
             "IEEE": False, "WRITE": write},
            warps,
        )  # fmt: skip
    compile_for_h200(
        merge_runs,
        {"acc_ptr": "*fp32", "stats_ptr": "*fp32", "out_ptr": "*bf16", "runs": "i32", "n_kv": "i32"},
        {"GROUP": 4, "GROUP_PAD": pad, "HEAD_DIM": 128, "RUNS_PAD": 64},
        4,
    )


@pytest.mark.parametrize("scaled", [False, True])
def test_the_moe_elementwise_kernels_compile(scaled):
    from shards.moe_kernels_triton import combine_kernel, silu_mul_kernel

    compile_for_h200(
        silu_mul_kernel,
        {"src_ptr": "*bf16", "out_ptr": "*bf16", "scale_ptr": "*bf16", "hidden": "i32", "row_stride": "i32"},
        {"SCALED": scaled, "BLOCK": 1024},
        4,
    )
    compile_for_h200(
        combine_kernel,
        {"ys_ptr": "*bf16", "inverse_ptr": "*i64", "local_ptr": "*i64", "weight_ptr": "*bf16", "out_ptr": "*bf16",
         "dim": "i32", "n_local": "i32"},
        {"K": 2, "BLOCK": 1024},
        4,
    )  # fmt: skip


@pytest.mark.parametrize("whole", [False, True])
def test_the_band_merge_kernel_compiles(whole):
    from shards.layer_kernels_triton import band_merge_kernel

    compile_for_h200(
        band_merge_kernel,
        {"own_ptr": "*bf16", "own_lse_ptr": "*fp32", "rev_ptr": "*bf16", "rev_lse_ptr": "*fp32", "whole_ptr": "*bf16",
         "whole_lse_ptr": "*fp32", "out_ptr": "*bf16", "tokens": "i32", "seen": "i32", "heads": "i32",
         "own_sh": "i32", "own_st": "i32", "rev_sh": "i32", "rev_st": "i32", "whole_sh": "i32", "whole_st": "i32"},
        {"HEADS": 32, "HEAD_DIM": 128, "HAS_WHOLE": whole},
        4,
    )  # fmt: skip


def test_the_norm_and_rotary_kernels_compile():
    from shards.layer_kernels_triton import rms_norm_kernel, rotary_kernel

    compile_for_h200(
        rms_norm_kernel, {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "dim": "i32", "eps": "fp32"},
        {"BLOCK": 4096}, 8,
    )  # fmt: skip
    compile_for_h200(
        rotary_kernel,
        {"x_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "out_ptr": "*bf16", "heads": "i32",
         "token_stride": "i32"},
        {"HEADS": 32, "HEAD_DIM": 128},
        4,
    )  # fmt: skip
