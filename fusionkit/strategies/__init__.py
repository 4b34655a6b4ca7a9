"""Training strategies (registry kind ``strategies``): hooks the one training loop calls.

See :mod:`fusionkit.strategies.base` for the hook order; ``modalimmune`` and ``aim`` are the core
strategies.
"""
