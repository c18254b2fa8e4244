"""KV-cache helpers: a CPU KV cache in a sealed memfd, viewed from numpy and
torch, and the export of an engine's CUDA KV tensors."""
from . import _kvlink
from .errors import Error


class CpuKvCache(_kvlink._CpuKvCache):
    """The KV cache of a cpu_memfd layout: a sealed memfd the server maps,
    and this process's mapping of it. Register it with
    `worker.register_kv_caches(cache.layout, cache.fd)`; read and write the
    blocks through numpy() or torch_layers(), which share its memory (they
    keep it alive)."""

    def __init__(self, layout, name="kvlink-kv"):
        super().__init__(layout, name)

    def numpy(self):
        """The whole region as a writable uint8 numpy array."""
        import numpy
        return numpy.frombuffer(self, dtype=numpy.uint8)

    def torch_layers(self, dtype):
        """One torch tensor per layer, shaped [num_planes, num_blocks,
        block_size, num_kv_heads, head_size] (vLLM's layout) with the
        layout's strides, viewing the memfd's memory."""
        import torch
        layout = self.layout
        size = torch.empty((), dtype=dtype).element_size()
        if size != layout.dtype_size:
            raise Error("bad_request", f"dtype {dtype} has {size}-byte elements but the layout's dtype_size is "
                                       f"{layout.dtype_size}: pass the dtype the layout was made for")
        for name in ("block_stride", "plane_stride"):
            if getattr(layout, name) % size:
                raise Error("bad_request", f"the layout's {name} is not a multiple of the element size {size}")
        flat = torch.frombuffer(self, dtype=torch.uint8).view(dtype)
        shape = (layout.num_planes, layout.num_blocks, layout.block_size, layout.num_kv_heads, layout.head_size)
        stride = (layout.plane_stride // size, layout.block_stride // size,
                  layout.num_kv_heads * layout.head_size, layout.head_size, 1)
        return [flat.as_strided(shape, stride, loc.offset // size) for loc in layout.layers]


def export_kv_cache(tensors, num_planes=2):
    """The cuda_ipc KvLayout of an engine's paged KV tensors (one per layer,
    all of one shape on one device), for worker.register_kv_caches(layout).

    Shapes: vLLM's [2, num_blocks, block_size, num_kv_heads, head_size]
    (planes first) or [num_blocks, 2, block_size, ...] (blocks first); MLA
    (num_planes=1): [num_blocks, block_size, num_kv_heads, head_size]. Each
    block of a plane must be contiguous; the strides are taken from the
    tensors. Reads only the tensors' attributes: no CUDA call in Python."""
    if not _kvlink.have_cuda:
        raise Error("bad_request", "this kvlink was built without CUDA: rebuild it where nvcc (12.8+) is found")
    tensors = list(tensors)
    if not tensors:
        raise Error("bad_request", "export_kv_cache needs one tensor per layer, got none")
    first = tensors[0]
    for i, t in enumerate(tensors):
        if t.device.type != "cuda":
            raise Error("bad_request", f"layer {i} is on {t.device}, not a CUDA device: export_kv_cache takes the "
                                       "engine's GPU KV tensors (for a CPU cache use CpuKvCache)")
        if tuple(t.shape) != tuple(first.shape) or tuple(t.stride()) != tuple(first.stride()) \
                or t.dtype != first.dtype or t.device != first.device:
            raise Error("bad_request", f"layer {i} differs from layer 0 in shape, strides, dtype or device: "
                                       "every layer must have the same")
    size = first.element_size()
    shape, stride = list(first.shape), [s * size for s in first.stride()]
    if num_planes == 1:
        if len(shape) != 4:
            raise Error("bad_request", f"an MLA layer is [num_blocks, block_size, heads, head_size], got {shape}")
        shape = [1] + shape
        stride = [0] + stride
        plane_axis, block_axis = 0, 1
    else:
        if len(shape) != 5:
            raise Error("bad_request", f"a layer is [2, num_blocks, block_size, heads, head_size] or "
                                       f"[num_blocks, 2, ...], got shape {shape}")
        plane_axis, block_axis = (0, 1) if shape[0] == num_planes else (1, 0)
        if shape[plane_axis] != num_planes:
            raise Error("bad_request", f"no axis of size num_planes={num_planes} first or second in shape {shape}")
    block_size, heads, head_size = shape[2], shape[3], shape[4]
    if stride[4] != size or stride[3] != head_size * size or stride[2] != heads * head_size * size:
        raise Error("bad_request", "each block of a plane must be contiguous (block_size x heads x head_size)")
    return _kvlink._export_kv_cache(
        [t.data_ptr() for t in tensors], num_blocks=shape[block_axis], block_size=block_size, num_kv_heads=heads,
        head_size=head_size, dtype_size=size, num_planes=num_planes, block_stride=stride[block_axis],
        plane_stride=stride[plane_axis] if num_planes > 1 else 0)
