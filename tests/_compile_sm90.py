"""Compile the sampling / selection / mixture / verification Triton kernels for sm_90 without a GPU.

The interpreter runs kernels as Python and misses what only the compiler rejects (non-constexpr
globals, type mismatches between branches, unsupported ops). This script builds each kernel for
GPUTarget("cuda", 90, 32) through the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with
Triton's bundled ptxas) and prints one JSON line per variant. It must run with TRITON_INTERPRET
unset (the kernels are then JITFunctions): tests/test_triton_compile.py runs it in a subprocess.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from me_kernels import _random, mixture, sampling, selection, verify

TARGET = GPUTarget("cuda", 90, 32)

ROW_PARAMS = {
    "temp_ptr": "*fp32", "stride_temp": "i32", "temp_s": "fp32",
    "topk_ptr": "*i32", "stride_topk": "i32", "topk_s": "i32",
    "topp_ptr": "*fp32", "stride_topp": "i32", "topp_s": "fp32",
    "minp_ptr": "*fp32", "stride_minp": "i32", "minp_s": "fp32",
    "seed_ptr": "*i64", "stride_seed": "i32", "seed_s": "i64",
    "off_ptr": "*i64", "stride_off": "i32", "off_s": "i64",
}


def _has(tensors: bool, seed: bool = True) -> dict:
    return dict(HAS_TEMP=tensors, HAS_TOPK=tensors, HAS_TOPP=tensors, HAS_MINP=tensors, HAS_SEED=seed or tensors,
                HAS_OFF=tensors)


def _sample_variant(dtype, tensors, select, cfg):
    sig = {"logits_ptr": dtype, "stride_lb": "i32", "V": "i32", **ROW_PARAMS,
           "w_ptr": "*fp32", "stride_wb": "i32", "stride_wm": "i32", "M": "i32",
           "tok_ptr": "*i64", "mem_ptr": "*i32", "submax_ptr": "*fp32", "n_sub": "i32", "tilemax_ptr": "*fp32",
           "n_tiles": "i32", "cand_v_ptr": "*fp32", "cand_i_ptr": "*i32", "dbg_ptr": "*fp32", "debug": "i32"}
    consts = dict(**_has(tensors), SELECT=select, SHARED=False, M_PAD=4 if select else 1, NSUB=cfg["NSUB"],
                  SUB=cfg["SUB"], P=cfg["P"], CAP=cfg["CAP"], stride_lv=1)
    return sampling._sample_kernel, sig, consts, cfg["num_warps"], ("V", "stride_lb")


def _mixture_variant(dtype, cfg):
    sig = {"logits_ptr": dtype, "stride_lm": "i32", "stride_lb": "i32", "V": "i32", "M": "i32",
           "w_ptr": "*fp32", "stride_wb": "i32", "stride_wm": "i32", "part_ptr": "*fp32", "n_chunks": "i32",
           **ROW_PARAMS, "tok_ptr": "*i64", "submax_ptr": "*fp32", "n_sub": "i32", "tilemax_ptr": "*fp32",
           "n_tiles": "i32", "cand_v_ptr": "*fp32", "cand_i_ptr": "*i32", "dbg_ptr": "*fp32", "debug": "i32"}
    consts = dict(**_has(False), MIX_PAD=4, CH_PAD=64, NSUB=8, SUB=cfg["SUB"], P=cfg["P"], CAP=cfg["CAP"],
                  stride_lv=1)
    return mixture._mixture_sample_kernel, sig, consts, 8, ("V", "stride_lb")


def _verify_variant(dtype, tensors, has_tau, cfg):
    sig = {"mix_ptr": "*fp32", "stride_xr": "i32", "V": "i32", "J": "i32",
           "draft_ptr": dtype, "stride_db": "i32", "stride_dj": "i32", "stride_dv": "i32",
           "tok_ptr": "*i64", "stride_tb": "i32", "stride_tj": "i32", "tau_p_ptr": "*fp32", "tau_q_ptr": "*fp32",
           **ROW_PARAMS, "acc_ptr": "*i8", "bad_ptr": "*i8", "res_ptr": "*i64"}
    consts = dict(HAS_TAU=has_tau, **_has(tensors), NSUB=cfg["NSUB"], SUB=cfg["SUB"])
    return verify._verify_position_kernel, sig, consts, cfg["num_warps"], ("V", "stride_xr")


def variants():
    large = sampling.block_config(131072)
    small = sampling.block_config(1000)
    yield "sample fp32 V>=16384", _sample_variant("*fp32", False, False, large)
    yield "me_step bf16 V>=16384 per-row params", _sample_variant("*bf16", True, True, large)
    yield "sample fp16 V<2048", _sample_variant("*fp16", False, False, small)
    yield "mixture_sample bf16 V>=16384", _mixture_variant("*bf16", large)
    yield "mixture partials", (mixture._mixture_partials_kernel,
                               {"logits_ptr": "*bf16", "stride_lm": "i32", "stride_lb": "i32", "V": "i32", "M": "i32",
                                "part_ptr": "*fp32", "tiles_per_chunk": "i32", "n_chunks": "i32"},
                               dict(MIX_PAD=4, NSUB=4, SUB=128, stride_lv=1), 4, ("V",))
    yield "mixture logprobs", (mixture._mixture_logprobs_kernel,
                               {"logits_ptr": "*fp32", "stride_lm": "i32", "stride_lb": "i32", "V": "i32", "M": "i32",
                                "w_ptr": "*fp32", "stride_wb": "i32", "stride_wm": "i32", "part_ptr": "*fp32",
                                "tiles_per_chunk": "i32", "n_chunks": "i32", "out_ptr": "*fp32", "stride_ob": "i32"},
                               dict(MIX_PAD=4, CH_PAD=64, NSUB=4, SUB=128, stride_lv=1), 4, ("V",))
    yield "select_members", (selection._select_members_kernel,
                             {"w_ptr": "*fp32", "stride_wb": "i32", "M": "i32", "B": "i32", "seed_ptr": "*i64",
                              "stride_seed": "i32", "seed_s": "i64", "off_ptr": "*i64", "stride_off": "i32",
                              "off_s": "i64", "out_ptr": "*i32"},
                             dict(HAS_SEED=True, HAS_OFF=False, M_PAD=4, BLOCK_B=128, stride_wm=1), 4, ())
    yield "verify_draft position bf16 V>=16384 per-row params", _verify_variant("*bf16", True, True, large)
    yield "verify_draft position fp32 V<2048 no thresholds", _verify_variant("*fp32", False, False, small)
    yield "verify_draft combine", (verify._verify_combine_kernel,
                                   {"acc_ptr": "*i8", "bad_ptr": "*i8", "res_ptr": "*i64", "J": "i32", "nd_ptr": "*i64",
                                    "stride_nd": "i32", "nd_s": "i32", "n_out_ptr": "*i64", "tok_out_ptr": "*i64"},
                                   dict(HAS_ND=True, J_PAD=8), 1, ())
    yield "uniforms", (_random._uniforms_kernel, {"seed_ptr": "*i64", "off_ptr": "*i64", "out_ptr": "*fp32", "n": "i32"},
                       dict(stream=0, BLOCK=256), 4, ())


def compile_one(fn, sig, consts, warps, divisible):
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts, attrs=attrs)
    t0 = time.time()
    compiled = triton.compile(src, target=TARGET, options={"num_warps": warps})
    seconds = time.time() - t0
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    info = {}
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    m = re.search(r"Used (\d+) registers", out)
    s = re.search(r"(\d+) bytes spill stores", out)
    info.update(registers=int(m.group(1)) if m else None, spill_store_bytes=int(s.group(1)) if s else 0)
    return {"seconds": round(seconds, 1), "cubin_bytes": len(compiled.asm["cubin"]), **info}


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("run with TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    failures = 0
    for name, (fn, sig, consts, warps, divisible) in variants():
        try:
            result = {"kernel": name, "ok": True, **compile_one(fn, sig, consts, warps, divisible)}
        except Exception as err:  # report every variant, then fail
            failures += 1
            result = {"kernel": name, "ok": False, "error": f"{type(err).__name__}: {str(err)[:2000]}"}
        print(json.dumps(result), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
