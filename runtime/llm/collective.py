"""The all-reduce used by tensor-parallel graphs.

In PyTorch it is the custom op `vlmc::all_reduce` (so torch.export keeps it as one node); in a compiled graph
it becomes a call to the packed function "vlmc.all_reduce", which the runtime implements with
torch.distributed over gloo on host memory (tensor parallelism runs on the CPU: a tp > 1 artifact on a GPU is
refused, there is no NCCL path yet). One graph therefore serves every rank.
"""

from __future__ import annotations

import torch

PACKED_NAME = "vlmc.all_reduce"


@torch.library.custom_op("vlmc::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(out)
    return out


@all_reduce.register_fake
def _all_reduce_shape(x):
    return torch.empty_like(x)


def register_packed_all_reduce() -> None:
    """Make "vlmc.all_reduce" (input, output) available to compiled graphs in this process."""
    import tvm

    if tvm.get_global_func(PACKED_NAME, allow_missing=True) is not None:
        return

    def _all_reduce(x, out):
        src, dst = torch.from_dlpack(x), torch.from_dlpack(out)
        dst.copy_(src)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(dst)

    tvm.register_global_func(PACKED_NAME, _all_reduce)


def relax_converter(node, importer):
    """torch.export node vlmc.all_reduce -> R.call_dps_packed("vlmc.all_reduce", x)."""
    from tvm import relax

    x = importer.env[node.args[0]]
    return importer.block_builder.emit(relax.call_dps_packed(PACKED_NAME, [x], x.ty))


CUSTOM_CONVERTERS = {"all_reduce.default": relax_converter}
