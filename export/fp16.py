"""The precision of a TensorRT engine, fixed in the ONNX graph it is built from.

TensorRT 11 builds strongly typed networks only (`NetworkDefinitionCreationFlag.STRONGLY_TYPED`
is "always enabled" in its NvInfer.h; `BuilderFlag.FP16`, `OBEY_PRECISION_CONSTRAINTS` and
`ILayer.precision` / `set_output_type` are gone), and TensorRT 10.12 deprecated the weakly typed
precision controls in favour of strong typing. So an fp16 engine is built from a graph whose types
say fp16: `to_mixed_fp16` rewrites the exported fp32 graph so that

  - the images input and the logits / features output stay fp32 (callers see no change);
  - every `LayerNormalization` reads, computes and writes fp32 (its input is cast up): CLIP's
    residual stream is large enough that a LayerNorm's variance overflows fp16;
  - the head after the last LayerNorm (ln_post, projection, L2 normalisation, the text matmul
    and logit scale) runs in fp32, and so does every data-independent (constant) subgraph;
  - everything else that computes on image data (conv, attention, MLP, adapters, prompts) is
    fp16, with its weights stored as fp16 initializers.

`check_precision` verifies that, independently of how the graph was produced: it is what the
build runs on every graph before TensorRT parses it, for fp16 and fp32 builds alike.
"""
from __future__ import annotations

import numpy as np

from fastprompt.errors import ExportError

FP32, FP16 = 1, 10                      # onnx.TensorProto.FLOAT, FLOAT16
ANY_INPUT_TYPE = {"Shape", "Size", "Cast"}   # ops whose output type does not follow the input's
HEAVY = {"MatMul", "Gemm", "Conv"}
FP16_MAX = 65504.0


