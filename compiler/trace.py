"""Tracing: torch.export of one paged step into an aten FX graph with dynamic batch and sequence dims.

Two graphs per model, from one export: "prefill" (S dynamic) and "decode" (S = 1). Both take the same inputs:
  input_ids [B, S] int64, positions [B, S] int64, k_cache / v_cache [L, NB, BS, Hkv, D],
  block_table [B, MB] int64, past_lens [B] int64, last_index [B] int64,
  slot_mapping [B, S] int64 (the flat cache slot block * BS + offset of each new token, -1 for batch padding)
and return (logits [B, V], new_k [L, B, S, Hkv, D], new_v [L, B, S, Hkv, D]).
The model does not read slot_mapping (export keeps it as a placeholder): the fuse_kv_write pass makes the graph
write the step's keys and values into the cache at those slots; without that pass the runtime writes new_k/new_v.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.export import Dim

from llmc.compiler.stitch import StitchError, stitch
from llmc.models import PagedKV, Transformer


class PagedStep(nn.Module):
    """Adapts `Transformer` to flat tensor inputs, the form torch.export and the runtime share."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids, positions, k_cache, v_cache, block_table, past_lens, last_index, slot_mapping):
        return self.model(input_ids, positions, PagedKV(k_cache, v_cache, block_table, past_lens), last_index)


@dataclass
class Traced:
    """One traced graph: placeholders are the user inputs (llmc.common.contract.STEP_INPUTS), weights are get_attr
    nodes whose attribute names are the weights' flat names ("layers_0_self_attn_q_proj_weight")."""

    name: str  # "prefill" | "decode"
    gm: torch.fx.GraphModule


def flat_name(fqn: str) -> str:
    return fqn.replace(".", "_")


def unlift(ep: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """The exported graph with parameters, buffers and constants turned from inputs into attributes.

    Passes then see weights as get_attr nodes they can read, fold and replace, and the graph's inputs are
    only the runtime's tensors. Tied weights stay one attribute (export lifts a shared tensor once).
    """
    from torch.export.graph_signature import InputKind

    gm = torch.fx.GraphModule(torch.nn.Module(), ep.graph_module.graph)
    tensors = {**ep.state_dict, **ep.constants}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, spec in zip(placeholders, ep.graph_signature.input_specs, strict=True):
        if spec.kind == InputKind.USER_INPUT:
            node.target = node.name = spec.arg.name
            continue
        if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            raise NotImplementedError(f"exported input of kind {spec.kind} is not supported")
        name = flat_name(spec.target.removeprefix("model."))
        tensor = tensors[spec.target]
        gm.register_buffer(name, tensor.detach()) if not hasattr(gm, name) else None
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
        attr.meta = dict(node.meta)
        node.replace_all_uses_with(attr)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def example_inputs(model: Transformer, batch: int, seq: int, block_size: int, device="cpu"):
    """Inputs whose sizes are all distinct and > 1, so export specializes none of the dynamic dims. Every
    sequence's table holds block 0, so slot_mapping is all -1: a graph that writes the cache writes nothing."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    num_blocks, max_blocks = 11, 3
    cache = torch.zeros(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device)
    return (
        torch.zeros(batch, seq, dtype=torch.long, device=device),
        torch.arange(seq, device=device).repeat(batch, 1),
        cache, cache.clone(),
        torch.zeros(batch, max_blocks, dtype=torch.long, device=device),
        torch.zeros(batch, dtype=torch.long, device=device),
        torch.full((batch,), seq - 1, dtype=torch.long, device=device),
        torch.full((batch, seq), -1, dtype=torch.long, device=device),
    )


def cache_slots(block_table: torch.Tensor, past_lens: torch.Tensor, seq: int, block_size: int) -> torch.Tensor:
    """[B, S] int64: the flat cache slot (block * block_size + offset) of position past_lens[b] + i, read from
    the block table; -1 where the table has no block for that position."""
    positions = past_lens[:, None] + torch.arange(seq, device=past_lens.device)
    index = positions // block_size
    blocks = block_table.gather(1, index.clamp(max=block_table.shape[1] - 1))
    return torch.where(index < block_table.shape[1], blocks * block_size + positions % block_size, -1)


def specialize_decode(prefill: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The decode graph: a copy of the prefill graph with the sequence length fixed to 1.

    The prefill graph is dynamic in S and exact at S = 1 (tested), so one export serves both: exporting twice
    would double the slowest step of a compile. The copy shares the weight tensors; with S a literal 1, passes
    and kernels can specialise decode (M = batch rows).
    """
    graph = torch.fx.Graph()
    env: dict = {}
    out = graph.graph_copy(prefill.graph, env)
    graph.output(out)
    gm = torch.fx.GraphModule(prefill, graph)
    seq_inputs = {n for n in gm.graph.nodes if n.op == "placeholder" and n.target in ("input_ids", "positions")}
    for node in list(gm.graph.nodes):
        if node.target == torch.ops.aten.sym_size.int and node.args[0] in seq_inputs and node.args[1] == 1:
            for user in list(node.users):
                user.args = torch.fx.node.map_arg(user.args, lambda a: 1 if a is node else a)
                user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda a: 1 if a is node else a)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def place_on(gm: torch.fx.GraphModule, device: torch.device) -> None:
    """Rewrites the device arguments the meta trace recorded (arange(..., device=meta)) to `device`; graph.json
    drops them again and the runtime chooses its own."""
    def swap(a):
        return device if isinstance(a, torch.device) else a

    for node in gm.graph.nodes:
        node.args = torch.fx.node.map_aggregate(node.args, swap)
        node.kwargs = torch.fx.node.map_aggregate(node.kwargs, swap)
    gm.recompile()


