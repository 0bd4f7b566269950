"""`codesign pipeline`: search, compress, compile and ship for a target, with a report.

    from codesign.pipeline import load_config, run
    result = run(load_config(None), "out/")        # the embedded default (tiny, mnist5k, x86)
    result.summary["artifact"]                      # measured latency and accuracy of the artifact

The stages (stage_lut, stage_latency, stage_search, ..., stage_prune, stage_quantize) live in
codesign.pipeline.stages, the stage cache in codesign.pipeline.cache, the DAG in
codesign.pipeline.run.
"""

from codesign.pipeline.config import ConfigError, PipelineConfig, load_config
from codesign.pipeline.run import STAGES, PipelineResult, run

__all__ = ["STAGES", "ConfigError", "PipelineConfig", "PipelineResult", "load_config", "run"]
