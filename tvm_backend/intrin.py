# TVMScript declares buffers with call expressions as annotations (T.Buffer((16, 4), "int8")).
# pyright: reportInvalidTypeForm=false
"""x86 int8 tensor intrinsics and the MetaSchedule design space that tensorizes with them.

TVM 0.27 ships int8 dot products for AVX-512 only (`dot_16x4_vnni`, `dot_16x4_avx512`). For
AVX2 CPUs (e.g. AMD Zen 2) codesign registers `codesign_dot_8x4_avx2`:

    C[i] += sum_k int32(A[k]) * int32(B[i, k])      i < 8 (int32 lanes), k < 4; A u8, B s8
    = vpmaddwd(vpmaddubsw(broadcast(A as i32), B), 1)   (256-bit: 32 products per call)

and for AVX-512 VNNI CPUs `codesign_dot_16x4_vnni` (the same with 16 lanes, one `vpdpbusd`).
TVM's own `dot_16x4_vnni` cannot be used with the wheel's LLVM 22: LLVM declares
`llvm.x86.avx512.vpdpbusd.512` on `<64 x i8>` operands now, TVM still passes `<16 x i32>`, the
module fails LLVM's verifier ("Call parameter type does not match function signature") and so
every tensorized candidate failed to build (seen here: int8 blocks 17x slower than fp32).

`vpmaddubsw` saturates each pair sum to int16, so it is exact only for w_bits + a_bits <= 15
(the precision menu enforces this). Convolutions reach the intrinsic in NHWC with weights
packed as [O/lanes, KH, KW, I/4, lanes, 4] (see `codesign.tvm_backend.quantize`), so every
intrinsic call reads one contiguous lanes x 4 weight tile.

Int8 tasks are tuned with `int8_space`: TVM's x86 rule set with MultiLevelTilingWithIntrin for
the target's intrinsic; every other task keeps MetaSchedule's default space.
"""

from __future__ import annotations

from typing import Any

AVX2_DOT_8X4 = "codesign_dot_8x4_avx2"
VNNI_DOT_16X4 = "codesign_dot_16x4_vnni"
INT8_BLOCK = "qconv"  # name of the TE compute of tensorizable int8 convolutions

_REGISTERED = False


def _define() -> None:
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    def desc_of(lanes: int):  # C[i] += sum_k int32(A[k]) * int32(B[i, k]), i < lanes, k < 4
        @T.prim_func(s_tir=True)
        def desc(
            A: T.Buffer((4,), "uint8", offset_factor=1),
            B: T.Buffer((lanes, 4), "int8", offset_factor=1),
            C: T.Buffer((lanes,), "int32", offset_factor=1),
        ) -> None:
            with T.sblock("root"):
                T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
                T.writes(C[0:lanes])
                for i in T.serial(0, lanes):
                    for k in T.serial(0, 4):
                        with T.sblock("update"):
                            vi, vk = T.axis.remap("SR", [i, k])
                            C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

        return desc

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((8, 4), "int8", offset_factor=1),
        C: T.Buffer((8,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            a_u8x4 = A.vload([0], "uint8x4")
            a_i32 = T.reinterpret(a_u8x4, dtype="int32")
            a_u8x32 = T.reinterpret(T.broadcast(a_i32, 8), dtype="uint8x32")
            b_i8x32 = B.vload([0, 0], dtype="int8x32")
            pairs = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                a_u8x32,
                b_i8x32,
                dtype="int16x16",
            )
            C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                pairs,
                T.int16x16(1),
                dtype="int32x8",
            )

    TensorIntrin.register(AVX2_DOT_8X4, desc_of(8), impl, override=True)

    @T.prim_func(s_tir=True)
    def vnni16(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64"),
                B.vload([0, 0], dtype="int8x64"),
                dtype="int32x16",
            )

    TensorIntrin.register(VNNI_DOT_16X4, desc_of(16), vnni16, override=True)


def register_intrinsics() -> None:
    """Register codesign's intrinsics (idempotent) and TVM's own x86 ones.

    Needed before tuning int8 tasks and before applying tuning records that tensorize.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from codesign.tvm_backend.fast_import import _shallow_inspect_stack, import_intrinsics

    import_intrinsics()
    with _shallow_inspect_stack():
        _define()
    _REGISTERED = True


def is_int8_task(mod: Any) -> bool:
    """Whether a task PrimFunc holds a tensorizable int8 convolution (block `qconv`)."""
    from tvm.s_tir import Schedule

    try:
        sch = Schedule(mod)
        block = sch.get_sblock(INT8_BLOCK)
    except Exception:  # no such block
        return False
    return block is not None


def task_intrin(task_mod: Any, target: Any) -> str:
    """The int8 intrinsic `target` tensorizes the task with ("" for a task that is not a
    tensorizable int8 convolution, or a target without one); registered when returned."""
    if target.name == "cuda" or not is_int8_task(task_mod):
        return ""
    from codesign.tvm_backend.precision import precision_menu

    intrin = precision_menu(target).int8_intrin
    if intrin:
        register_intrinsics()
    return intrin


def design_space(task_mod: Any, target: Any) -> Any:
    """The MetaSchedule design space a task is scheduled in, analytically or by tuning: the
    tensorizing one (`int8_space`) for an int8 convolution the target has an intrinsic for,
    else MetaSchedule's default."""
    intrin = task_intrin(task_mod, target)
    return int8_space(intrin) if intrin else "post-order-apply"


def int8_space(intrin: str) -> Any:
    """TVM's x86 tensorization rule set (ScheduleRule::DefaultX86) for `intrin`."""
    from tvm.s_tir import meta_schedule as ms

    sr, pp = ms.schedule_rule, ms.postproc
    reuse = sr.ReuseType(req="may", levels=[1, 2], scope="global")
    rules = [
        sr.ApplyCustomRule(),
        sr.InlineConstantScalars(),
        sr.AutoInline(
            into_producer=False,
            into_consumer=True,
            inline_const_tensor=True,
            disallow_if_then_else=True,
            require_injective=True,
            require_ordered=True,
            disallow_op=["tirx.exp"],
        ),
        sr.AddRFactor(max_jobs_per_core=16, max_innermost_factor=64),
        sr.MultiLevelTilingWithIntrin(
            intrin, structure="SSRSRS", max_innermost_factor=64, reuse_write=reuse
        ),
        sr.MultiLevelTiling(structure="SSRSRS", max_innermost_factor=64, reuse_write=reuse),
        sr.ParallelizeVectorizeUnroll(
            max_jobs_per_core=16,
            max_vectorize_extent=64,
            unroll_max_steps=[0, 16, 64, 512],
            unroll_explicit=True,
        ),
        sr.RandomComputeLocation(),
    ]
    postprocs = [
        pp.DisallowDynamicLoop(),
        pp.RewriteParallelVectorizeUnroll(),
        pp.RewriteReductionBlock(),
        pp.RewriteTensorize(vectorize_init_loop=True),
        pp.RewriteLayout(),
    ]
    return ms.space_generator.PostOrderApply(
        sch_rules=rules, postprocs=postprocs, mutator_probs="llvm"
    )
