"""FUSED: federated training and unlearning adapters."""
