"""Model code (preprocessing, classifier, U-Net, registry) and shipped weights. Never imports node/."""
