"""Search spaces and architecture search strategies (`codesign.search`).

space       SearchSpace, get_space (imported here; everything below loads torch on import)
supernet    Supernet over a space: every candidate op per layer, the path is an argument
estimators  ProxylessNAS binary-gate and REINFORCE gradient estimators
objective   latency-aware losses (multiplicative / additive) and SearchError
proxyless   ProxylessSearch (gradient strategy), derive_arch
evolution   evolve (mutation + crossover under a hard latency constraint)
netconfig   ProxylessNAS net.config import / export
run         search_arch / run_search_job: search -> derive + measure -> retrain -> model directory + report
"""

from codesign.search.space import Layer, SearchSpace, Stage, get_space, list_spaces, register_space

__all__ = ["Layer", "SearchSpace", "Stage", "get_space", "list_spaces", "register_space"]