def _types(proto) -> dict[str, int]:
    """Element type of every tensor, from strict ONNX type inference (raises on a type error)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except Exception as err:  # onnx raises InferenceError / ValidationError
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ExportError(f"the ONNX graph has inconsistent types: {first}") from None
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for v in list(g.input) + list(g.value_info) + list(g.output):
        types[v.name] = v.type.tensor_type.elem_type
    return types


def _forward(nodes, start: set[str]) -> set[int]:
    """Indices of nodes that read, directly or through other nodes, a tensor in `start`."""
    reached, names = set(), set(start)
    for i, node in enumerate(nodes):  # ONNX nodes are in topological order
        if any(x in names for x in node.input):
            reached.add(i)
            names.update(node.output)
    return reached


def regions(proto) -> tuple[list[int], set[int], set[int]]:
    """(LayerNorm nodes, head nodes after the last LayerNorm, nodes that depend on the images)."""
    nodes = list(proto.graph.node)
    if any(a.type in (5, 10) for n in nodes for a in n.attribute):  # GRAPH / GRAPHS attributes
        raise ExportError("the ONNX graph has control flow (If/Loop/Scan), which the TensorRT "
                          "build does not support")
    norms = [i for i, n in enumerate(nodes) if n.op_type == "LayerNormalization"]
    head = _forward(nodes, set(nodes[norms[-1]].output)) if norms else set()
    data = _forward(nodes, {v.name for v in proto.graph.input})
    return norms, head, data


def to_mixed_fp16(proto):
    """A copy of the fp32 graph `proto` with the fp16 / fp32 split described in the module doc."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    types = _types(proto)
    g = proto.graph
    nodes = list(g.node)
    norms, head, data = regions(proto)
    if not norms:
        raise ExportError("the ONNX graph has no LayerNormalization node, so nothing could be kept "
                          "in fp32 for an fp16 engine: build it with --fp32")
    is_float = lambda name: types.get(name) == FP32  # noqa: E731
    half = {i for i in data - head - set(norms)
            if any(is_float(x) for x in list(nodes[i].input) + list(nodes[i].output))}
    inits = {t.name: t for t in g.initializer}
    now = {name: FP32 for name, t in types.items() if t == FP32}   # current type of float tensors
    copies, casts, out_nodes = {}, {}, []

    def fp16_copy(name):
        if name not in copies:
            arr = numpy_helper.to_array(inits[name])
            if np.abs(arr).max(initial=0.0) > FP16_MAX:
                raise ExportError(f"initializer {name} exceeds the fp16 range: build with --fp32")
            copies[name] = f"{name}__fp16"
            g.initializer.append(numpy_helper.from_array(arr.astype(np.float16), copies[name]))
        return copies[name]

    def cast(name, to):
        if (name, to) not in casts:
            casts[name, to] = f"{name}__to{'16' if to == FP16 else '32'}"
            out_nodes.append(helper.make_node("Cast", [name], [casts[name, to]], to=to,
                                              name=f"{casts[name, to]}_cast"))
        return casts[name, to]

    for i, node in enumerate(nodes):
        want = FP16 if i in half else FP32
        if node.op_type not in ANY_INPUT_TYPE:
            for k, name in enumerate(node.input):
                if not is_float(name):
                    continue
                if want == FP16 and name in inits:
                    node.input[k] = fp16_copy(name)
                elif now[name] != want:
                    node.input[k] = cast(name, want)
        if i in half:
            for attr in node.attribute:
                if (node.op_type, attr.name) == ("Cast", "to"):
                    attr.i = FP16 if attr.i == FP32 else attr.i
                elif (node.op_type, attr.name) == ("ConstantOfShape", "value"):
                    if attr.t.data_type == FP32:
                        attr.t.CopyFrom(numpy_helper.from_array(
                            numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))
                elif attr.name in ("dtype", "to", "value"):
                    raise ExportError(f"cannot convert {node.op_type} node {node.name!r} to fp16 "
                                      f"(typed attribute {attr.name}): build with --fp32")
            now.update({o: FP16 for o in node.output if is_float(o)})
        out_nodes.append(node)
    for out in g.output:  # callers get fp32, as from the fp32 graph
        if now.get(out.name) == FP16:
            inner = f"{out.name}__fp16"
            for node in out_nodes:
                node.output[:] = [inner if o == out.name else o for o in node.output]
                node.input[:] = [inner if x == out.name else x for x in node.input]
            out_nodes.append(helper.make_node("Cast", [inner], [out.name], to=FP32,
                                              name=f"{out.name}_cast"))
    del g.node[:]
    g.node.extend(out_nodes)
    del g.value_info[:]  # stale fp32 annotations (check_precision infers the types afresh)
    used = {x for n in g.node for x in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    onnx.checker.check_model(proto)
    return proto


def check_precision(proto, fp16: bool) -> dict:
    """Refuse a graph whose types do not give the engine the precision the build asks for.

    Both builds: images in and the output are fp32; every LayerNormalization reads its input,
    scale and bias and writes its output in fp32; every node of the head after the last
    LayerNorm computes in fp32. fp16 build: every MatMul / Gemm / Conv before the head takes fp16
    inputs (otherwise the "fp16" engine silently runs in fp32). fp32 build: no fp16 tensor at all.
    Returns counts for the log.
    """
    types = _types(proto)
    nodes = list(proto.graph.node)
    norms, head, data = regions(proto)
    name = lambda t: {FP32: "fp32", FP16: "fp16"}.get(t, f"type {t}")  # noqa: E731
    for v in list(proto.graph.input) + list(proto.graph.output):
        if types.get(v.name) != FP32:
            raise ExportError(f"graph {'input' if v in proto.graph.input else 'output'} {v.name} "
                              f"is {name(types.get(v.name))}, expected fp32")
    floating = (FP32, FP16)
    for i in list(norms) + sorted(head):
        n = nodes[i]
        for t in list(n.input) + list(n.output):
            if t and types.get(t) in floating and types[t] != FP32 and not (
                    n.op_type == "Cast" and t in n.input):
                where = "LayerNormalization" if i in norms else "head"
                raise ExportError(f"{where} node {n.name or n.op_type!r} has {name(types[t])} "
                                  f"tensor {t}: normalisations and the head must run in fp32")
    half_tensors = {t for t, ty in types.items() if ty == FP16}
    heavy = [n for i, n in enumerate(nodes) if n.op_type in HEAVY and i in data and i not in head]
    heavy16 = [n for n in heavy if all(types.get(x) == FP16 for x in n.input[:2])]
    if fp16 and (not norms or len(heavy16) != len(heavy) or not heavy):
        raise ExportError(f"an fp16 build needs fp16 matmuls / convolutions before the head and "
                          f"fp32 LayerNorms: {len(heavy16)} of {len(heavy)} are fp16, "
                          f"{len(norms)} LayerNorms")
    if not fp16 and half_tensors:
        raise ExportError(f"an fp32 build got a graph with {len(half_tensors)} fp16 tensors "
                          f"(e.g. {sorted(half_tensors)[0]})")
    return {"fp32_norms": len(norms), "fp32_head_nodes": len(head), "fp16_matmuls": len(heavy16)}
