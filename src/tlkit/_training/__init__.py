"""The training core behind `tlkit.FineTuner`: small parts, one concept each (private API)."""
