"""The training product: config, data, loop, checkpoints, metrics and export around the ``Engine``.

``slideformer.train.loop.train(RunConfig)`` is the entry point the CLI calls; modules here never touch
streams or device slots (that is ``runtime/``), they only call the engine's public API.
"""
