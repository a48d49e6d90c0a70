"""logitflow."""
