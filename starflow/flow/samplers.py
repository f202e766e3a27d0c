"""The names of the flow's samplers: the one list the CLI and the options check read. Free of imports,
so every ``--help`` can list them without importing torch.

The per-block plan samplers (selective, segment, auto) are resolved to per-block choices in
``starflow.flow.selective_jacobi``; chunked-jacobi (the official STARFlow rule) is
``starflow.flow.chunked_jacobi``; the others are in ``starflow.flow.sampling``."""

SAMPLERS = ("sequential", "jacobi", "naive", "chunked-jacobi", "selective", "segment", "auto")