def bind_weights(gm: torch.fx.GraphModule, model: Transformer, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Replaces the graph's meta weights with real ones streamed by parameter name, then its buffers.

    Tied embeddings are one attribute under whichever of the two names export kept. Raises if a weight the graph
    reads was not supplied.
    """
    aliases = {"embed_tokens.weight": "lm_head.weight", "lm_head.weight": "embed_tokens.weight"}
    for name, tensor in weights:
        names = [name, aliases[name]] if model.config.tie_word_embeddings and name in aliases else [name]
        for attr in map(flat_name, names):
            if hasattr(gm, attr):  # a weight the graph never reads is dropped
                setattr(gm, attr, tensor)
    for name, buffer in model.real_buffers().items():
        if hasattr(gm, flat_name(name)):
            setattr(gm, flat_name(name), buffer)
    unbound = [n.target for n in gm.graph.nodes if n.op == "get_attr" and getattr(gm, n.target).device.type == "meta"]
    if unbound:
        raise ValueError(f"no weight supplied for {unbound[0]} ({len(unbound)} in all)")


def unbind_weights(gm: torch.fx.GraphModule) -> None:
    """Replaces the tensors gm's get_attr nodes read by meta tensors of the same shape and dtype."""
    for target in {n.target for n in gm.graph.nodes if n.op == "get_attr"}:
        tensor = getattr(gm, target)
        if isinstance(tensor, torch.Tensor):
            setattr(gm, target, torch.empty_like(tensor, device="meta"))


def share_weights(gm: torch.fx.GraphModule, source: torch.fx.GraphModule) -> list[str]:
    """Makes gm read source's tensor wherever the two name one (the passes' naming rule: one name, one value);
    returns the names gm reads that source lacks, in graph order."""
    missing = []
    for target in dict.fromkeys(n.target for n in gm.graph.nodes if n.op == "get_attr"):
        tensor, own = getattr(source, target, None), getattr(gm, target)
        if not isinstance(tensor, torch.Tensor):
            missing.append(target)
        elif (tensor.shape, tensor.dtype) != (own.shape, own.dtype):
            raise ValueError(f"graphs disagree on tensor {target}: a pass must give new tensors new names")
        else:
            setattr(gm, target, tensor)
    return missing


def export_step(model: Transformer, block_size: int) -> torch.fx.GraphModule:
    """The unlifted aten graph of one paged step of `model`, dynamic in batch, sequence and cache sizes."""
    step = PagedStep(model).eval()
    # Dim.AUTO rather than named Dims: the symbolic solver cannot prove some of SDPA's contiguity guards
    # (min(a + b*MB, 3a + 3b*MB) == a + b*MB), which are true for every size; AUTO keeps the dims dynamic.
    auto = Dim.AUTO
    shapes = ({0: auto, 1: auto}, {0: auto, 1: auto}, {1: auto}, {1: auto}, {0: auto, 1: auto}, {0: auto}, {0: auto},
              {0: auto, 1: auto})
    device = next(model.parameters()).device
    with torch.no_grad(), warnings.catch_warnings():
        # torch's own pytree internals warn about their deprecated LeafSpec on every export; not ours to fix.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        ep = torch.export.export(step, example_inputs(model, 2, 5, block_size, device), dynamic_shapes=shapes)
        return unlift(ep.run_decompositions({}))


def trace(model: Transformer, block_size: int, weights: Iterable[tuple[str, torch.Tensor]] | None = None,
          stitch_layers: bool = True) -> list[Traced]:
    """Exports the prefill graph of `model` and derives the decode graph.

    Tracing always runs on a meta-device copy of the model: the graphs then never depend on the build machine
    or on whether weights are bound (a bundle bound later with `llmc bind` gets the same graphs), and tracing
    touches no weight memory. `weights` (parameter name, tensor) are bound into the graphs afterwards.
    Models of more than two layers export two and replay the second (compiler/stitch.py): exporting 36 layers
    took most of a compile; stitch_layers=False exports every layer (the tests compare the two).
    """
    if next(model.parameters()).device.type != "meta":
        weights = weights if weights is not None else model.named_parameters()
        dtype = next(model.parameters()).dtype
        with torch.device("meta"):
            model = Transformer(model.config).to(dtype)
    prefill = None
    if stitch_layers and model.config.num_layers > 2:
        with torch.device("meta"):
            two = Transformer(dataclasses.replace(model.config, num_layers=2)).to(next(model.parameters()).dtype)
        prefill = export_step(two, block_size)
        try:
            stitch(prefill, model.config.num_layers)
        except StitchError as error:  # a model whose layers differ: export it whole
            warnings.warn(f"exporting all {model.config.num_layers} layers ({error})", stacklevel=2)
            prefill = None
    if prefill is None:
        prefill = export_step(model, block_size)
    place_on(prefill, torch.device("cpu"))
    if weights is not None:
        bind_weights(prefill, model, weights)
    return [Traced("prefill", prefill), Traced("decode", specialize_decode(prefill))]
