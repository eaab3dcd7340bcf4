"""What to make and with what: the catalog, GenerateRequest / ModelRef / Runtime, resolving, presets, training
configs and image records. Torch-free: the same pydantic objects are CLI flags, HTTP bodies, JSONL lines and
YAML, so they cannot drift apart."""
