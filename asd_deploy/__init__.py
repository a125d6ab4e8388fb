"""asd-deploy: one-step causal video generation (ASD) made deployable."""
