"""The engine, with no model or target knowledge: capture (``program``), ``canonicalize``,
patterns and matching (``pattern``, ``matcher``, ``rules``), ``rewrite``, ``fold``,
``pipeline`` and ``recipe``, ``verify``, ``stages`` (where compile time goes) and ``cache``
(the on-disk cache folder). It imports nothing of llmcompile but ``_compat``."""
