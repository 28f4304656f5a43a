"""Checks of sampling settings (length, temperature, nucleus mass), shared by the DataModule's
rollout and teacher-response settings, generation, and the module's on-policy settings."""

from __future__ import annotations

__all__ = ["check_sampling"]


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, prefix: str = "") -> None:
    """Validate sampling settings; ``prefix`` names them in the error (e.g. ``model.on_policy.``).

    Raises:
        ValueError: ``max_new_tokens < 1``, ``temperature < 0`` or ``top_p`` outside (0, 1].
    """
    if max_new_tokens < 1:
        raise ValueError(f"{prefix}max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0.0:
        raise ValueError(f"{prefix}temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"{prefix}top_p must be in (0, 1], got {top_p}")
