"""The engine: portraits of one person from a base model of some family and an identity method.

``generator`` (DigitalTwinGenerator, the Engine contract), ``request`` (the declared request fields and
GenerationRequest), ``tuning`` (quality modes, sizes, styles), ``previews``, ``families/`` (one module per
model family), ``identity/`` (identity methods: IP-Adapter variants, InstantID, pose). Importing any of
these loads no model; torch and diffusers are imported when a model is set up.
"""
