"""ANE placement lint: what in a package's MIL program is known to leave the Neural Engine or
break it, per function, with the op and the rule named.

    python -m export.ane_lint artifacts/tiny/model.mlpackage [--function NAME] [--json]

The static lint (`lint`) reads the saved program on any OS (export/mil_executor.py's loader, no
weights read) and applies the RULES below. It is a lint, not a placement: CoreML decides per op
at load time; on macOS `compute_plan` (at the end of this file, clearly separate) asks CoreML's
own MLComputePlan for each op's device and estimated cost. Severities: `error` breaks the ANE
or a project rule (docs/architecture.md "ANE rules"), `warning` is known to run off the
ANE (a CPU/GPU segment and a hop), `info` is expected and cheap (an embedding lookup) but
worth seeing.
"""

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from . import mil_executor

ANE_MAX_DIM = 16384
RULES = {
    "dynamic-shape": "a dim unknown at compile time: the ANE needs static shapes (enumerate "
                     "shapes or export one function per shape, never RangeDim)",
    "enumerated-shapes": "input with enumerated shapes: fine for the ANE, but one function per "
                         "shape is the project's form (docs/architecture.md ANE rule 1)",
    "dim-above-16384": f"a tensor dim above {ANE_MAX_DIM}: beyond the ANE's limit on an axis "
                       "(split the vocab head, docs/architecture.md ANE rule 5)",
    "fp32-compute": "computes in fp32: the ANE computes fp16 only, so the op runs on GPU/CPU",
    "gather-activation": "gather on activations on the hot path: not an ANE op, CPU hop",
    "gather-table": "lookup in a constant table (embedding, RoPE cos/sin) by an input-derived "
                    "index: runs off the ANE, expected and cheap at the edge of the graph",
    "int-arithmetic": "integer arithmetic: the ANE has no int compute, so it runs on the CPU",
    "state-not-fp16": "a state that is not fp16: KV caches must be fp16 StateType (rule 3)",
    "cpu-op": "an op known to run off the ANE (sorting, scatter, control flow, random)",
    "int4-blockwise": "block-wise 4-bit weights: a GPU format; the ANE wants int8 per-channel "
                      "or palettized (LUT) weights (rule 6)",
}
SEVERITY = {"dynamic-shape": "error", "dim-above-16384": "error", "state-not-fp16": "error",
            "enumerated-shapes": "info", "fp32-compute": "warning", "gather-activation": "warning",
            "gather-table": "info", "int-arithmetic": "warning", "cpu-op": "warning",
            "int4-blockwise": "info"}
GATHERS = {"gather", "gather_nd", "gather_along_axis"}
CPU_OPS = {"topk", "argsort", "non_zero", "non_maximum_suppression", "scatter", "scatter_nd",
           "scatter_along_axis", "cond", "while_loop", "random_uniform", "random_normal",
           "random_bernoulli", "random_categorical"}
ARITHMETIC = {"add", "sub", "mul", "real_div", "floor_div", "mod", "pow", "maximum", "minimum",
              "select", "matmul", "reduce_sum", "reduce_mean", "reduce_max", "reduce_min",
              "reduce_prod", "abs", "sign", "equal", "not_equal", "greater", "greater_equal",
              "less", "less_equal", "clip", "range_1d", "fill"}
INT = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
# ops that only move data: a wide tensor there is a cheap CPU tail (e.g. joining a split vocab
# head into one logits output), not a compute op the ANE must tile
MOVEMENT = {"concat", "reshape", "transpose", "squeeze", "expand_dims", "cast", "slice_by_index",
            "slice_by_size", "split", "identity", "read_state", "write_state"}
# ops that only carry a value to an output / state (a final cast to fp32 is a boundary, not compute)
BOUNDARY = {"cast", "write_state", "coreml_update_state", "read_state"}


@dataclass(frozen=True)
class Finding:
    severity: str
    rule: str
    function: str
    op: str  # op type ("input", "state" for a function's interface)
    name: str  # the op's output (or the input / state) name
    message: str

    def __str__(self):
        return f"{self.severity}: {self.function}: {self.op} '{self.name}': [{self.rule}] {self.message}"


