"""`--memory low` on a CPU: blocks stream from the model's files instead of being held.

On a GPU, low memory means streaming blocks from host memory to the device (diffusers' group offloading,
executor.py). On a CPU the host memory is the device, so the only place left to stream from is the file: the
transformer's blocks and the text encoder's layers are created empty (meta) and each is read just before it
runs, then dropped, so what is held at any moment is the small parts of the model (embedders, norms, final
layers) plus one block and its activations. Written by hand because neither diffusers nor accelerate reads
weights from disk per forward pass on a CPU (accelerate's disk offload keeps a memory-mapped copy whose touched
pages stay counted in resident memory; here each tensor is read with a positioned read into a buffer that is
freed after the block, runtime.reader).

The next block is read on a helper thread while the current one computes (the read releases the GIL), so a
step costs little more than its arithmetic when the files are in the page cache. The arithmetic is the
resident model's (same modules, same weights, same dtype), so the images are bit-equal to the resident plan's.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

# The block lists streamed, by attribute name: FLUX transformers' double and single blocks, decoder layers
# (Qwen3, Mistral, CLIP), T5's blocks.
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "layers", "block")


def block_modules(model) -> list[tuple[str, object]]:
    """(qualified name, module) of every block in the model's block lists, in the order they run."""
    import torch

    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LISTS:
            found += [(f"{name}.{i}", block) for i, block in enumerate(module)]
    return found


class BlockStream:
    """Fills blocks from the files just before they run and empties them after; reads one block ahead."""

    def __init__(self, tensors, blocks: list[tuple[str, object]], dtype, prefixes=("",)):
        import torch

        self.tensors, self.dtype = tensors, dtype
        self.order = [block for _, block in blocks]
        self.slots: dict[int, list] = {}  # id(block) -> [(module, name, key, is_param, placeholder)]
        for qual, block in blocks:
            slots = []
            for sub, module in block.named_modules():
                for name, p in list(module.named_parameters(recurse=False)):
                    full = ".".join(x for x in (qual, sub, name) if x)
                    key = next((pre + full for pre in prefixes if pre + full in tensors.entries), None)
                    if key is None:
                        from ..errors import UserError

                        path = next(iter(tensors.entries.values()))[0]
                        raise UserError(f"{path.parent} lacks the model's weight {full}")
                    meta = torch.empty(p.shape, dtype=dtype if p.is_floating_point() else p.dtype, device="meta")
                    placeholder = torch.nn.Parameter(meta, requires_grad=False)
                    module._parameters[name] = placeholder
                    slots.append((module, name, key, placeholder))
            self.slots[id(block)] = slots
        self.position = {id(b): i for i, b in enumerate(self.order)}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="fluxlab-stream")
        self.ahead: dict[int, object] = {}  # id(block) -> future of its tensors
        self.lock = threading.Lock()
        self.reads = 0

    def _read(self, block) -> list:
        out = []
        for _module, _name, key, _ph in self.slots[id(block)]:
            value = self.tensors.read(key)
            out.append(value.to(self.dtype) if value.is_floating_point() else value)
        return out

    def _fetch(self, block):
        with self.lock:
            future = self.ahead.pop(id(block), None)
        return future.result() if future is not None else self._read(block)

    def before(self, block, _args) -> None:
        import torch

        values = self._fetch(block)
        for (module, name, _key, _ph), value in zip(self.slots[id(block)], values, strict=True):
            module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
        self.reads += 1
        nxt = self.position[id(block)] + 1
        following = self.order[nxt % len(self.order)]  # after the last block the next step starts again at the first
        with self.lock:
            if id(following) not in self.ahead and following is not block:
                self.ahead[id(following)] = self.pool.submit(self._read, following)

    def after(self, block, _args, _output) -> None:
        for module, name, _key, placeholder in self.slots[id(block)]:
            module._parameters[name] = placeholder

    def drop_ahead(self) -> None:
        """Forget a read ahead (the run ended): its buffers go back now."""
        with self.lock:
            pending, self.ahead = list(self.ahead.values()), {}
        for f in pending:
            f.cancel()
            if not f.cancelled():
                f.result()

    def close(self) -> None:
        self.drop_ahead()
        self.pool.shutdown(wait=True)
        self.tensors.close()


def attach(model, tensors, dtype, prefixes=("",)) -> BlockStream:
    """Make `model`'s blocks stream from `tensors` (their parameters become meta placeholders)."""
    import weakref

    from .heap import keep_own_pages

    # A block's tensors are read on the helper thread, into that thread's heap arena; reused there in ever-new
    # sizes they held 60% more than the blocks on a test model. With pages of their own they go back when freed.
    keep_own_pages()
    blocks = block_modules(model)
    stream = BlockStream(tensors, blocks, dtype, prefixes)
    for _, block in blocks:
        block.register_forward_pre_hook(stream.before)
        block.register_forward_hook(stream.after)
    model.fluxlab_stream = stream
    weakref.finalize(model, stream.close)
    return stream


def is_streamed(module) -> bool:
    return getattr(module, "fluxlab_stream", None) is not None
