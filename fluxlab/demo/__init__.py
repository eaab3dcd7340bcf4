"""The bundled demo model (`-m demo`) and the code that makes and checks it:

* data.py      synthetic shape scenes with captions; some colour x shape x position combinations held out
* build.py     builds the model from nothing (python -m fluxlab.demo.build)
* evaluate.py  reads colour, shape and position back from images; prompt adherence on held-out prompts
* lora.py      the LoRA proof: a new shape ("zxq", a ring) learned with `fluxlab train`
* edit.py      the editing proof: img2img and reference edits change what the prompt says, keep the rest
"""
