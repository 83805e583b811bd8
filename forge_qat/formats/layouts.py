"""Checkpoint layouts: which checkpoint tensors make up each model parameter, for readers that stream.

Called by the ZeRO-3 streamed loader and consolidation (`forge_qat.distributed.zero`) and the streaming
finalize. Published MoE checkpoints store experts one by one (`mlp.experts.3.gate_proj.weight`);
transformers 5 models hold them fused (`mlp.experts.gate_up_proj`, (experts, 2I, H)), and
`from_pretrained` converts between the two with transformers' conversion mapping. Streaming readers
cannot call that conversion (it materialises whole stacks), so this module reads the same mapping
(`get_model_conversion_mapping`, `rename_source_key`: no table of our own per architecture) and turns each
model parameter into the ordered checkpoint tensors whose flattened values, one after another, are the
parameter's flattened values. That holds for the operations MoE conversions use, `MergeModulelist(dim=0)`
optionally followed by `Concatenate(dim=1)`; a checkpoint that needs any other operation is refused with
its name. The same map, read backwards, writes a model's tensors in the checkpoint's own layout.
"""

import re
from dataclasses import dataclass, field

import torch

from forge_qat.errors import InputError
from forge_qat.formats.weights import TensorReader, tied_aliases, true_shape


@dataclass(frozen=True, slots=True)
class Piece:
    key: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class Layout:
    """Model parameter name -> the checkpoint tensors it is made of, in flattened order."""

    pieces: dict[str, list[Piece]] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    """Checkpoint tensors that map onto no model tensor."""

    @property
    def converted(self) -> list[str]:
        """Model tensors assembled from several checkpoint tensors (fused expert stacks)."""
        return [name for name, p in self.pieces.items() if len(p) > 1]

    def checkpoint_tensors(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """`tensor` (the model's `name`) as the checkpoint stored it: views, no copies."""
        pieces = self.pieces.get(name)
        if pieces is None:
            return [(name, tensor)]
        flat, out, offset = tensor.reshape(-1), [], 0
        for p in pieces:
            out.append((p.key, flat[offset:offset + p.numel].view(p.shape)))
            offset += p.numel
        return out

    def checkpoint_keys(self, names: list[str]) -> list[str]:
        return [p.key for n in names for p in self.pieces.get(n, [Piece(n, ())])]


def _model_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `model` holds (tied aliases once), with its true shape."""
    tied = tied_aliases(model)
    shapes = {n: true_shape(p) for n, p in model.named_parameters() if n not in tied}
    shapes.update({n: tuple(b.shape) for n, b in model.named_buffers() if n in model.state_dict()})
    return shapes


def _expert_index(key: str, pattern: str) -> int:
    match = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
    if match is None:
        raise InputError(f"cannot find the expert index of {key} (pattern {pattern})")
    return int(match.group(1))


def _fused_pieces(target: str, shape: tuple[int, ...], converter, members: list[tuple[str, str]],
                  shape_of) -> list[Piece]:
    """The checkpoint tensors of one fused stack, in flattened order, checked against its shape."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
        raise InputError(f"{target}: the checkpoint stores it in a layout forge's streaming readers cannot "
                         f"assemble slice by slice (transformers converts it with {[o for o, _ in ops]}); load "
                         f"it on one process, or save it once with transformers' save_pretrained")
    order = {p: i for i, p in enumerate(converter.source_patterns)}
    ranked = sorted(members, key=lambda kp: (_expert_index(kp[0], kp[1]), order[kp[1]]))
    pieces = [Piece(key, tuple(shape_of(key))) for key, _ in ranked]
    experts = len({_expert_index(k, p) for k, p in members})
    per_expert = len(converter.source_patterns)
    fits = (len(pieces) == experts * per_expert and shape[0] == experts
            and all(p.shape[1:] == shape[2:] for p in pieces)
            and all(sum(p.shape[0] for p in pieces[e * per_expert:(e + 1) * per_expert]) == shape[1]
                    for e in range(experts)))
    if not fits:
        raise InputError(f"{target} {list(shape)} cannot be assembled from the checkpoint's "
                         f"{len(pieces)} tensors {[list(p.shape) for p in pieces[:4]]}...")
    return pieces


def checkpoint_layout(model: torch.nn.Module, keys: set[str], shape_of) -> Layout:
    """How the checkpoint tensors `keys` (shapes from `shape_of(key)`) make up `model`'s tensors."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    shapes = _model_shapes(model)
    tied = tied_aliases(model)
    meta = dict.fromkeys(list(shapes) + list(tied), True)
    layout = Layout()
    groups: dict[str, list[tuple[str, str]]] = {}
    for key in sorted(keys):
        target, pattern = rename_source_key(key, renamings, converters, getattr(model, "base_model_prefix", None),
                                            meta)
        if target in tied:
            continue  # stored once, under the name it is tied to
        if target not in shapes:
            layout.unexpected.append(key)
        elif pattern is None:
            layout.pieces[target] = [Piece(key, tuple(shape_of(key)))]
        else:
            groups.setdefault(target, []).append((key, pattern))
    for target, members in groups.items():
        converter = next(c for c in converters if members[0][1] in c.source_patterns)
        layout.pieces[target] = _fused_pieces(target, shapes[target], converter, members, shape_of)
    return layout


class LayoutReader:
    """A tensor reader (`keys` / `shape` / `read_flat`) that serves a model's tensor names from a reader
    of a checkpoint in another layout, one slice at a time: a read that spans several checkpoint tensors
    reads each part straight into its place in `out`."""

    def __init__(self, reader: TensorReader, layout: Layout, shapes: dict[str, tuple[int, ...]]):
        self.reader, self.layout = reader, layout
        self._shapes = {n: shapes[n] for n in layout.pieces}

    def keys(self) -> set[str]:
        return set(self._shapes)

    def shape(self, name: str) -> list[int]:
        return list(self._shapes[name])

    def read_flat(self, name: str, start: int, out: torch.Tensor) -> None:
        pieces, want, offset, filled = self.layout.pieces[name], out.numel(), 0, 0
        for p in pieces:
            lo, hi = max(start, offset), min(start + want, offset + p.numel)
            if lo < hi:
                self.reader.read_flat(p.key, lo - offset, out.view(-1)[filled:filled + hi - lo])
                filled += hi - lo
            offset += p.numel
        if filled != want:
            raise InputError(f"{name}: asked for elements [{start}, {start + want}) of {offset}")


def model_layout_reader(reader: TensorReader, model: torch.nn.Module) -> LayoutReader:
    """`reader` (over a checkpoint) seen under `model`'s tensor names."""
    return LayoutReader(reader, checkpoint_layout(model, reader.keys(), reader.shape), _model_shapes(model))
