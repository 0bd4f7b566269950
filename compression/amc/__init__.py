"""AMC: latency-constrained channel pruning with the shared DDPG agent (`codesign.compression.amc`).

policy   PrunePolicy (per-unit kept-channel ratios), the network's prunable units
surgery  magnitude channel selection, structural pruning, least-squares reconstruction
env      the AMC environment: layer embedding, latency-bounded actions, reward
search   the DDPG search loop (seeded, checkpointed, resumable)
pipeline prune a model directory end to end: search, fine-tune, compile, measure
"""

from codesign.compression.amc.policy import PruneError, PrunePolicy, Unit, structure

__all__ = ["PruneError", "PrunePolicy", "Unit", "structure"]
