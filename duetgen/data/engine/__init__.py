"""Data engine: how-to web pages -> clean interleaved conversations (paper section 3.1, Fig. 2).

    from duetgen.data.engine import EngineConfig, run_engine
    funnel = run_engine("pages.jsonl", "out/howto", EngineConfig(llm_url=None))

See docs/data-engine.md for the stages, the input format, resuming and the funnel report.
"""

from duetgen.data.engine.runner import EngineConfig, EngineError, LocalExecutor, RayExecutor, run_engine

__all__ = ["EngineConfig", "EngineError", "LocalExecutor", "RayExecutor", "run_engine"]
