"""The platform core: services, settings, io, tracking, the registry gate and lock, the KFP step
helpers, DVC materialisation and the training loop. Nothing here knows a recipe."""
