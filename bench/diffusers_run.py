"""One diffusers Flux2KleinPipeline generation, for bench/compare.py (run in its own process).

    python bench/diffusers_run.py MODEL_DIR OUT.png --size 512 --steps 4 --seed 0 --report R.json [--dtype float32]

Times the phases by hooking the pipeline's text encoder, transformer and VAE decoder.
"""

from __future__ import annotations

if __name__ == "__main__":  # in the project's .venv, whatever python started this
    import project_venv

    project_venv.use()

import argparse
import json
import time

t_start = time.perf_counter()
import torch  # noqa: E402
from diffusers import Flux2KleinPipeline  # noqa: E402

t_imported = time.perf_counter()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    a = ap.parse_args()
    t0 = time.perf_counter()
    pipe = Flux2KleinPipeline.from_pretrained(a.model, torch_dtype=getattr(torch, a.dtype))
    pipe.set_progress_bar_config(disable=True)
    t_loaded = time.perf_counter()
    phases = {"encode": 0.0, "denoise": 0.0, "decode": 0.0}

    def timed(module, name, attr="forward"):
        fn = getattr(module, attr)

        def run(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                phases[name] += time.perf_counter() - t
        setattr(module, attr, run)

    timed(pipe.text_encoder, "encode")
    timed(pipe.transformer, "denoise")
    timed(pipe.vae, "decode", "decode")
    n = pipe.text_encoder.config.num_hidden_layers  # (9, 18, 27) for the real 36 layers; tiny models differ
    layers = (n // 4, n // 2, 3 * n // 4)
    t1 = time.perf_counter()
    image = pipe(prompt="a red circle in the top left on a white background", height=a.size, width=a.size,
                 num_inference_steps=a.steps, generator=torch.Generator("cpu").manual_seed(a.seed),
                 text_encoder_out_layers=layers).images[0]
    t2 = time.perf_counter()
    image.save(a.out)
    if a.report:
        with open(a.report, "w") as f:
            json.dump({"import": t_imported - t_start, "load": t_loaded - t0, "generate": t2 - t1,
                       "phases": phases}, f)


if __name__ == "__main__":
    main()