def lint_program(program, spec_function=None) -> list:
    """Findings for one loaded function (mil_executor.load(..., materialize=False))."""
    fn = program.function
    out = []

    def add(rule, op, name, detail=""):
        severity = SEVERITY[rule]
        if rule == "dim-above-16384" and op in MOVEMENT | {"input", "state"}:
            severity = "warning"
        out.append(Finding(severity, rule, fn, op, name,
                           RULES[rule] + (f" ({detail})" if detail else "")))

    flexible = _flexible_inputs(spec_function)
    for name, how in flexible.items():
        add("dynamic-shape" if how == "range" else "enumerated-shapes", "input", name, how)
    # unknown dims that only come from enumerated inputs are resolved per shape at load
    enumerated_only = bool(flexible) and set(flexible.values()) == {"enumerated"}

    for kind, vars_ in (("input", program.inputs), ("state", program.states)):
        for name, var in vars_.items():
            if any(d is None for d in var.shape) and name not in flexible:
                add("dynamic-shape", kind, name, var.describe())
            if any(d is not None and d > ANE_MAX_DIM for d in var.shape):
                add("dim-above-16384", kind, name, var.describe())
            if kind == "state" and var.dtype != "FLOAT16":
                add("state-not-fp16", kind, name, var.describe())
    types = dict(program.const_types)
    types.update(program.inputs)
    for op in program.ops:
        for v in op.outputs:
            types[v.name] = v
    consts = set(program.const_types)
    input_derived = _input_derived(program)

    def operands(op):
        return [(p, a) for p, args in op.inputs.items() for kind, a in args if kind == "var"]

    for op in program.ops:
        name = op.output_name
        for v in op.outputs:
            if any(d is None for d in v.shape):
                if not enumerated_only:
                    add("dynamic-shape", op.type, v.name, v.describe())
            elif any(d > ANE_MAX_DIM for d in v.shape):
                add("dim-above-16384", op.type, v.name, v.describe()
                    + (", data movement only" if op.type in MOVEMENT else ""))
        dyn = [(p, a) for p, a in operands(op) if a not in consts]
        float_out = [v for v in op.outputs if v.dtype in ("FLOAT32", "FLOAT64")]
        if float_out and op.type not in BOUNDARY:
            add("fp32-compute", op.type, name, float_out[0].describe())
        if op.type in GATHERS:
            table = op.inputs.get("x", [("val", None)])[0]
            if table[0] == "val" or table[1] in consts:
                add("gather-table", op.type, name, f"table {types[table[1]].describe()}"
                    if table[0] == "var" else "")
            else:
                add("gather-activation", op.type, name, types[table[1]].describe())
        if op.type in ARITHMETIC:
            ints = [a for _, a in dyn if types.get(a) is not None and types[a].dtype in INT]
            if ints or any(v.dtype in INT for v in op.outputs if op.type not in GATHERS):
                src = " from inputs" if any(a in input_derived for a in ints) else ""
                add("int-arithmetic", op.type, name,
                    f"{types[ints[0]].describe() if ints else op.outputs[0].describe()}{src}")
        if op.type in CPU_OPS:
            add("cpu-op", op.type, name)
    for op in program.constexpr_ops:
        data = op.inputs.get("data")
        if op.type == "constexpr_blockwise_shift_scale" and data:
            kind, ref = data[0]
            var = types.get(ref) if kind == "var" else ref
            if isinstance(var, mil_executor.Var) and var.dtype in ("INT4", "UINT4"):
                add("int4-blockwise", op.type, op.output_name, var.describe())
    return out


def _input_derived(program) -> set:
    """Names of values computed from the function's inputs (not only from constants)."""
    live = set(program.inputs) | set(program.states)
    for op in program.ops:
        if any(kind == "var" and a in live for args in op.inputs.values() for kind, a in args):
            live.update(v.name for v in op.outputs)
    return live


def _flexible_inputs(spec_function) -> dict:
    """{input name: 'range' | 'enumerated'} from the spec's feature descriptions."""
    out = {}
    for feature in getattr(spec_function, "input", []):
        if feature.type.WhichOneof("Type") != "multiArrayType":
            continue
        arr = feature.type.multiArrayType
        flex = arr.WhichOneof("ShapeFlexibility")
        if flex == "shapeRange" and any(r.upperBound != r.lowerBound for r in arr.shapeRange.sizeRanges):
            out[feature.name] = "range"
        elif flex == "enumeratedShapes" and len(arr.enumeratedShapes.shapes) > 1:
            out[feature.name] = "enumerated"
    return out


