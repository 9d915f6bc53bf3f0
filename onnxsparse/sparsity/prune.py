"""The prune pass: decide each weight-bearing layer's pattern and sparsity, mask, write back."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxsparse import model as model_io
from onnxsparse.errors import OnnxSparseError, UsageError
from onnxsparse.sparsity.budget import global_sparsities
from onnxsparse.sparsity.criteria import CRITERIA, make_criterion
from onnxsparse.sparsity.patterns import NM, MatrixShape, Pattern, parse_pattern
from onnxsparse.sparsity.recipe import Recipe, Rule, load_recipe, recipe_from_dict


@dataclass(frozen=True)
class LayerResult:
    """What happened to one weight-bearing layer."""

    node_name: str
    op_type: str
    weight_shape: tuple[int, ...]
    pattern: str  # the pattern's spec, or "dense" when left alone
    target_sparsity: float | None
    sparsity: float  # the fraction of zeros after pruning
    note: str = ""


@dataclass(frozen=True)
class PruneResult:
    model: onnx.ModelProto
    layers: tuple[LayerResult, ...]

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all weight-bearing layers' weights."""
        sizes = np.array([np.prod(layer.weight_shape) for layer in self.layers], dtype=np.float64)
        zeros = np.array([layer.sparsity for layer in self.layers]) * sizes
        return float(zeros.sum() / sizes.sum()) if sizes.sum() else 0.0


@dataclass(frozen=True)
class _Plan:
    ref: model_io.WeightRef
    pattern: Pattern | None
    sparsity: float | None
    criterion: str
    note: str = ""
    shares_global_budget: bool = False


def prune(model: onnx.ModelProto, pattern: str | None = None, sparsity: float | None = None,
          **options) -> onnx.ModelProto:
    """Prune a model's weights into `pattern` at `sparsity`; returns a new ModelProto.

    Options as in prune_model (criterion, scope, exclude, include, recipe, cap_mismatched, seed).
    """
    return prune_model(model, pattern, sparsity, **options).model


def prune_model(
    model: onnx.ModelProto,
    pattern: str | None = None,
    sparsity: float | None = None,
    *,
    criterion: str = "l1",
    scope: str = "local",
    exclude: str | None = None,
    include: str | None = None,
    recipe: Recipe | dict | str | Path | None = None,
    cap_mismatched: float | None = None,
    seed: int = 0,
    on_layer: Callable[[str], None] | None = None,
) -> PruneResult:
    """Prune and report per layer. The input model is not modified.

    pattern/sparsity/criterion apply to every layer no recipe rule names; `scope="global"` ranks
    those layers' units together so that `sparsity` holds over all of them. The first conv and
    depthwise convs stay dense unless `include` or a recipe rule names them; `cap_mismatched`
    caps layers whose input and output channel counts differ (the MCBBS flow uses 0.5).
    """
    if scope not in ("local", "global"):
        raise UsageError(f"unknown scope {scope!r}; use local or global")
    if criterion not in CRITERIA:
        raise UsageError(f"unknown criterion {criterion!r}; use one of: {', '.join(CRITERIA)}")
    if cap_mismatched is not None and not 0.0 <= cap_mismatched < 1.0:
        raise UsageError(f"cap {cap_mismatched} is outside [0, 1)")
    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe)
    elif isinstance(recipe, dict):
        recipe = recipe_from_dict(recipe)
    if pattern is None and recipe is None:
        raise UsageError("nothing to do: give a pattern (e.g. --pattern 2:4) or a recipe")
    default = Rule(match="", pattern=pattern, sparsity=sparsity, criterion=criterion)
    if recipe is not None:
        default = Rule(match="", pattern=recipe.defaults.pattern or pattern,
                       sparsity=_first(recipe.defaults.sparsity, sparsity),
                       criterion=recipe.defaults.criterion or criterion)

    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    refs = model_io.find_weights(pruned)
    if not refs:
        raise OnnxSparseError("the model has no prunable weights (Conv, ConvTranspose, Gemm or MatMul "
                              "with a constant weight); nothing to prune")
    _check_regexes_match(refs, exclude, include, recipe)
    first_layers = _first_conv_layers(pruned, refs)
    plans = [_plan(ref, default, recipe, exclude, include, ref.node_index in first_layers, cap_mismatched)
             for ref in refs]
    if scope == "global":
        plans = _share_global_budget(pruned, plans, default, seed)

    results = []
    for plan in plans:
        if on_layer is not None:
            on_layer(plan.ref.node_name)
        results.append(_apply(pruned, plan, seed))
    model_io.remove_unused(pruned)
    model_io.check_model(pruned)
    return PruneResult(pruned, tuple(results))


def _first(*values):
    return next((value for value in values if value is not None), None)


def _names(ref: model_io.WeightRef) -> tuple[str, str]:
    return ref.node_name, ref.tensor_name


def _check_regexes_match(refs, exclude, include, recipe: Recipe | None) -> None:
    """A regex that finds no layer is almost always a typo: say so rather than prune silently."""
    checks = [("--exclude", exclude), ("--include", include)]
    if recipe is not None:
        checks += [(f"recipe layers[{i}] match", rule.match) for i, rule in enumerate(recipe.rules)]
    examples = ", ".join(ref.node_name for ref in refs[:4])
    for what, regex in checks:
        if regex is None:
            continue
        try:
            compiled = re.compile(regex)
        except re.error as exc:
            raise UsageError(f"{what} {regex!r} is not a valid regex ({exc})") from exc
        if not any(compiled.search(name) for ref in refs for name in _names(ref)):
            raise UsageError(f"{what} {regex!r} matches no weight-bearing node; names look like: {examples}"
                             " (see `onnxsparse stats`)")


