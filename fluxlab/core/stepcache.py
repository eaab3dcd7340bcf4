"""First Block Cache for transformers diffusers' hook cannot run: FLUX.2's.

Written here because diffusers' `FirstBlockCacheConfig` hook fails on `Flux2Transformer2DModel` (its double blocks
return the text and image streams apart, its single blocks one concatenated tensor, and the hook subtracts one from
the other: diffusers issue 14280, fix not released). FLUX.1 uses diffusers' hook itself (core.stages.step_cache).

The rule is diffusers' own, step for step, so the two agree wherever both run (a test runs this class on FLUX.1
beside diffusers' hook): the first block runs every step; when its image-stream residual moved by at most
`threshold` (mean |r - r_prev| / mean |r_prev|) since the last fully computed step, the other blocks are skipped and
the first block's output gets the residual the other blocks added last time. Each call context ("cond",
"uncond") keeps its own state. Installed for one denoising run and removed after it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _State:
    compute: bool = True
    head_residual: object = None  # the first block's image residual at the last computed step
    head_out: tuple | None = None  # (text, image) streams after the first block at that step
    tail_residuals: tuple | None = None  # (image, text) added by the other blocks at that step


class FirstBlockCache:
    def __init__(self, transformer, threshold: float):
        self.threshold = threshold
        self.blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        self.states: dict = {}
        self.name = None

    # -- life ---------------------------------------------------------------------------------------
    def install(self) -> FirstBlockCache:
        roles = [self._head] + [self._middle] * (len(self.blocks) - 2) + [self._tail]
        for block, role in zip(self.blocks, roles, strict=True):
            original = block.forward
            block.forward = lambda *a, _role=role, _f=original, **k: _role(_f, *a, **k)
        return self

    def remove(self) -> None:
        for block in self.blocks:
            block.__dict__.pop("forward", None)  # the class's forward again
        self.states.clear()

    def context(self, name: str):
        """The state of one kind of call ("cond", "uncond"), as diffusers' cache_context names it."""
        import contextlib

        @contextlib.contextmanager
        def scope():
            previous, self.name = self.name, name
            try:
                yield
            finally:
                self.name = previous

        return scope()

    @property
    def state(self) -> _State:
        return self.states.setdefault(self.name, _State())

    # -- the blocks ---------------------------------------------------------------------------------
    @staticmethod
    def _streams(args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        return hidden, text

    def _head(self, forward, *args, **kwargs):
        hidden, _ = self._streams(args, kwargs)
        text_out, hidden_out = forward(*args, **kwargs)  # a double block: (text, image)
        residual = hidden_out - hidden
        st = self.state
        if st.head_residual is None:
            st.compute = True
        else:
            moved = (residual - st.head_residual).abs().mean() / st.head_residual.abs().mean()
            st.compute = moved.item() > self.threshold
        if not st.compute:
            return text_out + st.tail_residuals[1], hidden_out + st.tail_residuals[0]
        st.head_out, st.head_residual = (text_out, hidden_out), residual
        return text_out, hidden_out

    def _middle(self, forward, *args, **kwargs):
        if self.state.compute:
            return forward(*args, **kwargs)
        hidden, text = self._streams(args, kwargs)
        return hidden if text is None else (text, hidden)

    def _tail(self, forward, *args, **kwargs):
        st = self.state
        if not st.compute:
            return self._middle(forward, *args, **kwargs)
        out = forward(*args, **kwargs)
        text0, hidden0 = st.head_out
        if isinstance(out, tuple):  # FLUX.1's single blocks: (text, image)
            st.tail_residuals = (out[1] - hidden0, out[0] - text0)
        else:  # FLUX.2's: one tensor, text tokens first
            import torch

            r = out - torch.cat([text0, hidden0], dim=1)
            n = text0.shape[1]
            st.tail_residuals = (r[:, n:], r[:, :n])
        return out
