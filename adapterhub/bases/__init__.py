"""Base model sources (shipped MiniLM, SmolLM2, local folders), shapes and fingerprints."""

# The digits CNN's config.json names (adapterhub.bases.cnn): here, so torch-free code can recognise the kind.
CNN_ARCHITECTURE = "AdapterhubDigitsCNN"
CNN_MODEL_TYPE = "adapterhub-digits-cnn"