def _first_conv_layers(model: onnx.ModelProto, refs) -> set[int]:
    """Conv nodes reached from a graph input without passing another weight-bearing node."""
    weight_nodes = {ref.node_index for ref in refs}
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(model.graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
    initializers = {init.name for init in model.graph.initializer}
    frontier = [inp.name for inp in model.graph.input if inp.name not in initializers]
    seen_tensors, first = set(frontier), set()
    while frontier:
        tensor = frontier.pop()
        for index in consumers.get(tensor, []):
            if index in weight_nodes:
                first.add(index)
                continue
            for out in model.graph.node[index].output:
                if out not in seen_tensors:
                    seen_tensors.add(out)
                    frontier.append(out)
    return {index for index in first if model.graph.node[index].op_type == "Conv"}


def _plan(ref, default: Rule, recipe: Recipe | None, exclude, include, is_first_conv: bool,
          cap_mismatched: float | None) -> _Plan:
    rule = recipe.rule_for(*_names(ref)) if recipe is not None else None
    named = rule is not None or (include is not None and any(re.search(include, n) for n in _names(ref)))
    if rule is None and exclude is not None and any(re.search(exclude, n) for n in _names(ref)):
        return _Plan(ref, None, None, default.criterion, "excluded")
    rule = rule or Rule(match="")
    pattern_text = rule.pattern or default.pattern
    if pattern_text is None or pattern_text.strip().lower() == "dense":
        return _Plan(ref, None, None, default.criterion, "dense by recipe" if pattern_text else "no rule")
    pattern = parse_pattern(pattern_text)
    sparsity = _first(rule.sparsity, default.sparsity, pattern.fixed_sparsity)
    if sparsity is None:
        raise UsageError(f"node {ref.node_name}: pattern {pattern.spec} needs a sparsity (e.g. --sparsity 0.75)")
    pattern.check_sparsity(sparsity)
    criterion = rule.criterion or default.criterion
    layout = ref.layout
    if not named and is_first_conv:
        return _Plan(ref, None, None, criterion, "first conv kept dense (name it with --include to prune)")
    if not named and ref.op_type == "Conv" and layout.groups > 1 and layout.strip_length == 1:
        return _Plan(ref, None, None, criterion, "depthwise kept dense (name it with --include to prune)")
    reason = pattern.too_small(_matrix_shape(layout))
    if reason:
        return _Plan(ref, None, None, criterion, f"too small for {pattern.spec}: {reason}")
    note = ""
    if cap_mismatched is not None and layout.in_channels != layout.out_channels and sparsity > cap_mismatched:
        if isinstance(pattern, NM):
            note = f"in {layout.in_channels} != out {layout.out_channels}, but {pattern.spec} fixes its sparsity"
        else:
            sparsity = pattern.floor_valid(cap_mismatched)
            note = f"capped at {sparsity:g} (in {layout.in_channels} != out {layout.out_channels})"
    return _Plan(ref, pattern, sparsity, criterion, note,
                 shares_global_budget=rule.sparsity is None and not note)


def _matrix_shape(layout: model_io.WeightLayout) -> MatrixShape:
    return MatrixShape(layout.out_channels, layout.kernel_positions, layout.strip_length)


def _share_global_budget(model, plans: list[_Plan], default: Rule, seed: int) -> list[_Plan]:
    sharing = [i for i, plan in enumerate(plans) if plan.shares_global_budget
               and plan.pattern is not None and plan.pattern.spec == parse_pattern(default.pattern).spec]
    if not sharing:
        return plans
    pattern = plans[sharing[0]].pattern
    if pattern.fixed_sparsity is not None:
        raise UsageError(f"global scope needs a pattern whose sparsity can vary per layer; {pattern.spec} "
                         "fixes it in every layer (use --scope local)")
    refs = [plans[i].ref for i in sharing]
    sparsities = global_sparsities(
        [model_io.read_matrix(model, ref) for ref in refs],
        [_matrix_shape(ref.layout) for ref in refs],
        pattern, default.sparsity,
        [make_criterion(plans[i].criterion, seed=seed, key=plans[i].ref.node_name) for i in sharing],
    )
    plans = list(plans)
    for index, layer_sparsity in zip(sharing, sparsities):
        plans[index] = _Plan(plans[index].ref, pattern, layer_sparsity, plans[index].criterion,
                             "global", shares_global_budget=True)
    return plans


def _apply(model: onnx.ModelProto, plan: _Plan, seed: int) -> LayerResult:
    ref = plan.ref
    matrix = model_io.read_matrix(model, ref)
    if plan.pattern is not None:
        shape = _matrix_shape(ref.layout)
        criterion = make_criterion(plan.criterion, seed=seed, key=ref.node_name)
        mask = plan.pattern.mask(matrix, shape, plan.sparsity, criterion)
        matrix = np.where(mask, matrix, np.zeros((), matrix.dtype))
        model_io.write_matrix(model, ref, matrix)
    return LayerResult(
        node_name=ref.node_name, op_type=ref.op_type, weight_shape=ref.layout.onnx_shape,
        pattern=plan.pattern.spec if plan.pattern is not None else "dense",
        target_sparsity=plan.sparsity, sparsity=1.0 - np.count_nonzero(matrix) / matrix.size,
        note=plan.note,
    )
