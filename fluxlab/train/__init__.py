"""Training: datasets, what trains (networks), the loop, checkpoints and samples. Front ends reach it through
service.train."""
