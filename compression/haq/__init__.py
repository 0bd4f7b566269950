"""HAQ: hardware-aware mixed-precision quantisation with a DDPG agent (`codesign.compression.haq`).

env       the HAQ environment: per-layer state embedding, actions -> bits, HAQ's greedy budget
          enforcement, reward from accuracy after a short quantisation-aware fine-tune
search    the episode loop around the shared DDPG agent (`codesign.compression.ddpg`), resumable
pipeline  model directory in -> searched policy -> QAT -> integer TVM module, measured -> out
"""
