"""Implementation of the checkpoint tools behind ``nvfp4-fix inspect/verify/dequantize/convert/...``.

Nothing here imports torch or transformers at module level: ``inspect`` must stay header-only and fast.
"""
