"""Apps built on the compiler: the command line (``cli``), ``explain``, ``bench`` (with
``bench_runner``, ``bench_table``, ``bench_peers``), ``bench_onnx``, ``measure``, ``quality``,
and the models they load (``models``: the tiny zoo and the SmolLM2 loader; ``zoo``: the
architecture matrix). Only ``cli`` and the facade import from here."""
