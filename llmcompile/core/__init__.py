"""The engine, with no model or target knowledge: capture (``program``), ``canonicalize``,
patterns and matching (``pattern``, ``matcher``, ``rules``), ``rewrite``, ``fold``,
``pipeline`` and ``recipe``, and ``verify``. It imports nothing of llmcompile but ``_compat``."""
