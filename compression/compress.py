"""`codesign compress`: prune, quantize and compile a user's own trained CNN under a latency budget.

    load the model ('module:factory' + weights, an ONNX file rebuilt in PyTorch
       (onnx_module.py), or an nn.Module)
    -> original: accuracy (validation split), latency (TVM, measured whole)
    -> prune: AMC on torch-pruning groups against TVM-measured latency (amc/own.py)
    -> quantize: HAQ for any CNN (haq/own.py `quantize_own`) when it is installed; otherwise
       the step is skipped and the report says so
    -> compile: the verified artifact OUT/model.tar: the quantized network where HAQ measured
       it faster than the pruned one (by the pipeline's MIN_GAIN) at most `max_quant_drop`
       points less accurate (codesign.artifact.imported.ship_built: outputs checked against
       its fake-quant twin), else the pruned network (compile_model: checked against PyTorch)
The report lists accuracy and measured latency after each step: OUT/compress.json and
OUT/compress.md. Re-running the same command resumes (search and fine-tuning checkpoints;
layers and networks measured once are reused from the LUT file).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from codesign.errors import CompressError
from codesign.measurement import MeasureProtocol


@dataclass(frozen=True, slots=True)
class CompressSettings:
    latency_ms: float  # the budget, measured with TVM on `target`
    dataset: str  # mnist5k, digits, an image folder or a CIFAR-10 batch directory
    out: str
    target: str = "x86"
    input_shape: tuple[int, int, int] | None = None  # C, H, W (an ONNX file carries its own)
    weights: str | None = None  # state_dict for a 'module:factory' model
    db: str | None = None  # the LUT file (default: OUT/lut.sqlite)
    episodes: int = 30
    warmup: int = 10
    levels: int = 8
    lbound: float = 0.25
    reward_images: int = 1000
    finetune_epochs: int = 2
    finetune_lr: float = 0.01
    missing: str = "measure"
    quantize: bool = True
    device: str | None = None
    seed: int = 0
    protocol: MeasureProtocol = field(default_factory=MeasureProtocol)
    # the quantized network ships when it measured faster than the pruned one (by the pipeline's
    # MIN_GAIN) and lost at most this many accuracy points against it
    max_quant_drop: float = 0.5

    def __post_init__(self) -> None:
        if not self.latency_ms > 0:
            raise CompressError(f"--latency-ms must be positive, got {self.latency_ms!r}")
        if self.episodes < 1 or self.finetune_epochs < 0:
            raise CompressError("need episodes >= 1 and finetune_epochs >= 0")


@dataclass(frozen=True, slots=True)
class CompressStep:
    name: str  # original | prune | quantize | compile
    accuracy: float | None  # top-1 % on the validation split
    latency_ms: float | None  # measured with TVM on the target
    note: str = ""


@dataclass(frozen=True)
class CompressReport:
    steps: tuple[CompressStep, ...]
    artifact: str | None
    policy: str
    quantize_skipped: str | None
    settings: CompressSettings
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = {
            "steps": [asdict(s) for s in self.steps],
            "artifact": self.artifact,
            "policy": self.policy,
            "quantize_skipped": self.quantize_skipped,
            "seconds": round(self.seconds, 1),
        }
        d["settings"] = {k: getattr(self.settings, k) for k in self.settings.__dataclass_fields__}
        d["settings"]["protocol"] = self.settings.protocol.to_dict()
        return d

    def markdown(self) -> str:
        lines = ["# codesign compress", "", "| step | accuracy (%) | latency (ms) | note |",
                 "|---|---|---|---|"]  # fmt: skip
        for s in self.steps:
            acc = "-" if s.accuracy is None else f"{s.accuracy:.2f}"
            ms = "-" if s.latency_ms is None else f"{s.latency_ms:.4g}"
            lines.append(f"| {s.name} | {acc} | {ms} | {s.note} |")
        lines += ["", f"Budget: {self.settings.latency_ms:g} ms on {self.settings.target}.",
                  f"Pruning policy (kept channels per group): `{self.policy}`"]  # fmt: skip
        if self.quantize_skipped:
            lines.append(f"Quantize step skipped: {self.quantize_skipped}")
        if self.artifact:
            lines.append(f"Artifact: `{self.artifact}`")
        return "\n".join(lines) + "\n"


def load_user_model(
    model: Any, *, weights: str | None, input_shape: Sequence[int] | None
) -> tuple[Any, tuple[int, int, int]]:
    """(nn.Module, (C, H, W)) from an nn.Module, an ONNX file (rebuilt in PyTorch by
    `onnx_module`; its input shape unless `input_shape` is given) or 'module:factory' (+
    weights)."""
    import torch

    shape = tuple(int(v) for v in input_shape) if input_shape else None
    if isinstance(model, torch.nn.Module):
        module = model
    elif str(model).endswith(".pt2"):
        # an ExportedProgram's module() refuses train()/eval(): it cannot be fine-tuned
        raise CompressError(
            f"{model}: a .pt2 ExportedProgram cannot be pruned and fine-tuned (torch.export "
            "modules refuse train()); give the model as 'importable.module:factory' with "
            "--weights state_dict.pt, or as an ONNX file. `codesign compile` takes .pt2 files "
            "as they are"
        )
    elif str(model).endswith(".onnx"):
        from codesign.compression.onnx_module import load_onnx_module

        module = load_onnx_module(model)
        given = module.input_shape
        if given is not None and shape is not None and tuple(given[1:]) != shape:
            raise CompressError(
                f"{model} takes inputs of shape {list(given)}, not (1, {', '.join(map(str, shape))})"
                "; drop --input-shape or give the model's"
            )
        shape = shape or (tuple(given[1:]) if given is not None and given[0] == 1 else None)
    elif ":" in str(model):
        from codesign.tvm_backend.frontend import load_factory

        module = load_factory(str(model), weights)
    else:
        raise CompressError(
            f"{model}: give an ONNX file (.onnx), 'importable.module:factory' (with --weights "
            "state_dict.pt) or a torch.nn.Module"
        )
    if shape is None or len(shape) != 3:
        raise CompressError(f"give the input shape as C,H,W (--input-shape 3x64x64), got {shape}")
    return module.eval(), shape  # type: ignore[return-value]


def _why_not_ship(quant: dict[str, Any] | None, max_drop: float, target: Any) -> str | None:
    """None when the quantized network ships, else why not (appended to the compile note)."""
    from codesign.pipeline.compress import MIN_GAIN, measured_faster

    if quant is None:
        return ""
    if target.is_remote or target.device != "cpu":  # see ship_built
        return " (a quantized network of your own model ships for local CPU targets only)"
    # against the pruned network as HAQ compiles it in fp32: scored on the same images and
    # measured in alternating passes with the quantized one (not the prune step's numbers,
    # minutes older and on other images)
    if quant["accuracy"] < quant["float_accuracy"] - max_drop:
        return f" (HAQ lost more than {max_drop:g} pt against it)"
    if not measured_faster(quant["latency_ms"], quant["float_ms"], MIN_GAIN):
        return f" (HAQ measured not faster by {MIN_GAIN:.0%})"
    return None


def quantize_step(
    model: Any, data: Any, *, target: Any, db: str | Path, budget_ms: float | None,
    out: str | Path, progress: bool = True, haq: Any = None,
) -> dict[str, Any] | None:  # fmt: skip
    """HAQ for any CNN on the pruned `model` (`haq`: its OwnHAQSettings), or None when it is
    not installed. The search checkpoint goes to `out`; "built" is the compiled module (with
    its runtime weights), "library" the exported shared library."""
    try:
        from codesign.compression.haq.own import OwnHAQSettings, quantize_own
    except ImportError:
        return None
    from dataclasses import replace

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    haq = replace(haq or OwnHAQSettings(), checkpoint=str(out / "haq_search.pt"))
    res = quantize_own(model, input_shape=(1, *data.info.input_shape), data=data, target=target,
                       lut_path=db, budget_ms=budget_ms, settings=haq,
                       progress=progress)  # fmt: skip
    res.built.export(out / "model.so")
    return {"accuracy": res.accuracy, "latency_ms": res.latency_ms, "library": str(out / "model.so"),
            "built": res.built, "qnet": res.qnet, "precisions": list(res.policy.precisions),
            "policy_code": res.policy.encode(),
            **{k: v for k, v in res.to_dict().items() if k not in ("layers",)}}  # fmt: skip


def compress(
    model: Any, *, settings: CompressSettings, progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> CompressReport:  # fmt: skip
    """Prune, quantize and compile `model` (see the module docstring)."""
    from codesign.artifact.imported import compile_model
    from codesign.artifact.pack import CompileOptions
    from codesign.compression.amc.env import AMCConfig
    from codesign.compression.amc.own import OwnSettings, prune_own
    from codesign.compression.ddpg import DDPGConfig
    from codesign.data import load_dataset
    from codesign.targets import parse_target
    from codesign.train import TrainConfig, evaluate

    t0, say = time.time(), log or (lambda _m: None)
    s = settings
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    module, shape = load_user_model(model, weights=s.weights, input_shape=s.input_shape)
    data = load_dataset(s.dataset, shape, seed=s.seed)
    import torch

    from codesign.compression.onnx_module import OnnxModule

    if isinstance(module, OnnxModule):  # exporters fold BatchNorm; fine-tuning wants it back
        restored = module.restore_batchnorm(data.calibration(256, seed=s.seed))
        say(f"BatchNorm restored after {len(restored)} convolutions of {module.label}")

    with torch.no_grad():
        n_out = module(torch.zeros(1, *shape)).shape[-1]
    if n_out != len(data.info.classes):
        raise CompressError(
            f"the model has {n_out} outputs but {s.dataset} has {len(data.info.classes)} classes; "
            "give the dataset the model was trained on"
        )
    target = parse_target(s.target)
    db = s.db or str(out / "lut.sqlite")
    own = OwnSettings(
        amc=AMCConfig(episodes=s.episodes, lbound=s.lbound, divisor=8, seed=s.seed,
                      reward_images=s.reward_images,
                      ddpg=DDPGConfig(warmup_episodes=min(s.warmup, s.episodes), seed=s.seed)),
        levels=s.levels, missing=s.missing, device=s.device, protocol=s.protocol,
        finetune=TrainConfig(epochs=s.finetune_epochs, lr=s.finetune_lr, seed=s.seed),
    )  # fmt: skip
    say(f"pruning to {s.latency_ms:g} ms on {target.key}")
    res = prune_own(module, data, budget_ms=s.latency_ms, target=target, db=db, settings=own,
                    out=out / "prune", progress=progress, log=say)  # fmt: skip
    steps = [
        CompressStep("original", res.original_acc, res.original_ms),
        CompressStep("prune", res.pruned_acc, res.pruned_ms,
                     f"AMC, {res.episodes} episodes; {res.pruned_acc_before_finetune:.2f}% "
                     f"before fine-tuning; predicted {res.searched_ms:.4g} ms searched, "
                     f"{res.predicted_ms:.4g} ms after the budget fill and "
                     f"{len(res.verified)} whole-network measurement(s)"),
    ]  # fmt: skip
    quant, skipped = None, None
    if not s.quantize:
        skipped = "not asked for (--no-quantize)"
    else:
        try:
            quant = quantize_step(res.model, data, target=target, db=db, budget_ms=None,
                                  out=out / "quantize", progress=progress)  # fmt: skip
        except Exception as err:  # noqa: BLE001 - the pruned fp32 network still ships
            skipped = f"HAQ failed ({type(err).__name__}: {err})"[:300]
        else:
            if quant is None:
                skipped = "HAQ for any CNN (codesign.compression.haq.own) is not installed"
    if quant is not None:
        steps.append(
            CompressStep(
                "quantize",
                quant["accuracy"],
                quant["latency_ms"],
                f"HAQ {quant.get('policy', '')}; against the pruned network compiled alike in "
                f"fp32: {quant['float_ms']:.4g} ms (alternating passes), "
                f"{quant['float_accuracy']:.1f}% (same images); library {quant['library']}",
            )
        )
    else:
        steps.append(CompressStep("quantize", None, None, f"skipped: {skipped}"))
    opts = CompileOptions(progress=progress, protocol=s.protocol)
    why_not = _why_not_ship(quant, s.max_quant_drop, target)
    if quant is not None and why_not is None:
        from codesign.artifact.imported import ship_built
        from codesign.tvm_backend.frontend import torch_reference

        say("compiling the quantized network into the artifact")
        report = ship_built(quant["built"], reference=torch_reference(quant["qnet"].cpu().eval()),
                            out=out / "model.tar", target=target, label=f"{model} (HAQ)",
                            precisions=quant["precisions"], policy=quant["policy_code"],
                            data=data, options=opts)  # fmt: skip
        steps.append(CompressStep("compile", quant["accuracy"], report.latency_ms,
                                  f"the quantized network ships (HAQ measured it faster than the "
                                  f"pruned one); outputs checked against its fake-quant PyTorch "
                                  f"twin (max abs diff {report.max_abs_diff:.2g})"))  # fmt: skip
    else:
        say("compiling the pruned network into the artifact")
        report = compile_model(res.model, out=out / "model.tar", target=target,
                               input_shape=(1, *shape), options=opts, peers=False)  # fmt: skip
        steps.append(CompressStep("compile", evaluate(res.model, data), report.latency_ms,
                                  f"the fp32 pruned network ships{why_not or ''}; outputs checked "
                                  f"against PyTorch (max abs diff {report.max_abs_diff:.2g})"))  # fmt: skip
    rep = CompressReport(tuple(steps), str(report.path), res.policy.encode(), skipped, s,
                         time.time() - t0)  # fmt: skip
    (out / "compress.json").write_text(json.dumps(rep.to_dict(), indent=2, default=str) + "\n")
    (out / "compress.md").write_text(rep.markdown())
    return rep
