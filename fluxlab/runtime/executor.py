"""Applying a memory plan (memory.py) to loaded models, in one place, through hooks.

The mechanisms are the field's: accelerate's `cpu_offload_with_hook` chains models so that running one
moves the previous back to host memory (phase offload, as diffusers' model offload does); diffusers'
`apply_group_offloading` streams blocks of a model through the device (block streaming); the VAE's own
tiling. Nothing else in fluxlab moves models between devices.
"""

from __future__ import annotations

from .memory import GB, HOST, ModelSizes, Plan, SplitPlan


def model_sizes(components) -> ModelSizes:
    """Sizes of the loaded models in bytes (their actual dtypes), for the planner."""
    from .quantize import param_bytes

    def nbytes(m):
        return sum(param_bytes(p) for p in m.parameters()) if m is not None else 0

    t = components.transformer
    te_layers = getattr(getattr(components.text_encoder, "config", None), "num_hidden_layers", None) or 24
    blocks = len(getattr(t, "transformer_blocks", [])) + len(getattr(t, "single_transformer_blocks", []))
    hidden = t.config.num_attention_heads * t.config.attention_head_dim
    return ModelSizes(transformer=nbytes(t), text_encoder=nbytes(components.text_encoder)
                      + nbytes(components.text_encoder_2), vae=nbytes(components.vae),
                      transformer_blocks=max(blocks, 1), text_encoder_blocks=te_layers, hidden=hidden)


def device_budget(device) -> int:
    """Free device memory in bytes (a CPU's free RAM)."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 16 * GB


def _big_models(components):
    return [m for m in (components.text_encoder, components.text_encoder_2, components.transformer) if m is not None]


def apply_split(components, plan: SplitPlan, devices: list) -> None:
    """Place one model over several devices as `plan` says, with accelerate's AlignDevicesHook (what its
    dispatch_model attaches for a device_map): each block of the transformer runs on its device and receives its
    inputs there, so the activations are handed over at the run boundaries; the embedders and the output layer run
    on the main device, and the transformer's output comes back there. The text encoders run on theirs and
    return to the caller's device; the VAE's device is read by the family code (it is called through
    decode/encode, not forward). The hooks run even when two entries are the same device (cpu,cpu)."""
    import torch
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    reset(components, "cpu")
    main = devices[plan.main]

    def at(index):
        return torch.device("cpu") if index == HOST else devices[index]

    from .streaming import block_modules

    t = components.transformer
    listed = [block for _, block in block_modules(t)]  # in the order they run, as the plan counts them
    owner = {id(listed[k]): devices[d] for d, first, end in plan.transformer for k in range(first, end)}
    for child in t.children():  # each block on its run's device; the rest (embedders, output) on the main one
        for m in child if isinstance(child, torch.nn.ModuleList) else [child]:
            dev = owner.get(id(m), main)
            m.to(dev)
            add_hook_to_module(m, AlignDevicesHook(execution_device=dev))
    add_hook_to_module(t, AlignDevicesHook(execution_device=main, io_same_device=True))
    for m in (components.text_encoder, components.text_encoder_2):
        if m is not None:
            m.to(at(plan.text_encoder))
            add_hook_to_module(m, AlignDevicesHook(execution_device=at(plan.text_encoder), io_same_device=True))
    components.vae.to(at(plan.vae))
    if plan.vae_tiling:
        components.vae.enable_tiling()
    else:
        components.vae.disable_tiling()


def reset(components, device) -> None:
    """Remove any placement hooks, leaving every model on `device` (or its offload device)."""
    from accelerate.hooks import remove_hook_from_module
    from diffusers.hooks import HookRegistry

    for m in [*_big_models(components), components.vae]:
        remove_hook_from_module(m, recurse=True)
        for sub in m.modules():
            registry = getattr(sub, "_diffusers_hook", None)
            if isinstance(registry, HookRegistry):
                for name in list(registry.hooks):
                    registry.remove_hook(name, recurse=False)
        m.to(device)


def apply(components, plan: Plan, device, offload_device="cpu") -> None:
    """Place the models as `plan` says: resident, phase-offloaded, or streamed; and set VAE tiling."""
    import torch

    reset(components, offload_device if plan.placement != "resident" else device)
    offload = torch.device(offload_device)
    if plan.placement == "phase":
        from accelerate import cpu_offload_with_hook

        hook = None
        for m in [*_big_models(components), components.vae]:
            _, hook = cpu_offload_with_hook(m, execution_device=device, prev_module_hook=hook)
    elif plan.placement == "stream":
        from diffusers.hooks import apply_group_offloading

        for m in _big_models(components):
            apply_group_offloading(m, onload_device=device, offload_device=offload, offload_type="block_level",
                                   num_blocks_per_group=plan.blocks_per_group or 1)
        components.vae.to(device)
    if plan.vae_tiling:
        components.vae.enable_tiling()
    else:
        components.vae.disable_tiling()
