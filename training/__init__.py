"""Training and evaluation pipeline, and the synthetic chest-CT phantom generator. Never imports node/."""
