"""Every Triton kernel compiles to a cubin for Ampere (sm_80) and Hopper (sm_90)
with the block configs it autotunes over on a GPU — no GPU needed: Triton
compiles ahead of time for a named target. This catches what the interpreter
cannot (dot shape and dtype rules, layouts of the mask's reshape, shared
memory per config) on machines without a GPU.

Runs without TRITON_INTERPRET (under it the kernels are interpreted
functions, not JIT functions, and their configs are the interpreter's)."""
import os

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="compiles the GPU configs; not under the interpreter")

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

# Shared memory per block on the targets (bytes, opt-in maximum).
SMEM = {80: 163 * 1024, 90: 227 * 1024}
TL_NAMES = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32, "fp64": tl.float64}


def _kernels():
    """(name, autotuner, pointer dtypes, constexprs) for each kernel, per dtype."""
    from lora_kernels.triton import (dropout, lora_embedding_fwd, lora_linear_bwd,
                                     lora_linear_fwd, merge, rank_r_grads)

    def spec(dt, br=16):
        low = "fp32" if dt in ("bf16", "fp16") else dt        # S kept in fp32 for half
        acc = "fp64" if dt == "fp64" else "fp32"
        prec = "tf32" if dt == "fp32" else "ieee"
        common = dict(ACC=TL_NAMES[acc], PREC=prec)
        return [
            ("dropout", dropout._dropout_kernel,
             dict(x_ptr=dt, y_ptr=dt, seed_ptr="i64"), {}),
            ("lowrank_in", lora_linear_fwd._lowrank_in_kernel,
             dict(x_ptr=dt, a_ptr=dt, s_ptr=low, seed_ptr="i64"),
             dict(HAS_DROPOUT=True, BR=br, **common)),
            ("fused_linear", lora_linear_fwd._fused_linear_kernel,
             dict(x_ptr=dt, w_ptr=dt, bias_ptr=dt, s_ptr=low, b_ptr=dt, y_ptr=dt),
             dict(HAS_BIAS=True, HAS_LORA=True, BR=br, **common)),
            ("rank_r_grads", rank_r_grads._rank_r_grads_kernel,
             dict(g_ptr=dt, s_ptr=low, b_ptr=dt, ds_ptr=acc, db_ptr=acc),
             dict(WANT_DS=True, WANT_DB=True, BR=br, **common)),
            ("dx", lora_linear_bwd._dx_kernel,
             dict(g_ptr=dt, w_ptr=dt, ds_ptr=acc, a_ptr=dt, dx_ptr=dt, seed_ptr="i64"),
             dict(HAS_LORA=True, HAS_DROPOUT=True, BR=br, **common)),
            ("da", lora_linear_bwd._da_kernel,
             dict(ds_ptr=acc, x_ptr=dt, da_ptr=acc, seed_ptr="i64"),
             dict(HAS_DROPOUT=True, BR=br, **common)),
            ("embedding_fwd", lora_embedding_fwd._embedding_fwd_kernel,
             dict(idx_ptr="i64", w_ptr=dt, a_ptr=dt, b_ptr=dt, y_ptr=dt, s_ptr=low),
             dict(BR=br, **common)),
            ("merge", merge._merge_kernel, dict(w_ptr=dt, b_ptr=dt, a_ptr=dt),
             dict(ACC=TL_NAMES[acc], BR=br)),
        ]
    return spec


def _compile(autotuner, ptrs, consts, config, arch):
    fn = autotuner.fn
    constexprs = dict(consts, **config.kwargs)
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = "*" + ptrs[name]
        elif name in ("scaling",):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=config.num_warps,
                                       num_stages=config.num_stages))


CASES = [("bf16", 90, "all", 16), ("bf16", 90, "first", 64), ("fp16", 90, "first", 16),
         ("fp32", 90, "first", 16), ("bf16", 80, "first", 16), ("fp64", 90, "first", 16)]


@pytest.mark.parametrize("dt,arch,which,br", CASES, ids=lambda v: str(v))
def test_every_kernel_compiles_for_the_gpu(dt, arch, which, br):
    from lora_kernels.triton.common import SMEM_BUDGET, gemm_smem, interpreting

    assert not interpreting()
    elem = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}[dt]
    failures = []
    for name, autotuner, ptrs, consts in _kernels()(dt, br):
        configs = autotuner.configs
        if name in ("fused_linear", "dx"):  # as prune_gemm_configs keeps them
            configs = [c for c in configs if gemm_smem(c, elem) <= SMEM_BUDGET] or \
                [triton.Config(dict(min(configs, key=lambda c: gemm_smem(c, elem)).kwargs),
                               num_warps=4, num_stages=1)]
        configs = configs if which == "all" else configs[:1]
        for config in configs:
            try:
                out = _compile(autotuner, ptrs, consts, config, arch)
            except Exception as e:  # collect every failure, then report
                failures.append(f"{name} {config}: {type(e).__name__}: {str(e)[:300]}")
                continue
            assert out.asm.get("cubin"), name
            if out.metadata.shared > SMEM[arch]:
                failures.append(f"{name} {config}: {out.metadata.shared} bytes of shared "
                                f"memory > {SMEM[arch]} on sm_{arch}")
    assert not failures, "\n".join(failures)
