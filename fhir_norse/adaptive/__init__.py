"""Adaptive administration (pure): which scales a patient is asked, from the history and the rules."""

from fhir_norse.adaptive.state import Measured, Override, ScaleState, scale_states, scales_to_ask

__all__ = ["Measured", "Override", "ScaleState", "scale_states", "scales_to_ask"]