def lint(path, functions=None) -> list:
    """Findings for the package's functions (all by default), in program order. Raises
    mil_executor.PackageError for a path that is not a package or a function it lacks."""
    spec, _ = mil_executor.read_spec(path)
    names = mil_executor.functions(path)
    unknown = [f for f in functions or [] if f not in names]
    if unknown:
        raise mil_executor.PackageError(f"{path}: no function {', '.join(map(repr, unknown))} "
                                        f"(the package has {', '.join(names)})")
    names = functions or names
    descriptions = {f.name: f for f in spec.description.functions}
    findings = []
    for name in names:
        program = mil_executor.load(path, name, strict=False, materialize=False)
        findings += lint_program(program, descriptions.get(name, spec.description))
    return findings


def summarize(findings) -> dict:
    """{function: {severity: {rule: count}}}"""
    out = {}
    for f in findings:
        rules = out.setdefault(f.function, {}).setdefault(f.severity, {})
        rules[f.rule] = rules.get(f.rule, 0) + 1
    return out


# ---------------------------------------------------------------- macOS only: CoreML's own plan
def compute_plan(path, function: str = None) -> dict:
    """Per-op preferred device and estimated cost from CoreML's MLComputePlan (macOS 14.4+ only;
    untested on Linux, where it raises). Returns {"ops": [{op, name, device, cost}], "ane_cost":
    share of the estimated cost on the Neural Engine}."""
    if sys.platform != "darwin":
        raise RuntimeError("MLComputePlan needs macOS (CoreML); use lint() for the static check")
    import coremltools as ct
    from coremltools.models.compute_plan import MLComputePlan

    compiled = ct.models.utils.compile_model(str(path))
    plan = MLComputePlan.load_from_path(compiled)
    program = plan.model_structure.program
    fn = program.functions[function or next(iter(program.functions))]
    ops, total, ane = [], 0.0, 0.0
    for op in fn.block.operations:
        usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
        cost = plan.get_estimated_cost_for_mlprogram_operation(op)
        device = type(usage.preferred_compute_device).__name__ if usage else None
        weight = cost.weight if cost else 0.0
        total += weight
        ane += weight if device and "NeuralEngine" in device else 0.0
        ops.append({"op": op.operator_name, "name": op.outputs[0].name if op.outputs else "",
                    "device": device, "cost": weight})
    return {"ops": ops, "ane_cost": ane / total if total else None}


# ---------------------------------------------------------------- CLI
def build_parser():
    p = argparse.ArgumentParser(description="ANE placement lint over a saved .mlpackage: what in "
                                "each function's MIL program is known to leave the Neural Engine "
                                "or break it. Exit status 1 when a finding at --fail-on's level "
                                "is found, 2 for a path that is not a package.")
    p.add_argument("package", type=Path, help="a saved .mlpackage folder (mlx_student.export's "
                   "model.mlpackage) or a bare .mlmodel file")
    p.add_argument("--function", action="append", help="function to lint; repeat for several "
                   "(default: all the package's functions)")
    p.add_argument("--json", action="store_true", help="findings as JSON")
    p.add_argument("--show", type=int, default=20, metavar="N", help="print at most N findings "
                   "per function and rule (the summary line counts them all) (default: %(default)s)")
    p.add_argument("--fail-on", choices=["error", "warning", "never"], default="error",
                   help="lowest severity that makes the exit status 1 (default: %(default)s)")
    p.add_argument("--compute-plan", action="store_true", help="also CoreML's plan (macOS)")
    return p


def run(args) -> int:
    findings = lint(args.package, args.function)
    if args.json:
        report = {"summary": summarize(findings), "findings": [asdict(f) for f in findings]}
        if args.compute_plan:
            report["compute_plan"] = compute_plan(args.package, (args.function or [None])[0])
        print(json.dumps(report, indent=1))
    else:
        shown = Counter()
        for f in findings:
            shown[f.function, f.rule] += 1
            if shown[f.function, f.rule] <= args.show:
                print(f)
        for fn, sev in summarize(findings).items():
            print(f"{fn}: " + "; ".join(f"{s} " + ", ".join(f"{r} x{n}" for r, n in rules.items())
                                        for s, rules in sev.items()))
        if args.compute_plan:
            plan = compute_plan(args.package, (args.function or [None])[0])
            print(f"CoreML compute plan: {plan['ane_cost']:.1%} of the estimated cost on the ANE")
    levels = {"error": {"error"}, "warning": {"error", "warning"}, "never": set()}[args.fail_on]
    return 1 if any(f.severity in levels for f in findings) else 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        status = run(args)
    except mil_executor.PackageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status)


if __name__ == "__main__":
    main()
