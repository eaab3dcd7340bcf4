"""The math: family adapters, samplers, schedules and the generation stages. Pure functions where possible."""
