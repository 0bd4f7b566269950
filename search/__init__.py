"""Search spaces and architecture search strategies (`codesign.search`)."""

from codesign.search.space import Layer, SearchSpace, Stage, get_space, list_spaces, register_space

__all__ = ["Layer", "SearchSpace", "Stage", "get_space", "list_spaces", "register_space"]
