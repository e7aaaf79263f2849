"""Running at scale: checkpoints and resume, several processes (DDP), sharded weights (FSDP),
8-/4-bit base weights.
"""
