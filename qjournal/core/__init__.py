"""The core: ``Image`` (open, validate, cache), the public ``Transaction`` operations
declare their writes in, the one ordering table (``ordering.Phase``) that turns them into
journal steps, the allocator, the overlap map of every structure in use, and the planner
of cluster 0's header switch."""
